"""What packing prompt/completion records across rows costs: the specialist student trained
on the gold worked solutions with `data.packing` stream (records run on, so most problems
straddle two rows and their second part is trained without the problem it solves) and auto
(every problem whole in one row, the rest of the row padding), all else equal.

    python scripts/packing.py                      # results/packing.json
    python scripts/packing.py --seq-len 128 train.iters=500

Both runs train the same student the same number of steps of the same number of rows and are
scored as `scripts/specialist.py` scores its variants (task accuracy on data/task/test.jsonl,
greedy; test CE is left out, as each run packs the test set its own way) and by their
training CE over the last reports. Rerunning skips finished runs; an interrupted one
resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mlxdistill  # noqa: E402,F401  (OpenBLAS before mlx)
from mlxdistill import api  # noqa: E402
from mlxdistill.config import load_config  # noqa: E402
from mlxdistill.files import atomic_json  # noqa: E402


def end_train_ce(run_dir: str, last: int = 10) -> float:
    """Mean training CE of the last `last` reports: what the packing leaves unlearnable."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        ces = [r["ce"] for r in map(json.loads, f) if "ce" in r]
    return round(sum(ces[-last:]) / len(ces[-last:]), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/specialist.yaml")
    ap.add_argument("--gold", default="data/task/train.jsonl")
    ap.add_argument("--seq-len", type=int, default=128,
                    help="row length; 128 holds one problem and half of the next")
    ap.add_argument("--runs", default="runs/packing")
    ap.add_argument("--results", default="results")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    path = os.path.join(args.results, "packing.json")
    identity = {"gold": args.gold, "seq_len": args.seq_len, "overrides": args.overrides}
    saved = json.load(open(path)) if os.path.exists(path) else {}
    res = saved if all(saved.get(k) == v for k, v in identity.items()) else {**identity}

    def run_dir(packing: str) -> str:
        return os.path.join(args.runs, f"{packing}-{args.seq_len}")
    for packing in ("stream", "auto"):
        if packing in res:
            continue
        ov = {"data.train": args.gold, "data.seq_len": args.seq_len, "data.packing": packing,
              "loss.alpha": 1.0, "run.dir": run_dir(packing),
              "cache.dir": os.path.join(args.runs, f"cache-{packing}-{args.seq_len}")}
        cfg = load_config(args.config, [f"{k}={v}" for k, v in ov.items()] + args.overrides)
        print(f"== data.packing={packing}, seq_len {args.seq_len}", flush=True)
        t0 = time.time()
        out = api.train(cfg, quiet=True, log=print)
        task = out["task"]
        res[packing] = {"task_accuracy": task["student_after"]["accuracy"],
                        "teacher_accuracy": task["teacher"]["accuracy"],
                        "retention": task["retention"]["student_after"],
                        "wall_s": round(time.time() - t0)}
        os.makedirs(args.results, exist_ok=True)
        atomic_json(path, res)
    for packing in ("stream", "auto"):
        r = res[packing]
        r["train_ce_end"] = end_train_ce(run_dir(packing))
        print(f"{packing:>6}: task accuracy {r['task_accuracy']:.3f} "
              f"(retention {r['retention']} %), training CE at the end {r['train_ce_end']}")
    atomic_json(path, res)


if __name__ == "__main__":
    main()
