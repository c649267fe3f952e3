"""`mlxdistill` command line: parse, call one function, print. User errors exit 2 with one
line on stderr; an interrupted job says how to resume.

Each command imports what it runs inside its own function, on purpose: most modules pull in
mlx (and mlx_lm), and `mlxdistill --help` should not wait for them. Only light modules are
imported here."""

from __future__ import annotations

import functools
import json
import logging
import sys

import click

from . import BLAS, errors
from .fallback import TARGET_QUALITY
from .files import os_error_message


def _log(quiet: bool):
    def log(msg: str) -> None:
        if not quiet:
            click.echo(msg, err=False)

    return log


def guarded(fn):
    """One-line errors instead of tracebacks for anything the user can fix."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except errors.Error as e:  # exit 2; distributed.EXIT_CODE when another rank failed
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except FloatingPointError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(3)
        except FileNotFoundError as e:
            click.echo(f"error: {e.filename or e}: file not found", err=True)
            sys.exit(2)
        except OSError as e:  # disk full, read-only or forbidden directory: fixable by the user
            msg = os_error_message(e)
            if msg is None:
                raise
            click.echo(f"error: {msg}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("\ninterrupted; run the same command again to resume", err=True)
            sys.exit(130)

    return wrapper


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (shows the BLAS in use).")
@click.version_option(package_name="mlxdistill")
def main(verbose: bool) -> None:
    """Knowledge distillation on Apple's MLX, from a cached teacher."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    logging.getLogger("mlxdistill").debug("BLAS in use: %s", BLAS)


config_opt = click.option("-c", "--config", "config_path", type=str, default=None,
                          help="YAML config (default: the embedded configs/default.yaml).")
quiet_opt = click.option("-q", "--quiet", is_flag=True, help="No progress bar or tables.")
overrides_arg = click.argument("overrides", nargs=-1)


def _load(config_path, overrides):
    from .config import load_config

    return load_config(config_path, list(overrides))


@main.command()
@click.argument("prefix", default="")
@click.option("--markdown", is_flag=True, help="The reference page (docs/configuration.md).")
def config(prefix, markdown):
    """Every config key: its default and what it does (PREFIX: e.g. loss or train.lr)."""
    from . import confdoc

    out = confdoc.markdown() if markdown else confdoc.text(prefix)
    if not out:
        click.echo(f"error: no config key starts with {prefix!r}; run `mlxdistill config` "
                   "for them all", err=True)
        sys.exit(2)
    click.echo(out.rstrip("\n"))


@main.command()
@guarded
def recipes():
    """The shipped recipes (the embedded default, its variants, real-model pairs)."""
    from . import api

    rows = api.recipes()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        click.echo(f"{r['name'].ljust(width)}  {r['summary']}")
    click.echo("\n`mlxdistill init NAME` writes an editable copy here; "
               "`mlxdistill train -c NAME.yaml` runs it.")


@main.command()
@click.argument("recipe")
@click.argument("dest", required=False)
@click.option("--force", is_flag=True, help="Replace an existing copy.")
@guarded
def init(recipe, dest, force):
    """Write an editable copy of RECIPE (see `mlxdistill recipes`) as DEST/RECIPE.yaml
    (DEST: a folder, default the working directory; or a .yaml file name). Its weights/ and
    data/ inputs point into the installed package; outputs go where you run it."""
    from . import api

    out = api.init_recipe(recipe, dest, force)
    click.echo(f"wrote {out}; run it with: mlxdistill train -c {out}")


@main.command()
@config_opt
@quiet_opt
@overrides_arg
@guarded
def train(config_path, quiet, overrides):
    """Train a student (builds the teacher cache if missing), then evaluate it.

    OVERRIDES are KEY=VALUE pairs such as train.iters=200 loss.alpha=0.5; `mlxdistill
    config` lists every key with its default and meaning."""
    from . import api

    api.train(_load(config_path, overrides), quiet=quiet, log=_log(quiet))


@main.command()
@config_opt
@quiet_opt
@overrides_arg
@guarded
def cache(config_path, quiet, overrides):
    """Run the teacher over data.train and write the cache (resumes a killed pass)."""
    from . import api

    api.build_cache(_load(config_path, overrides), quiet=quiet, log=_log(quiet))


