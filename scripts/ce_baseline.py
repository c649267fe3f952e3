"""Distillation vs. plain cross-entropy: the same student, data, steps, seed and schedule.

    python scripts/ce_baseline.py                       # the embedded default
    python scripts/ce_baseline.py -c configs/lora.yaml  # any config, plus KEY=VALUE overrides

Runs the config as given (distillation, reusing its run if already finished) and again with
loss.alpha=1 (hard-label CE only, teacher unused) into RUN_DIR-ce, evaluates both against the
live teacher on data.test, and writes --out (default results/ce_baseline.json) with the
markdown table that README.md shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mlxdistill  # noqa: E402,F401  (OpenBLAS before mlx)
from mlxdistill import api  # noqa: E402
from mlxdistill.config import load_config  # noqa: E402

METRICS = [("ce", "held-out CE (nats)"), ("kl", "KL(teacher‖student)"),
           ("agree_top1", "top-1 agreement"), ("accuracy", "next-token accuracy")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", default=None)
    ap.add_argument("--out", default="results/ce_baseline.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    kd_cfg = load_config(args.config, args.overrides)
    ce_cfg = dataclasses.replace(
        kd_cfg, loss=dataclasses.replace(kd_cfg.loss, alpha=1.0),
        run=dataclasses.replace(kd_cfg.run, dir=kd_cfg.run.dir.rstrip("/") + "-ce"))
    results, times = {}, {}
    for name, cfg in (("distilled", kd_cfg), ("plain_ce", ce_cfg)):
        print(f"== {name}: {cfg.run.dir}", flush=True)
        t0 = time.time()
        results[name] = api.train(cfg, quiet=True, log=print)
        times[name] = round(time.time() - t0, 1)
    kd, ce = results["distilled"], results["plain_ce"]
    rows = ["| student | " + " | ".join(label for _, label in METRICS) + " |",
            "|---|" + "---|" * len(METRICS)]
    for label, res in (("teacher", kd["teacher"]), ("before training", kd["student_before"]),
                       (f"plain CE, {kd_cfg.train.iters} steps", ce["student_after"]),
                       (f"distilled, {kd_cfg.train.iters} steps", kd["student_after"])):
        rows.append(f"| {label} | " + " | ".join(
            "-" if k not in res else f"{res[k]:.3f}" for k, _ in METRICS) + " |")
    table = "\n".join(rows)
    out = {"config": args.config or "configs/default.yaml", "overrides": args.overrides,
           "data": kd["data"], "tokens": kd["tokens"], "teacher": kd["teacher"],
           "before": kd["student_before"], "plain_ce": ce["student_after"],
           "distilled": kd["student_after"], "wall_s": times, "table": table}
    path = args.out
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(path + ".tmp", path)
    print(table)
    gap = ce["student_after"]["ce"] - kd["teacher"]["ce"]
    print(f"\nteacher CE is {gap:.3f} nats below what plain CE reaches in this budget")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
