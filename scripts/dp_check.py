"""How close two data-parallel ranks come to one process, and why they differ at all.

    python scripts/dp_check.py                       # the default config, 30 steps
    python scripts/dp_check.py --steps 1,5,30 train.mode=lora

Three runs train the same student from the same cache with the same global batch B:

- `one`:   one process, `train.grad_accum=1` (the fused step: gradient of the mean over B rows);
- `accum`: one process, `train.grad_accum=2` (two halves of B/2 rows, token-weighted sums
           added, then divided by the tokens): the arithmetic the ranks do, without ranks;
- `two`:   `mlx.launch -n 2 --backend ring`, B/2 rows per rank, gradients all-reduced.

Checkpoints at every step hold the weights and AdamW's moments. After step 1 the first
moment is m = (1 - beta1) g, so it gives back the (clipped) step-1 gradient of each run.
Per pair of runs this reports, at each of `--steps`: the largest weight difference, how
many parameters differ by more than 1e-5, and for step 1 how far the gradients and the
first updates are apart. `two` against `accum` isolates the ranks (row assignment,
normalisation, clipping, the all-reduce); `accum` against `one` is the float32 summation
order of the gradient; `two` against `one` is what a user sees.

Writes results/dp_check.json; the runs (a checkpoint at every step) are removed unless
--keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import mlxdistill  # noqa: E402,F401  (OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402

from mlxdistill.config import load_config  # noqa: E402

THRESHOLD = 1e-5  # weight differences above this are counted
PAIRS = (("two", "one"), ("two", "accum"), ("accum", "one"))


def overrides_for(args, run: str) -> list[str]:
    steps = max(args.steps)
    return [*args.overrides, f"run.dir={os.path.join(args.dir, run)}",
            f"train.iters={steps}", "train.save_every=1", f"train.keep_checkpoints={steps}",
            f"train.eval_every={steps}", f"train.report_every={steps}",
            f"train.grad_accum={2 if run == 'accum' else 1}"]


def worker(overrides: list[str]) -> None:
    from mlxdistill import api

    api.fit(load_config(None, overrides), quiet=True, log=lambda m: None)


def train(args, run: str) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *overrides_for(args, run)]
    if run == "two":
        launcher = shutil.which("mlx.launch")
        if not launcher:
            sys.exit("mlx.launch not found; it ships with mlx")
        cmd = [launcher, "-n", "2", "--backend", "ring", "--", *cmd]
    shutil.rmtree(os.path.join(args.dir, run), ignore_errors=True)
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"run {run} failed:\n{p.stdout}{p.stderr}")
    return time.time() - t0


def checkpoint(args, run: str, step: int) -> tuple[dict, dict]:
    d = os.path.join(args.dir, run, "checkpoints", f"step-{step:06d}")
    w = {k: np.array(v) for k, v in mx.load(os.path.join(d, "weights.safetensors")).items()}
    o = {k: np.array(v) for k, v in mx.load(os.path.join(d, "optimizer.safetensors")).items()}
    return w, o


def max_dw(args, a: str, b: str, step: int) -> float:
    wa, wb = checkpoint(args, a, step)[0], checkpoint(args, b, step)[0]
    return float(max(np.abs(wa[k] - wb[k]).max() for k in wa))


def final_metrics(args, run: str) -> dict:
    """The last line of a run's metrics.jsonl: training loss and validation scores."""
    with open(os.path.join(args.dir, run, "metrics.jsonl")) as f:
        rec = json.loads(f.read().splitlines()[-1])
    return {k: rec[k] for k in ("step", "loss", "kd", "val_kl", "val_ce", "val_agree")
            if k in rec}


def moment(opt: dict, name: str, which: str) -> np.ndarray:
    """AdamW's moment `which` ("m" or "v") of parameter `name` in a flattened state."""
    return opt[f"{name}.{which}"]