@main.command()
@config_opt
@quiet_opt
@overrides_arg
@guarded
def generate(config_path, quiet, overrides):
    """Teacher-written answers for generate.prompts -> generate.out (resumes)."""
    from . import api

    api.generate(_load(config_path, overrides), quiet=quiet, log=_log(quiet))


@main.command("eval")
@click.argument("run_dir")
@click.option("--data", "data_path", default=None, help="JSONL/.txt to evaluate on "
              "(default: the run's data.test).")
@click.option("--records", type=int, default=None, help="Evaluate on the first N records "
              "(default: the run's data.test_records; all when unset).")
@click.option("--teacher", default=None, help="A local teacher to compare with instead of "
              "the run's teacher.model (an HTTP teacher's run: a local copy of its model).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@guarded
def eval_cmd(run_dir, data_path, records, teacher, as_json):
    """Evaluate RUN_DIR's student against its teacher (writes RUN_DIR/eval.json).

    This is how a finished run is evaluated again: rerunning `train` on it returns the
    eval.json it has."""
    from . import api

    res = api.evaluate(run_dir, data_path, quiet=as_json, log=click.echo, records=records,
                       teacher=teacher)
    if as_json:
        click.echo(json.dumps(res, indent=2))


@main.command()
@click.argument("cache_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@guarded
def inspect(cache_dir, as_json):
    """Summarise and fully verify a teacher cache."""
    from . import api

    s = api.inspect_cache(cache_dir)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    for k, v in s.items():
        click.echo(f"{k:>18}: {v}")


@main.command()
@config_opt
@click.option("--rows", type=click.IntRange(min=1), default=2, show_default=True,
              help="Packed rows to show, from the first.")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="train",
              show_default=True, help="Which of data.train / data.valid / data.test.")
@click.option("--json", "as_json", is_flag=True, help='One JSON object per row: {"row", '
              '"ids", "mask"} (mask 1: the next token is trained, as the cache\'s loss_mask).')
@overrides_arg
@guarded
def data(config_path, rows, split, as_json, overrides):
    """The first packed rows exactly as the student trains on them: decoded, with the
    untrained part (prompts, padding) inside [[ ]]."""
    from . import api

    log = (lambda m: None) if as_json else click.echo
    for r in api.preview_data(_load(config_path, overrides), rows, split, log=log):
        if as_json:
            click.echo(json.dumps({"row": r["row"], "ids": r["ids"], "mask": r["mask"]}))
        else:
            click.echo(f"\n-- row {r['row']} ({len(r['ids'])} tokens, {sum(r['mask'])} "
                       f"trained) --\n{r['text']}")


@main.command()
@click.argument("run_dir")
@click.option("-o", "--out", required=True, help="Output folder (mlx_lm / MLX Swift loadable).")
@click.option("--bits", type=int, default=16, show_default=True, help="16, 8 or 4.")
@click.option("--group-size", type=int, default=64, show_default=True,
              help="Quantization group size (8 and 4 bits).")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--tune-iters", type=int, default=0, show_default=True,
              help="8/4-bit: steps of distillation-aware tuning of the quantization scales "
                   "and biases against the run's teacher cache (0: off).")
@click.option("--tune-lr", type=float, default=1e-5, show_default=True)
@click.option("--gguf", is_flag=True, help="Also write a float16 GGUF file (llama, mistral, "
              "mixtral; 16 bits only).")
@click.option("--target-quality", type=float, default=TARGET_QUALITY, show_default=True,
              help="Cloud fallback: fraction of the teacher's quality the student + teacher "
                   "system must keep; sets the deferral threshold in the model card.")
@guarded
def export(run_dir, out, bits, group_size, force, tune_iters, tune_lr, gguf, target_quality):
    """Fuse, optionally quantize and verify RUN_DIR's student into OUT."""
    from . import api

    api.export(run_dir, out, bits, group_size, force, log=click.echo, tune_iters=tune_iters,
               tune_lr=tune_lr, gguf=gguf, target_quality=target_quality)


