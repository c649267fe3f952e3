"""The Python API: one function per command, what `mlxdistill COMMAND` runs, and the place
where stages are strung together (train, then evaluate). The command line (cli.py) parses
arguments and calls these; scripts and notebooks call them directly.

    from mlxdistill import api
    cfg = api.load_config(None, ["train.iters=50"])   # None: the embedded default
    result = api.train(cfg)            # eval.json's content: teacher / before / after
    model, tokenizer = api.load_student(cfg.run.dir)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from . import api_cache
from . import cache as cache_mod
from . import data as data_mod
from . import evaluate as evaluate_mod
from . import export as export_mod
from . import generate as generate_mod
from . import models
from . import plan as plan_mod
from . import profile as profile_mod
from . import prune as prune_mod
from . import recipes as recipes_mod
from . import remote
from . import trainer
from .config import DATA_SPLITS, Config, ConfigError
from .config import load_config  # noqa: F401  (part of the API)
from .distributed import World
from .rundir import RunDir


def train(cfg: Config, quiet: bool = False, log=print) -> Optional[dict]:
    """Train the student (building the teacher cache if it is missing), then evaluate it
    against the teacher on held-out data (rank 0; other ranks return None).

    The teacher is loaded at most once before training (cache pass and validation targets
    share it) and released before the loop in cache mode, so the student trains without it;
    evaluation loads it again once the student is saved. In online mode, where the teacher
    stays in memory for training, evaluation reuses it.

    With train.final_eval false nothing is evaluated and None is returned. A run already
    trained and evaluated is neither trained nor evaluated again (evaluation takes minutes
    on real data): its eval.json is returned; `evaluate` (`mlxdistill eval`) redoes it."""
    http = need_cache(cfg, "train")
    run = RunDir(cfg.run.dir)
    # Decided before fit, after which the run is finished either way: an existing eval.json
    # is this run's result only if this call trains nothing.
    done = run.finished(cfg.train.iters) and os.path.isfile(run.eval_json)
    teacher = models.Lazy(cfg, "teacher")
    if not trainer.fit(cfg, quiet, log, teacher):
        return None
    res = None
    if done:
        res = evaluate_mod.read_result(run.eval_json)
        log(f"{run.path} is complete (trained and evaluated): {run.eval_json} as it was; "
            f"`mlxdistill eval {run.path}` evaluates it again")
        if not quiet:
            log(evaluate_mod.format_table(res))
    elif cfg.train.final_eval and http:
        log(f"not evaluated: teacher.model={remote.redact(cfg.teacher.model)} is an HTTP "
            "endpoint, and the comparison runs the teacher's weights; with a local copy of "
            f"its model: mlxdistill eval {run.path} --teacher PATH")
    elif cfg.train.final_eval:
        res = evaluate_mod.evaluate_run(cfg.run.dir, quiet=quiet, log=log, cfg=cfg,
                                        teacher=teacher)
    else:
        log(f"not evaluated (train.final_eval=false); `mlxdistill eval {run.path}` evaluates "
            "the student against the teacher")
    log(outputs(run))
    return res


def outputs(run: RunDir) -> str:
    """Where a finished run's results are, as a short block: the last thing `train` says,
    so the user need not know the run directory's layout."""
    student = run.student_path()
    rows = [("model" if student == run.model else "adapters",
             run.adapters if student == run.path else student),
            ("evaluation", run.eval_json), ("metrics", run.metrics)]
    rows = [(what, path) for what, path in rows if path and os.path.exists(path)]
    pngs = sorted(n for n in os.listdir(run.plots) if n.endswith(".png")) \
        if os.path.isdir(run.plots) else []
    if pngs:
        rows.append(("plots", os.path.join(run.plots, "") + f" ({', '.join(pngs)})"))
    width = max((len(what) for what, _ in rows), default=0)
    return "\n".join([f"outputs in {run.path}:"] +
                     [f"  {what.ljust(width)}  {path}" for what, path in rows])


def fit(cfg: Config, quiet: bool = False, log=print) -> bool:
    """Train only (no final evaluation); True on rank 0."""
    need_cache(cfg, "train")
    return trainer.fit(cfg, quiet, log)


def need_cache(cfg: Config, command: str) -> bool:
    """Whether the teacher is an HTTP endpoint, which `cache` and `train` take only as the
    source of a top-k cache built from the log-probabilities `generate` kept (api_cache.py);
    any other use of an endpoint is refused."""
    if not remote.is_url(cfg.teacher.model):
        return False
    if cfg.teacher.mode == "online":
        raise ConfigError(f"teacher.mode=online runs the teacher's weights at every step; "
                          f"teacher.model={remote.redact(cfg.teacher.model)} is an HTTP "
                          "endpoint: use teacher.mode=cache (a top-k cache from the "
                          "log-probabilities `generate` kept) or a local teacher")
    api_cache.check(cfg)
    if not os.path.isfile(os.path.join(cfg.cache.dir, cache_mod.MANIFEST)):
        api_cache.check_data(cfg)  # before train makes run.dir
    return True


def build_cache(cfg: Config, quiet: bool = False, log=print) -> dict:
    """The teacher pass over data.train -> cache.dir (resumes a killed pass); the manifest."""
    need_cache(cfg, "cache")
    world = World(cfg.run.dist_timeout)
    log = log if world.main else (lambda m: None)  # rank 0 reports for all
    log(world.describe())
    m = cache_mod.build(cfg, quiet=quiet, log=log, world=world)
    log(f"cache {cfg.cache.dir}: {m['rows']} rows, {m['tokens']} tokens, mode {m['mode']}")
    return m


