"""Students cut from the teacher against the shipped student of the same shape, on the
embedded pair: weights/teacher pruned to weights/student's shape (4 blocks x 128, 2 heads,
MLP 320: ~10x fewer parameters) by the teacher's activations and at random (the control),
each distilled with the default run's data, steps, schedule and seed, evaluated on held-out
Hamlet against the live teacher.

    python scripts/prune.py                  # every row (a rerun skips finished runs)
    python scripts/prune.py --only random

Rows: the two pruned students and the shipped student (briefly CE-pretrained from scratch:
the default run, runs/default); at half and a quarter of the teacher's parameters
(prune.target_params), the pruned student and one of its shape from scratch with the shipped student's pre-training
(scripts/build_weights.py's recipe). Columns: held-out CE, KL to the teacher, top-1 agreement and
next-token accuracy retention, before and after distillation, and the wall time of pruning
plus training (equal steps; the shipped student's own pretraining is not counted). Results
go to results/prune.json after every row and the table to results/prune.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))  # build_weights, for the from-scratch students
import mlxdistill  # noqa: E402,F401  (OpenBLAS before mlx)
from mlxdistill import api, files  # noqa: E402
from mlxdistill.config import load_config  # noqa: E402

OUT = "runs/prune"
RESULTS = "results"
SHAPE = {"prune.num_hidden_layers": 4, "prune.hidden_size": 128,
         "prune.intermediate_size": 320, "prune.num_attention_heads": 2,
         "prune.num_key_value_heads": 2}
HALF = {"prune.target_params": 6_100_000}  # half the teacher's 12.19 M
QUARTER = {"prune.target_params": 3_050_000}
ROWS = {
    "activation": "teacher pruned to the student's shape by its activations (Minitron, "
                  "ShortGPT)",
    "random": "teacher pruned to the student's shape at random (control)",
    "shipped": "shipped student (CE-pretrained from scratch), the default run",
    "activation_2x": "teacher pruned to half its parameters (prune.target_params) by its "
                     "activations",
    "scratch_2x": "the same shape from scratch, CE-pretrained as the shipped student",
    "activation_4x": "teacher pruned to a quarter of its parameters by its activations",
    "scratch_4x": "the same shape from scratch, CE-pretrained as the shipped student",
}
PRUNED = {"activation": {**SHAPE, "prune.method": "activation"},
          "random": {**SHAPE, "prune.method": "random"},
          "activation_2x": {**HALF, "prune.method": "activation"},
          "activation_4x": {**QUARTER, "prune.method": "activation"}}


def scratch_student(name: str, like: str) -> str:
    """A student of the pruned folder `like`'s shape, from scratch, with the shipped
    student's brief CE pre-training (scripts/build_weights.py: MODELS["student"]'s steps,
    learning rate, warm-up and seed; the student's tokenizer)."""
    import build_weights as bw

    dest = os.path.join(OUT, name)
    if os.path.isfile(os.path.join(dest, "config.json")):
        return dest
    tok_dir = os.path.join(OUT, "tokenizer")
    if not os.path.isdir(tok_dir):
        with files.atomic_dir(tok_dir) as tmp:
            for f in os.listdir("weights/student"):
                if f.startswith("tokenizer"):
                    shutil.copy(os.path.join("weights/student", f), tmp)
    with open(os.path.join(like, "config.json")) as f:
        shape = {k: v for k, v in json.load(f).items() if k in (
            "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")}
    spec = {**bw.MODELS["student"], **shape}
    model = bw.train_model(name, spec, bw.token_stream(tok_dir, "data/train.jsonl"), None,
                           os.path.join(OUT, "work"))
    bw.export(name, spec, model, tok_dir, OUT)
    return dest


def overrides(d: dict) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


def row(name: str, extra: list[str]) -> dict:
    prune_s, pruned = 0.0, None
    if name == "shipped":
        student, run_dir = "weights/student", "runs/default"
    elif name.startswith("scratch"):
        student = scratch_student(f"student-{name}", os.path.join(
            OUT, "student-" + name.replace("scratch", "activation")))
        run_dir = os.path.join(OUT, name)
    else:
        student = os.path.join(OUT, f"student-{name}")
        pcfg = load_config("configs/default.yaml", overrides(PRUNED[name]) + extra)
        if not os.path.isfile(os.path.join(student, "prune.json")):
            t0 = time.time()
            api.prune(pcfg, student, force=True, quiet=True, log=lambda m: None)
            prune_s = time.time() - t0
        with open(os.path.join(student, "prune.json")) as f:
            pruned = json.load(f)
        run_dir = os.path.join(OUT, name)
    cfg = load_config("configs/default.yaml", [f"student.model={student}",
                                               f"run.dir={run_dir}", *extra])
    t0 = time.time()
    res = api.train(cfg, quiet=True, log=lambda m: None)
    train_s = time.time() - t0
    return {"label": ROWS[name], "student": cfg.student.model, "iters": cfg.train.iters,
            "prune_s": round(prune_s, 1), "train_and_eval_s": round(train_s, 1),
            "params": pruned["params_after"] if pruned else None,
            "shape": pruned["shape_after"] if pruned else None,
            "kept_blocks": pruned.get("kept_blocks") if pruned else None,
            "teacher": res["teacher"], "before": res["student_before"],
            "after": res["student_after"], "retention": res["retention"]}


def markdown(out: dict) -> str:
    lines = ["| student | CE before → after | KL before → after | top-1 agreement after | "
             "accuracy retention after |", "|---|---|---|---|---|"]
    for name in ROWS:
        if name not in out["rows"]:
            continue
        r = out["rows"][name]
        b, a = r["before"], r["after"]
        lines.append(f"| {r['label']} | {b['ce']:.3f} → {a['ce']:.3f} | {b['kl']:.3f} → "
                     f"{a['kl']:.3f} | {a['agree_top1']:.3f} | "
                     f"{r['retention']['student_after']['accuracy_pct']:.1f} % |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    path = os.path.join(RESULTS, "prune.json")
    out = json.load(open(path)) if os.path.isfile(path) else {"rows": {}}
    out["overrides"] = args.overrides
    for name in (args.only.split(",") if args.only else list(ROWS)):
        print(f"== {name}: {ROWS[name]}", flush=True)
        out["rows"][name] = row(name, args.overrides)
        files.atomic_json(path, out)
        a = out["rows"][name]["after"]
        print(f"   CE {a['ce']}  KL {a['kl']}  top-1 {a['agree_top1']}", flush=True)
    with files.atomic_path(os.path.join(RESULTS, "prune.md")) as tmp, open(tmp, "w") as f:
        f.write(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
