"""The specialist benchmark: how much of the task teacher's held-out accuracy a student 10x
smaller keeps, by what it is trained on. Equal student, steps and seed for every variant.

    python scripts/make_task.py && python scripts/build_specialist.py   # data and weights
    python scripts/specialist.py                                        # every variant
    python scripts/specialist.py --only chains_kd train.iters=500       # overrides: all variants

Variants (configs/specialist.yaml is the recipe; the overrides below are what differ):
  gold_answers  the gold final answers only, no worked solution (cross-entropy)
  gold_chains   the gold worked solutions of data/task/train.jsonl (cross-entropy)
  chains        the teacher's own worked solutions, verified (`mlxdistill generate`), CE:
                sequence-level distillation
  chains_kd     the same chains plus the teacher's cached distributions on them
                (generate -> cache -> train): sequence- and token-level distillation

Each variant is a `mlxdistill train` run under RUNS/NAME evaluated on data.test, whose records
carry reference answers, so eval reports task accuracy (greedy) for teacher and student and
the retention. Results go to RESULTS/specialist.json after every variant (a rerun skips
finished ones, and an interrupted training run resumes from its checkpoint) and the markdown
table to RESULTS/specialist.md.
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
from mlxdistill.files import atomic_json, sha256_file  # noqa: E402
from mlxdistill.data import read_jsonl  # noqa: E402
from mlxdistill.generate import small_weights_sha256  # noqa: E402
from mlxdistill.models import model_fingerprint  # noqa: E402

CONFIG = "configs/specialist.yaml"
CE_ONLY = {"loss.alpha": 1.0}
VARIANTS = {
    "gold_answers": ("gold final answers only", "answers", CE_ONLY),
    "gold_chains": ("gold worked solutions", "gold", CE_ONLY),
    "chains": ("teacher's verified chains (sequence-level KD)", "chains", CE_ONLY),
    "chains_kd": ("chains + cached teacher distributions", "chains", {}),
}


def answers_only(gold: str, out: str) -> str:
    """The gold data with each worked solution dropped: the completion is the answer line
    alone, in the same "\\nAnswer: N\\n" form, so eval reads it the same way."""
    recs = read_jsonl(gold, lambda r: "prompt" in r and "answer" in r,
                      "a 'prompt' and an 'answer'")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        for r in recs:
            f.write(json.dumps({"prompt": r["prompt"], "completion": f"\nAnswer: {r['answer']}\n",
                                "answer": r["answer"]}) + "\n")
    os.replace(out + ".tmp", out)
    return out


def table(results: dict) -> str:
    rows = ["| student trained on | held-out task accuracy | retention of teacher accuracy | "
            "next-token CE on test | train wall (s) |", "|---|---|---|---|---|"]
    first = next(iter(results["variants"].values()))
    t = first["task"]
    rows.append(f"| (teacher) | {t['teacher']['accuracy']:.3f} | "
                f"{'100 %' if t['teacher']['accuracy'] else '-'} | "
                f"{first['teacher_ce']:.3f} | - |")
    rows.append(f"| (student before training) | {t['student_before']['accuracy']:.3f} | "
                f"{_pct(t['retention']['student_before'])} | {first['before_ce']:.3f} | - |")
    for name in VARIANTS:
        r = results["variants"].get(name)
        if r:
            a = r["task"]
            rows.append(f"| {r['label']} | {a['student_after']['accuracy']:.3f} | "
                        f"{_pct(a['retention']['student_after'])} | {r['after_ce']:.3f} | "
                        f"{r['wall_s']} |")
    return "\n".join(rows)


def _pct(v) -> str:
    return "- (teacher scores 0)" if v is None else f"{v} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--gold", default="data/task/train.jsonl", help="gold worked solutions")
    ap.add_argument("--runs", default="runs/specialist-bench")
    ap.add_argument("--results", default="results")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
    os.makedirs(args.results, exist_ok=True)
    rpath = os.path.join(args.results, "specialist.json")
    teacher = load_config(args.config, args.overrides).teacher.model
    # A rebuilt teacher keeps its config and file sizes, which is all a teacher fingerprint
    # looks at; the specialist is a few MB, so its weights are hashed, and its chains, runs
    # and results are kept apart by that hash.
    tsha = (small_weights_sha256(teacher) or model_fingerprint(teacher))[:12]
    identity = {"overrides": args.overrides, "gold": args.gold, "teacher_weights": tsha}
    saved = json.load(open(rpath)) if os.path.exists(rpath) else {}
    same = all(saved.get(k) == v for k, v in identity.items())
    results = saved if same else {**identity, "variants": {}}
    chains = os.path.join(args.runs, f"chains-{tsha}.jsonl")
    base = load_config(args.config, [f"generate.out={chains}"] + args.overrides)
    train_files = {"gold": args.gold,
                   "answers": answers_only(args.gold, os.path.join(args.runs, "answers.jsonl"))}
    if any(VARIANTS[n][1] == "chains" for n in names):
        # The teacher writes the chains once (resumable, verified); both chain variants use them.
        manifest = api.generate(base, log=print)
        results["generate"] = {k: manifest[k] for k in ("prompts_total", "kept", "rejected",
                                                        "verifier_errors", "pass_rate")}
        if not manifest["kept"]:
            raise SystemExit(f"error: the verifier kept none of the teacher's "
                             f"{manifest['rejected']} chains; the teacher cannot solve the task "
                             "(train it longer: scripts/build_specialist.py)")
        train_files["chains"] = base.generate.out
    for name in names:
        if name in results["variants"]:
            continue
        label, data, extra = VARIANTS[name]
        # Run and cache directories are named by the teacher and the training file's content:
        # new chains get a fresh cache and run instead of a refused (or silently mixed) resume.
        tag = f"{name}-{tsha}-{sha256_file(train_files[data])[:12]}"
        ov = {"data.train": train_files[data], "run.dir": os.path.join(args.runs, tag),
              "cache.dir": os.path.join(args.runs, f"cache-{tag}"), **extra}
        cfg = load_config(args.config, args.overrides + [f"{k}={v}" for k, v in ov.items()])
        print(f"== {name}: {label}", flush=True)
        t0 = time.time()
        res = api.train(cfg, quiet=True, log=print)
        results["variants"][name] = {
            "label": label, "overrides": ov, "iters": cfg.train.iters, "task": res["task"],
            "teacher_ce": res["teacher"]["ce"], "before_ce": res["student_before"]["ce"],
            "after_ce": res["student_after"]["ce"], "wall_s": round(time.time() - t0)}
        atomic_json(rpath, results)
    if not results["variants"]:
        return
    md = table(results)
    gen = results.get("generate")
    if gen:
        md += (f"\n\nTeacher chains kept by the verifier: {gen['kept']} of "
               f"{gen['kept'] + gen['rejected']} (pass rate {gen['pass_rate']:.1%}).")
    with open(os.path.join(args.results, "specialist.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
