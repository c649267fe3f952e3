"""Data-parallel communication per training step: LoRA against full fine-tuning of the
embedded student, over mx.distributed with two ranks.

    python scripts/bench_comm.py                 # starts `mlx.launch -n 2 --backend ring` itself
    python scripts/bench_comm.py --reps 50

Every step each rank sends and receives the gradients of the trainable parameters once (one
all-reduce, `nn.average_gradients`), so the volume per step is the size of the trainable
parameters, whatever the batch. Per mode this measures that volume, the all-reduce's median
and best time, and the local forward+backward of one rank's share of the default config's
global batch (the compute the all-reduce is added to). It also projects the all-reduce onto
nominal link speeds: a ring all-reduce over N ranks moves 2(N-1)/N times the gradient bytes
per rank.

Here both ranks run on one Linux box (2 cores, loopback TCP), so the all-reduce time is a
lower bound set by memory copies, and the two ranks' compute competes for the same cores:
the speed-up over one process is not measurable on one box. Writes results/comm.json and
results/comm.md (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import mlxdistill  # noqa: E402,F401  (OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlxdistill import losses, models, surgery  # noqa: E402
from mlxdistill.config import load_config  # noqa: E402
from mlxdistill.distributed import World  # noqa: E402

# Nominal link speeds (Gbit/s) for the projection; real throughput is lower.
LINKS = {"1 GbE": 1, "10 GbE": 10, "Thunderbolt 4 (40 Gb/s)": 40}


def timed(fn, reps: int, before=None) -> tuple[float, float]:
    """(median, best) seconds of fn() over `reps` runs after two warm-up runs; `before()`
    runs untimed ahead of each (a barrier, so that no rank's timing includes waiting for a
    straggler). On a busy machine the best run is the one least disturbed by other work."""
    for _ in range(2):
        fn()
    ts = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def measure(cfg, mode: str, world: World, reps: int) -> dict:
    t = cfg.train
    model, _, _ = models.load(cfg.student.model, "student")
    surgery.setup_training(model, mode, t.lora_rank, t.lora_layers, t.lora_scale,
                           t.lora_dropout)
    params = model.trainable_parameters()
    flat = tree_flatten(params)
    nbytes = sum(v.nbytes for _, v in flat)

    share = t.batch_size // world.size
    x = mx.random.randint(0, 4096, (share, cfg.data.seq_len))
    mask = mx.ones(x.shape)

    def loss_fn(m, x):
        logits = m(x)[:, :-1]
        return losses.ce_loss(logits, x[:, 1:], mask[:, 1:])[0]

    grad_fn = nn.value_and_grad(model, loss_fn)
    grads = grad_fn(model, x)[1]
    mx.eval(grads)
    compute = timed(lambda: mx.eval(grad_fn(model, x)), max(3, reps // 4))[0]

    def allreduce():
        mx.eval(nn.average_gradients(grads))

    comm, comm_best = timed(allreduce, reps, world.barrier)
    moved = 2 * (world.size - 1) / world.size * nbytes
    return {"trainable_params": int(sum(v.size for _, v in flat)),
            "grad_dtype": str(flat[0][1].dtype).replace("mlx.core.", ""),
            "grad_bytes_per_step": int(nbytes), "tensors": len(flat),
            "allreduce_ms": round(comm * 1e3, 3), "allreduce_ms_best": round(comm_best * 1e3, 3),
            "allreduce_gb_per_s": round(moved / comm / 1e9, 3),
            "compute_ms_per_rank": round(compute * 1e3, 2),
            "comm_fraction": round(comm / (comm + compute), 4),
            "projected_allreduce_ms": {k: round(moved * 8 / (g * 1e9) * 1e3, 3)
                                       for k, g in LINKS.items()}}


def worker(args) -> None:
    world = World()
    cfg = load_config(None, args.overrides)
    res = {"ranks": world.size, "backend": "ring", "machine": platform.machine(),
           "cpus": os.cpu_count(), "one_box": True,
           # Other work on the box inflates every time here: note how busy it was.
           "load_avg_1min": round(os.getloadavg()[0], 2),
           "note": "both ranks on one Linux box over loopback TCP; compute shares the cores",
           "global_batch": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
           "lora_rank": cfg.train.lora_rank, "reps": args.reps,
           "command": " ".join(["python scripts/bench_comm.py"]
                               + [f"--reps {args.reps}"] * (args.reps != 30) + args.overrides),
           # One float32: the fixed cost of any collective on this link.
           "latency_ms_best": round(timed(lambda: mx.eval(mx.distributed.all_sum(
               mx.array(1.0))), args.reps, world.barrier)[1] * 1e3, 3),
           "modes": {m: measure(cfg, m, world, args.reps) for m in ("lora", "full")}}
    if not world.main:
        return
    lo, fu = res["modes"]["lora"], res["modes"]["full"]
    res["full_over_lora_bytes"] = round(fu["grad_bytes_per_step"] / lo["grad_bytes_per_step"], 1)
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    with open(os.path.join(ROOT, "results", "comm.json"), "w") as f:
        json.dump(res, f, indent=2)
    lines = ["| mode | trainable params | gradient bytes / step | all-reduce median / best "
             "(ms) | local fwd+bwd (ms) | comm share | at 10 GbE (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m, r in res["modes"].items():
        lines.append(f"| {m} | {r['trainable_params']:,} | {r['grad_bytes_per_step']:,} | "
                     f"{r['allreduce_ms']} / {r['allreduce_ms_best']} | "
                     f"{r['compute_ms_per_rank']} | "
                     f"{r['comm_fraction']:.1%} | {r['projected_allreduce_ms']['10 GbE']} |")
    with open(os.path.join(ROOT, "results", "comm.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = ap.parse_args()
    if args.worker or "MLX_RANK" in os.environ:
        worker(args)
        return
    launcher = shutil.which("mlx.launch")
    if not launcher:
        sys.exit("mlx.launch not found; it ships with mlx")
    cmd = [launcher, "-n", "2", "--backend", "ring", "--", sys.executable,
           os.path.abspath(__file__), "--worker", "--reps", str(args.reps), *args.overrides]
    sys.exit(subprocess.run(cmd, cwd=ROOT).returncode)


if __name__ == "__main__":
    main()