def inspect_cache(cache_dir: str) -> dict:
    """A cache's manifest summary, after verifying every shard."""
    return cache_mod.summary(cache_dir)


def preview_data(cfg: Config, rows: int = 2, split: str = "train", log=print) -> list[dict]:
    """The first `rows` packed rows of data.<split> as training sees them: per row its
    "ids", its "mask" (the cache's loss_mask: 1 where the next token is trained) and "text"
    (decoded, the untrained tokens inside [[ ]]). Tokenized with the teacher's tokenizer, as
    the cache pass does (the student shares it: check_pair); only the tokenizer is loaded."""
    if split not in DATA_SPLITS:
        raise ConfigError(f"split {split!r} is not one of {', '.join(DATA_SPLITS)}")
    path = getattr(cfg.data, split)
    if path is None:
        raise ConfigError(f"data.{split} is null; set it (or data.dir) to preview that split")
    remote.need_local(cfg.teacher.model, "data")  # rows are in the teacher's tokens
    _, tok = models.load_meta_role(cfg, "teacher")
    d = cfg.data
    # valid and test are packed without long_lines (validation.py, evaluate.py): split
    packed = data_mod.pack(path, tok, d.seq_len, d.mask_prompt, rows,
                           d.long_lines if split == "train" else "split", d.packing,
                           early_stop=True)
    log(f"{path}: the first {packed.rows} rows of {d.seq_len} tokens, tokenized with the "
        f"teacher's tokenizer ({cfg.teacher.model}, which the student shares) as the cache "
        f"pass does; text in {data_mod.UNTRAINED[0]} {data_mod.UNTRAINED[1]} is not trained on")
    return [{"row": i, "ids": packed.input_ids[i].tolist(), "mask": packed.loss_mask[i].tolist(),
             "text": data_mod.marked_text(tok, packed.input_ids[i], packed.loss_mask[i])}
            for i in range(packed.rows)]


def generate(cfg: Config, quiet: bool = False, log=print) -> dict:
    """Teacher-written answers for generate.prompts -> generate.out (resumes)."""
    return generate_mod.generate(cfg, quiet=quiet, log=log)


def evaluate(run_dir: str, data_path: Optional[str] = None, quiet: bool = False,
             log=print, records: Optional[int] = None, teacher: Optional[str] = None) -> dict:
    """Evaluate a finished run against its teacher on its first `records` records of
    `data_path` (defaults: the run's data.test_records of data.test); writes
    RUN_DIR/eval.json and returns its content. `teacher`: a local model to compare with
    instead of the run's teacher.model (which may be an HTTP endpoint)."""
    cfg = None
    if teacher is not None:
        cfg = RunDir(run_dir).load_config()
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, model=teacher))
    return evaluate_mod.evaluate_run(run_dir, data_path, quiet=quiet, log=log,
                                     records=records, cfg=cfg)


def load_run_config(run_dir: str) -> Config:
    """The config a finished run trained with, its relative inputs found from anywhere."""
    return RunDir(run_dir).load_config()


def load_student(run_dir: str):
    """(model, tokenizer) of a finished run's student, as mlx_lm loads it."""
    run = RunDir(run_dir)
    cfg = run.load_config()
    model = run.load_student(cfg)
    _, tok = models.load_meta_role(cfg, "student")
    return model, tok


def export(run_dir: str, out: str, bits: int = 16, group_size: int = 64, force: bool = False,
           log=print, **kw) -> dict:
    """Fuse, optionally quantize and verify a run's student into `out` (export.export_run's
    keywords: tune_iters, tune_lr, gguf, target_quality)."""
    return export_mod.export_run(run_dir, out, bits, group_size, force, log=log, **kw)


def profile(model_or_run: str, bits=(16, 8, 4), prompt_tokens: int = 128,
            gen_tokens: int = 64, repeats: int = 3, group_size: int = 64,
            out_dir: Optional[str] = None, log=print) -> dict:
    """Latency, memory and fidelity per precision, projected onto target devices."""
    return profile_mod.run_profile(model_or_run, list(bits), prompt_tokens, gen_tokens,
                                   repeats, group_size, out_dir, log=log)


def plan(cfg: Config, probe: bool = False, memory_bytes: Optional[int] = None,
         metal: Optional[bool] = None) -> dict:
    """Will `cfg` fit? Peak memory of the teacher pass and training, cache size, time."""
    remote.need_local(cfg.teacher.model, "plan")
    return plan_mod.plan(cfg, probe=probe, memory_bytes=memory_bytes, metal=metal)


def prune(cfg: Config, out: str, force: bool = False, quiet: bool = False,
          log=print) -> dict:
    """A student cut from cfg.teacher.model to the sizes in cfg.prune, written to `out` as an
    mlx_lm folder (the teacher's tokenizer, prune.json: what was kept and why); returns
    prune.json's content. Train it with student.model=OUT."""
    remote.need_local(cfg.teacher.model, "prune")
    return prune_mod.prune(cfg, out, force=force, quiet=quiet, log=log)


def recipes() -> list[dict]:
    """The shipped recipes: name, one-line summary and path of each (`mlxdistill recipes`)."""
    return recipes_mod.list_all()


def init_recipe(name: str, dest: Optional[str] = None, force: bool = False) -> str:
    """An editable copy of a shipped recipe in the folder `dest` (default: the working
    directory), its embedded inputs pointing into the installed package; returns its path."""
    return recipes_mod.init(name, dest, force)
