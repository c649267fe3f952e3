"""The cloud-fallback rule of a run, as `mlxdistill eval` fits and reports it, saved to results/.

    python scripts/fallback_check.py                  # the specialist's student before distillation
    python scripts/fallback_check.py --run runs/lora  # any finished run

Without --run it evaluates the embedded task specialist's student as it is before any
distillation (weights/specialist/student, 0 % task accuracy) against its teacher on
data/task (configs/specialist.yaml: rule fitted on the 300 records of valid.jsonl, reported
on the 500 of test.jsonl): the case where a rule graded by anything but the task, or scored
on the examples that chose it, would promise more than the system delivers. Writes
results/fallback_NAME.json (eval.json's `fallback` without the per-example lists and the
curves' points, and the task accuracies) and results/fallback_NAME.png (the deferral plot).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import mlxdistill  # noqa: F401  (OpenBLAS before mlx)
from mlxdistill import api
from mlxdistill.rundir import RunDir


def specialist_before(run_dir: str) -> str:
    """A run directory whose trained student is the specialist's student untouched."""
    cfg = api.load_config(os.path.join(ROOT, "configs", "specialist.yaml"),
                          [f"run.dir={run_dir}"])
    run = RunDir(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    run.save_config(cfg)
    shutil.copytree(os.path.join(ROOT, "weights", "specialist", "student"), run.model)
    return run_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="a finished run (default: the specialist's student before "
                                  "distillation, in runs/fallback-specialist-before)")
    ap.add_argument("--name", help="results/fallback_NAME.* (default: the run's folder name)")
    args = ap.parse_args()
    os.chdir(ROOT)  # the config's relative paths
    run_dir = args.run or specialist_before(os.path.join("runs", "fallback-specialist-before"))
    name = args.name or ("specialist_before" if not args.run
                         else os.path.basename(os.path.normpath(run_dir)))
    res = api.evaluate(run_dir, quiet=False, log=print)
    fb = {k: v for k, v in res["fallback"].items() if k != "per_example"}
    # the curves are in the plot; the record keeps what they say about each signal
    fb["test"] = {**fb["test"], "curves": {s: {"gain_over_random": c["gain_over_random"]}
                                          for s, c in fb["test"]["curves"].items()}}
    out = {"run": run_dir, "task": res.get("task"), "fallback": fb}
    os.makedirs("results", exist_ok=True)
    with open(f"results/fallback_{name}.json", "w") as f:
        json.dump(out, f, indent=2)
    shutil.copyfile(os.path.join(RunDir(run_dir).plots, "deferral.png"),
                    f"results/fallback_{name}.png")
    print(f"wrote results/fallback_{name}.json and .png")


if __name__ == "__main__":
    main()
