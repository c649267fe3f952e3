"""Wall-clock training speed as a user feels it: the `mlx_lm.lora` command line against
`mlxdistill train`, each a fresh process, full fine-tune and LoRA.

    python scripts/bench_wall.py                      # 20 and 80 iterations, 3 rounds
    python scripts/bench_wall.py --iters 20 80 --repeats 5 --modes full

Both train the same float32 copy of the embedded student (mlx_lm.lora trains in the stored
dtype, float16 here, which has no fast path on a CPU; mlxdistill computes in float32 there),
batch 8 x 256 tokens, AdamW at the config's learning rate, on `data/train.jsonl`, whose lines
are longer than 256 tokens (mlx_lm cuts each to its first 256 and trains the 255 positions
that have a next token in the line; mlxdistill packs them into rows and trains all 256
positions of a row, the last one against the next row's first token). mlxdistill reads a cache built before the timing starts (the teacher pass is
excluded: it is paid once per dataset, not per run); mlx_lm trains on plain CE.

Seconds per iteration = (t(80) - t(20)) / 60, where t is the time from launching the command
to the line that reports its last step, so start-up (imports, loading, tokenizing, compiling)
cancels. Both validate once at the end of training (`--steps-per-eval` and
`train.eval_every` are set high, mlx_lm validates on one batch, mlxdistill on its 8 cached
rows); what comes after the last step — mlx_lm's final save, mlxdistill's save and held-out
evaluation — is not timed, and the mlxdistill process is stopped once its last step is
reported. Runs go round-robin (tool, mode, iterations) so a change in the machine's load hits
all of them alike; the median over rounds is reported.

On Linux both run with Debian's OpenBLAS (mlxdistill loads it itself; mlx_lm gets it through
LD_PRELOAD), as mlx[cpu]'s bundled BLAS is far slower. mlx_lm's `--fine-tune-type full`
trains the transformer blocks and leaves the embedding frozen; mlxdistill's full mode trains
every parameter, the tied embedding / output head too (41 % of this student).

Also counts the page faults of one step with MLX's default cache of freed buffers and as the
training loop runs it (`page_faults`). Writes the `wall_clock` and `page_faults` entries of
results/bench.json and re-renders results/bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlxdistill  # noqa: E402,F401  (OpenBLAS before mlx)
from mlxdistill import _OPENBLAS  # noqa: E402

# The cache, data cap and batch shape of scripts/bench.py, so both share one cache.
BASE = ["cache.dir=caches/bench-sample", "data.max_rows=256"]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def float32_copy(src: str, dest: str) -> str:
    """`src` with its weights cast to float32 (config, tokenizer files copied)."""
    import mlx.core as mx

    from mlxdistill import files

    os.makedirs(dest, exist_ok=True)
    weights = mx.load(os.path.join(src, "model.safetensors"))
    with files.atomic_path(os.path.join(dest, "model.safetensors")) as tmp:
        mx.save_safetensors(tmp, {k: v.astype(mx.float32) for k, v in weights.items()})
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["torch_dtype"] = "float32"
    files.atomic_json(os.path.join(dest, "config.json"), cfg)
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name.endswith(".model"):
            shutil.copy(os.path.join(src, name), dest)
    return dest


def data_folder(train: str, valid: str, dest: str) -> str:
    """The folder mlx_lm.lora reads: train.jsonl and valid.jsonl."""
    os.makedirs(dest, exist_ok=True)
    shutil.copy(train, os.path.join(dest, "train.jsonl"))
    shutil.copy(valid, os.path.join(dest, "valid.jsonl"))
    return dest


def timed(cmd: list[str], env: dict, last_step, stop_at_last: bool, limit: float) -> dict:
    """Launch `cmd`; seconds from launch to the first output line for which `last_step(line)`
    holds, and to exit (None when stopped there). Output is kept for error messages."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                         cwd=ROOT, text=True, bufsize=1)
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in p.stdout:
            lines.put((time.perf_counter(), ANSI.sub("", line.rstrip())))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen, t_last, tail = [], None, []
    while True:
        try:
            item = lines.get(timeout=max(1.0, limit - (time.perf_counter() - t0)))
        except queue.Empty:
            item = None
            p.kill()
        if item is None:
            break
        t, line = item
        tail = (tail + [line])[-20:]
        if t_last is None and last_step(line):
            t_last = t - t0
            if stop_at_last:
                p.terminate()
        seen.append(line)
    rc = p.wait()
    if t_last is None:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... (exit {rc}) never reported its last "
                           "step; its output ended:\n" + "\n".join(tail))
    return {"to_last_step_s": t_last,
            "process_s": None if stop_at_last else time.perf_counter() - t0}