@main.command()
@config_opt
@click.option("-o", "--out", required=True, help="Output folder: the student, mlx_lm "
              "loadable, with prune.json.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@quiet_opt
@overrides_arg
@guarded
def prune(config_path, out, force, quiet, overrides):
    """Cut a student from teacher.model to the prune.* sizes (e.g. prune.num_hidden_layers=4
    prune.hidden_size=128): channels, heads and blocks the teacher uses least on data.train
    go. Distil into it with student.model=OUT."""
    from . import api
    from .prune import format_report

    rep = api.prune(_load(config_path, overrides), out, force=force, quiet=quiet,
                    log=_log(quiet))
    click.echo(format_report(rep, out))


@main.command()
@click.argument("run_or_folder")
@click.option("--fallback", default=None, metavar="URL", help="OpenAI-compatible endpoint "
              "(…/v1) that answers when the student's confidence is below its measured "
              "threshold; without it the student answers everything.")
@click.option("--fallback-model", default=None, help="The 'model' sent to the fallback "
              "(default: the request's).")
@click.option("--fallback-key-env", default=None, metavar="VAR", help="Environment variable "
              "holding the fallback's API key.")
@click.option("--fallback-timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the fallback before the student's answer goes out.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; "
              "anything but loopback needs an API key.")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--api-key", default=None, help="Key clients must send (Authorization: Bearer); "
              "default: $MLXDISTILL_API_KEY.")
@click.option("--max-tokens", type=int, default=1024, show_default=True,
              help="The most tokens a request may ask for.")
@click.option("--max-concurrent", type=int, default=8, show_default=True,
              help="Generations running or waiting; more get 429.")
@click.option("--max-body", type=int, default=1 << 20, show_default=True,
              help="Largest request body in bytes; larger get 413.")
@guarded
def serve(run_or_folder, fallback, fallback_model, fallback_key_env, fallback_timeout, host,
          port, api_key, max_tokens, max_concurrent, max_body):
    """Serve RUN_OR_FOLDER's student over an OpenAI-compatible API, deferring to --fallback
    when the student is not confident enough (the rule measured by eval / export)."""
    from . import serve as serve_mod

    serve_mod.serve(run_or_folder, serve_mod.Options(
        host=host, port=port, fallback=fallback, fallback_model=fallback_model,
        fallback_key_env=fallback_key_env, fallback_timeout=fallback_timeout,
        api_key=api_key, max_tokens=max_tokens, max_concurrent=max_concurrent,
        max_body=max_body), log=click.echo)


@main.command()
@click.argument("model_or_run")
@click.option("--bits", default="16,8,4", show_default=True,
              help="Precisions to profile (of 32,16,8,4); the first is the fidelity reference.")
@click.option("--prompt-tokens", type=int, default=128, show_default=True)
@click.option("--gen-tokens", type=int, default=64, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--group-size", type=int, default=64, show_default=True)
@click.option("-o", "--out", "out_dir", default=None,
              help="Folder for profile.json + profile.png (default: RUN_DIR/profile).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@guarded
def profile(model_or_run, bits, prompt_tokens, gen_tokens, repeats, group_size, out_dir,
            as_json):
    """Latency, memory and fidelity per precision, projected onto target devices."""
    from .config import ConfigError
    from . import api
    from .profile import format_report

    try:
        bits_list = [int(b) for b in bits.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--bits {bits!r} must be a comma-separated list such as 16,8,4") \
            from None
    log = (lambda m: None) if as_json else click.echo
    rep = api.profile(model_or_run, bits_list, prompt_tokens, gen_tokens, repeats, group_size,
                      out_dir, log=log)
    click.echo(json.dumps(rep, indent=2) if as_json else format_report(rep))


@main.command()
@config_opt
@click.option("--probe", is_flag=True, help="Also run both passes briefly here: measured "
              "peak memory and the time the run will take.")
@click.option("--memory-gb", type=float, default=None,
              help="Plan for a machine with this much memory instead of this one.")
@click.option("--mac", is_flag=True, help="Plan for a Mac GPU (weights in their bf16/fp16 "
              "dtype) from another machine; combine with --memory-gb.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@overrides_arg
@guarded
def plan(config_path, probe, memory_gb, mac, as_json, overrides):
    """Will CONFIG fit? Peak memory of the teacher pass and training, cache size, time."""
    from . import api
    from .plan import format_plan

    p = api.plan(_load(config_path, overrides), probe=probe,
                  memory_bytes=int(memory_gb * (1 << 30)) if memory_gb else None,
                  metal=True if mac else None)
    click.echo(json.dumps(p, indent=2) if as_json else format_plan(p))


if __name__ == "__main__":  # pragma: no cover
    main()
