"""Sampled n=16 vs online dense KD over several seeds: is their held-out CE gap noise?

    python scripts/seeds.py                 # seeds 0, 1, 2 (seed 0 reuses the ablation runs)
    python scripts/seeds.py --seeds 0 1 2 3

`run.seed` sets the data order and the training RNG; the cache (its draws) stays the default
one. Each run is a normal `mlxdistill train` under runs/seeds/, evaluated against the live
teacher on data.test; finished runs are reused. Writes results/seeds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mlxdistill  # noqa: E402,F401  (OpenBLAS before mlx)
from mlxdistill import api  # noqa: E402
from mlxdistill.config import load_config  # noqa: E402

VARIANTS = {"sample16": [], "online_dense": ["teacher.mode=online"]}
# Seed 0 of each variant is the run the ablation already made.
SEED0 = {"sample16": "runs/default", "online_dense": "runs/ablate/online_dense"}


def run_dir(name: str, seed: int) -> str:
    return SEED0[name] if seed == 0 else f"runs/seeds/{name}-s{seed}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    out = {}
    for seed in args.seeds:
        for name, extra in VARIANTS.items():
            d = run_dir(name, seed)
            path = os.path.join(d, "eval.json")
            if not os.path.exists(path):
                print(f"== {name}, seed {seed}", flush=True)
                api.train(load_config(None, extra + [f"run.seed={seed}", f"run.dir={d}"]),
                          quiet=True, log=print)
            with open(path) as f:
                out.setdefault(name, {})[seed] = json.load(f)["student_after"]["ce"]
    gaps = [100 * (out["sample16"][s] - out["online_dense"][s]) / out["online_dense"][s]
            for s in args.seeds]
    res = {"command": "python scripts/seeds.py --seeds " + " ".join(map(str, args.seeds)),
           "heldout_ce": out, "gap_percent": dict(zip(args.seeds, gaps)),
           "mean_gap_percent": round(statistics.mean(gaps), 3),
           "ce_mean": {k: round(statistics.mean(v.values()), 4) for k, v in out.items()},
           "ce_stdev": {k: round(statistics.stdev(v.values()), 4) if len(v) > 1 else None
                        for k, v in out.items()}}
    os.makedirs("results", exist_ok=True)
    with open("results/seeds.json.tmp", "w") as f:
        json.dump(res, f, indent=2)
    os.replace("results/seeds.json.tmp", "results/seeds.json")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