def page_faults(cfg, steps: int = 3, rounds: int = 3) -> dict:
    """Minor page faults and seconds per compiled full fine-tune step on cached batches, in
    this process: with MLX's default cache of freed buffers, and inside the training loop's
    memory setup (mlxdistill.step.loop_memory), which keeps them for reuse. The two take
    turns, `rounds` blocks of `steps` steps each after one step that fills whatever cache
    there is; medians over the blocks."""
    import resource

    import mlx.core as mx
    import mlx.optimizers as optim

    from mlxdistill import cache as cache_mod
    from mlxdistill import models
    from mlxdistill.objective import Objective
    from mlxdistill.step import loop_memory, make_step, to_arrays

    it = cache_mod.ShardReader(cfg.cache.dir).batches(cfg.train.batch_size, 0)
    batches = [to_arrays(next(it)) for _ in range(steps + 1)]
    runs, blocks = {}, {}
    for name in ("default", "training loop"):
        model, _, scfg = models.load(cfg.student.model, "student")
        opt = optim.AdamW(learning_rate=cfg.train.lr)
        opt.init(model.trainable_parameters())
        loss_fn = Objective.from_config(cfg).bind(model, models.logits_size(scfg))
        step = make_step(model, opt, loss_fn, cfg.train.grad_clip)

        def run(b, step=step, model=model, opt=opt):
            mx.eval(step(*b), model.parameters(), opt.state)

        run(batches[0])  # compile
        runs[name], blocks[name] = run, []
    for _ in range(rounds):
        for name, run in runs.items():
            restore = loop_memory() if name == "training loop" else (lambda: None)
            try:
                run(batches[0])
                f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                for b in batches[1:]:
                    run(b)
                blocks[name].append(((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                                     / steps, (time.perf_counter() - t0) / steps))
            finally:
                restore()
    return {name: {"minor_faults_per_step": round(statistics.median(f for f, _ in bl)),
                   "s_per_step": round(statistics.median(t for _, t in bl), 4)}
            for name, bl in blocks.items()}


def fresh_page_faults(overrides: list[str]) -> dict:
    """page_faults() in a fresh process: what malloc does with a block depends on what the
    process did before (the benchmark's own runs), as a training run starts fresh."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--page-faults",
                          *overrides], cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mlx_lm_cmd(model: str, data: str, mode: str, iters: int, cfg, out: str) -> list[str]:
    t = cfg.train
    return [sys.executable, "-m", "mlx_lm", "lora", "--train", "--model", model,
            "--data", data, "--fine-tune-type", mode, "--num-layers", "-1",
            "--batch-size", str(t.batch_size), "--max-seq-length", str(cfg.data.seq_len),
            "--iters", str(iters), "--steps-per-report", str(t.report_every),
            "--steps-per-eval", str(10 ** 9), "--val-batches", "1",
            "--save-every", str(10 ** 9), "--optimizer", "adamw",
            "--learning-rate", str(t.lr), "--adapter-path", out]


def ours_cmd(model: str, mode: str, iters: int, overrides: list[str], out: str) -> list[str]:
    return [sys.executable, "-c", "from mlxdistill.cli import main; main()", "train",
            *BASE, *overrides, f"student.model={model}", f"train.mode={mode}",
            f"train.iters={iters}", f"train.eval_every={10 ** 9}",
            f"train.save_every={10 ** 9}", f"run.dir={out}"]


def measure(iters: tuple[int, int] = (20, 80), repeats: int = 3,
            modes: tuple[str, ...] = ("full", "lora"), overrides: list[str] | None = None,
            work: str = "build/bench_wall", log=print) -> dict:
    from mlxdistill import api
    from mlxdistill.config import load_config

    overrides = list(overrides or [])
    cfg = load_config(None, BASE + overrides)
    api.build_cache(cfg, quiet=True, log=log)  # before any timing: no teacher pass is timed
    work = os.path.join(ROOT, work)
    model = float32_copy(os.path.join(ROOT, cfg.student.model), os.path.join(work, "student"))
    data = data_folder(os.path.join(ROOT, cfg.data.train), os.path.join(ROOT, cfg.data.valid),
                       os.path.join(work, "data"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    blas = [p for p in _OPENBLAS if os.path.exists(p)]
    lm_env = dict(env, LD_PRELOAD=blas[0]) if sys.platform.startswith("linux") and blas else env
    lo, hi = iters
    runs: dict = {}
    for r in range(repeats):
        # Alternate which length goes first, so a drift in load does not favour one.
        order = (lo, hi) if r % 2 == 0 else (hi, lo)
        for mode in modes:
            for tool in ("mlx_lm", "mlxdistill"):
                for n in order:
                    with tempfile.TemporaryDirectory(dir=work) as out:
                        if tool == "mlx_lm":
                            cmd = mlx_lm_cmd(model, data, mode, n, cfg, out)
                            pat = re.compile(rf"^\s*{n}\s+[0-9.]+\s")  # its train-loss row
                            res = timed(cmd, lm_env, pat.match, False, 3600)
                        else:
                            cmd = ours_cmd(model, mode, n, overrides, out)
                            res = timed(cmd, env, lambda s, n=n: s.startswith(f"step {n}/{n}:"),
                                        True, 3600)
                    runs.setdefault(f"{tool} {mode}", {}).setdefault(n, []).append(res)
                    log(f"round {r + 1}/{repeats}: {tool} {mode} {n} iterations: "
                        f"{res['to_last_step_s']:.2f} s to the last step")
    import mlx.core as mx
    import mlx_lm

    out = {"iters": [lo, hi], "repeats": repeats, "batch_size": cfg.train.batch_size,
           "seq_len": cfg.data.seq_len, "date": time.strftime("%Y-%m-%d %H:%M"),
           "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "runs": {}, "ratios": {}}
    for key, by_n in runs.items():
        per_round = [(b["to_last_step_s"] - a["to_last_step_s"]) / (hi - lo)
                     for a, b in zip(by_n[lo], by_n[hi])]
        out["runs"][key] = {"s_per_iter": round(statistics.median(per_round), 4),
                            "rounds_s_per_iter": [round(x, 4) for x in per_round],
                            f"to_last_step_s_{lo}": [round(x["to_last_step_s"], 2)
                                                     for x in by_n[lo]],
                            f"to_last_step_s_{hi}": [round(x["to_last_step_s"], 2)
                                                     for x in by_n[hi]]}
    for mode in modes:
        a, b = out["runs"][f"mlx_lm {mode}"], out["runs"][f"mlxdistill {mode}"]
        # > 1: mlxdistill takes less wall time per iteration than mlx_lm
        per_round = [x / y for x, y in zip(a["rounds_s_per_iter"], b["rounds_s_per_iter"])]
        out["ratios"][mode] = {"speed_vs_mlx_lm": round(a["s_per_iter"] / b["s_per_iter"], 3),
                               "rounds": [round(x, 3) for x in per_round]}
    return out


def lines(w: dict) -> list[str]:
    """The markdown section for bench.md."""
    lo, hi = w["iters"]
    out = [f"Wall clock, the command lines as a user runs them ({w['date']}): seconds per "
           f"iteration = (t({hi}) - t({lo})) / {hi - lo}, t from launch to the line reporting "
           f"the last step, batch {w['batch_size']} x {w['seq_len']}, the same float32 "
           f"student, median of {w['repeats']} round-robin rounds; mlxdistill from a prebuilt "
           "sampled cache (KD), mlx_lm plain CE.", "",
           "| run | s / iteration | rounds | speed × mlx_lm |", "|---|---|---|---|"]
    for key, r in w["runs"].items():
        tool, mode = key.split(" ")
        ratio = ("1.00" if tool == "mlx_lm" else
                 f"{w['ratios'][mode]['speed_vs_mlx_lm']:.2f} "
                 f"({', '.join(f'{x:.2f}' for x in w['ratios'][mode]['rounds'])})")
        rounds = ", ".join(f"{x:.3f}" for x in r["rounds_s_per_iter"])
        out.append(f"| `{'mlx_lm.lora' if tool == 'mlx_lm' else 'mlxdistill train'}` "
                   f"{mode} | {r['s_per_iter']:.3f} | {rounds} | {ratio} |")
    return out


def fault_lines(pf: dict) -> list[str]:
    """The page-fault sentence for bench.md."""
    d, t = pf["default"], pf["training loop"]
    return [f"One compiled full fine-tune step on cached batches, in a fresh process, the two "
            f"settings taking turns: {d['minor_faults_per_step']:,} minor page faults and "
            f"{d['s_per_step']:.3f} s with MLX's default cache of freed buffers, "
            f"{t['minor_faults_per_step']:,} and {t['s_per_step']:.3f} s as the training loop "
            "runs it (freed buffers kept for reuse)."]


def main() -> None:
    from mlxdistill import files

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, nargs=2, default=[20, 80], metavar=("SHORT", "LONG"))
    ap.add_argument("--repeats", type=int, default=3, help="round-robin rounds")
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--out", default="results")
    ap.add_argument("--page-faults", action="store_true",
                    help="only print page_faults() as JSON (measure runs it in a fresh process)")
    ap.add_argument("overrides", nargs="*", help="mlxdistill KEY=VALUE overrides")
    args = ap.parse_args()
    if args.page_faults:
        from mlxdistill.config import load_config

        print(json.dumps(page_faults(load_config(None, BASE + args.overrides))))
        return
    lo, hi = args.iters
    if not 0 < lo < hi:
        ap.error(f"--iters needs 0 < SHORT < LONG, got {lo} {hi}")
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    w = measure((lo, hi), args.repeats, tuple(args.modes), args.overrides)
    faults = fresh_page_faults(args.overrides)
    import bench

    path = os.path.join(args.out, "bench.json")
    res = {}
    if os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
    res["wall_clock"], res["page_faults"] = w, faults
    os.makedirs(args.out, exist_ok=True)
    files.atomic_json(path, res)
    bench.write_markdown(res, os.path.join(args.out, "bench.md"))
    print("\n".join(lines(w) + [""] + fault_lines(faults)))


if __name__ == "__main__":
    main()