def compare(a: tuple, b: tuple, first: bool, beta1: float) -> dict:
    (wa, oa), (wb, ob) = a, b
    diff = {k: np.abs(wa[k] - wb[k]) for k in wa}
    n = sum(d.size for d in diff.values())
    worst = max(diff, key=lambda k: diff[k].max())
    i = np.unravel_index(int(diff[worst].argmax()), diff[worst].shape)
    out = {"max_abs_dw": float(diff[worst].max()),
           "above_threshold": int(sum((d > THRESHOLD).sum() for d in diff.values())),
           "params": int(n), "bitwise_equal": all(not d.any() for d in diff.values()),
           "worst_tensor": worst,
           # AdamW divides by sqrt(v): a parameter whose v is small amplifies differences.
           "worst_v": float(moment(oa, worst, "v")[i]),
           "median_v": float(np.median(np.concatenate(
               [moment(oa, k, "v").ravel() for k in wa])))}
    by_tensor = {k: int((d > THRESHOLD).sum()) for k, d in diff.items() if (d > THRESHOLD).any()}
    out["above_threshold_by_tensor"] = dict(sorted(by_tensor.items(), key=lambda kv: -kv[1]))
    if first:
        # m = (1 - beta1) g after one step, so g = m / (1 - beta1) is the clipped gradient.
        ga = {k: moment(oa, k, "m") / (1 - beta1) for k in wa}
        gb = {k: moment(ob, k, "m") / (1 - beta1) for k in wa}
        dg = {k: np.abs(ga[k] - gb[k]) for k in wa}
        norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in ga.values()))
        dnorm = np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in dg.values()))
        gmax = max(float(np.abs(g).max()) for g in ga.values())
        # Elementwise relative difference where the gradient is not itself rounding noise.
        floor = 1e-3 * gmax
        rel = max(float((dg[k] / np.abs(ga[k]))[np.abs(ga[k]) > floor].max(initial=0.0))
                  for k in wa)
        out["grad"] = {"max_abs_dg": max(float(d.max()) for d in dg.values()),
                       "max_abs_g": gmax, "rel_norm": dnorm / norm,
                       "max_rel_above_1e-3_of_max": rel,
                       # The first AdamW update is lr g / (|g| + eps): a sign, except where
                       # |g| is near eps; the largest weight difference sits where g is.
                       "g_at_worst_dw": [float(ga[worst][i]), float(gb[worst][i])]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="1,5,30", help="steps to compare (comma-separated)")
    ap.add_argument("--dir", default=os.path.join(ROOT, "runs", "dp_check"),
                    help="where the three runs are written")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "dp_check.json"))
    ap.add_argument("--keep", action="store_true",
                    help="keep the runs (a checkpoint per step each) after comparing them")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = ap.parse_args()
    if args.worker:
        worker(args.overrides)
        return
    args.steps = sorted({int(s) for s in args.steps.split(",")})
    cfg = load_config(None, overrides_for(args, "one"))
    if cfg.train.batch_size % 2:
        sys.exit(f"train.batch_size={cfg.train.batch_size} must be even to split over 2 ranks")
    # `one` builds the cache if it is missing, so that the other runs only read it.
    seconds = {run: round(train(args, run), 1) for run in ("one", "accum", "two")}
    ckpt = {(run, s): checkpoint(args, run, s) for run in seconds for s in args.steps}
    last = max(args.steps)
    beta1 = optim.AdamW(learning_rate=0.0).betas[0]  # the trainer's AdamW uses the defaults
    res = {"config": {"mode": cfg.train.mode, "batch_size": cfg.train.batch_size,
                      "seq_len": cfg.data.seq_len, "lr": cfg.train.lr,
                      "warmup": cfg.train.warmup, "grad_clip": cfg.train.grad_clip,
                      "student": cfg.student.model, "cache": cfg.cache.dir},
           "threshold": THRESHOLD, "machine": platform.machine(), "mlx": mx.__version__,
           "seconds": seconds,
           "command": " ".join(["python scripts/dp_check.py",
                                f"--steps {','.join(map(str, args.steps))}", *args.overrides]),
           "final_metrics": {run: final_metrics(args, run) for run in seconds},
           "pairs": {f"{a}-{b}": {str(s): compare(ckpt[a, s], ckpt[b, s], s == 1, beta1)
                                  for s in args.steps} for a, b in PAIRS},
           # Every step, to show how the difference grows.
           "max_abs_dw_by_step": {f"{a}-{b}": [max_dw(args, a, b, s) for s in range(1, last + 1)]
                                  for a, b in PAIRS}}
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    for pair, by_step in res["pairs"].items():
        for s, r in by_step.items():
            g = r.get("grad")
            print(f"{pair:10s} step {s:>3s}: max |dw| {r['max_abs_dw']:.3g}, "
                  f"{r['above_threshold']} of {r['params']:,} above {THRESHOLD:g}"
                  + (f"; step-1 gradient: max |dg| {g['max_abs_dg']:.3g} (max |g| "
                     f"{g['max_abs_g']:.3g}), relative norm {g['rel_norm']:.3g}" if g else ""))


if __name__ == "__main__":
    main()
