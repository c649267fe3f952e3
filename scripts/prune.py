"""Students cut from the teacher against students of the same shape from scratch, on the
embedded pairs, each distilled with its recipe's data, steps, schedule and seed and
evaluated on held-out data against the live teacher.

    python scripts/prune.py                  # every row (a rerun skips finished runs)
    python scripts/prune.py --only random,timing

Rows (ROWS): weights/teacher pruned to weights/student's shape (4 x 128, ~10x fewer
parameters) by its activations and at random (the control), against the shipped student
(briefly CE-pretrained from scratch: the default run, runs/default); at half and a quarter
of the teacher's parameters (prune.target_params) the pruned student against one of its
shape from scratch with the shipped student's pre-training (scripts/build_weights.py's
recipe); the ablation at ~5.1 M parameters (depth only, width only, both, both at random);
and the task specialist's teacher pruned to its shipped student's sizes on the teacher's
verified chains, distilled by configs/specialist.yaml (task accuracy on data/task's test
problems). `timing` measures, back to back in one process, what making each student costs:
pruning against the CE pre-training from scratch, and a distillation step of that shape,
which turns the difference into steps (the equal-wall-time comparison). Columns: held-out
CE, KL to the teacher, top-1 agreement and next-token accuracy retention, before and after
distillation. Results go to results/prune.json after every row and the tables to
results/prune.md.
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
# The ablation at one ratio, ~5.1 M parameters (42 % of the teacher) in each row: the shapes
# where a depth-only cut (2 of 6 blocks) can be matched by a width-only one (all 6 blocks,
# 4 of 6 heads, MLP cut further) and by both (4 blocks, 5 of 6 heads).
ABLATION = {
    "depth": {"prune.num_hidden_layers": 2},
    "width": {"prune.hidden_size": 256, "prune.num_attention_heads": 4,
              "prune.intermediate_size": 538},
    "both": {"prune.num_hidden_layers": 4, "prune.hidden_size": 320,
             "prune.num_attention_heads": 5, "prune.intermediate_size": 563},
}
# The task specialist: its teacher (4 x 256, 3.41 M) cut to the shipped specialist student's
# sizes (3 blocks x 96, 2 heads, MLP 256; 1/9 of the teacher with the teacher's head size),
# importance measured on the teacher's own verified chains, then distilled by
# configs/specialist.yaml's recipe (chains + cached distributions).
SPECIALIST = {"prune.num_hidden_layers": 3, "prune.hidden_size": 96,
              "prune.intermediate_size": 256, "prune.num_attention_heads": 2,
              "prune.num_key_value_heads": 2}
SPEC_CONFIG = "configs/specialist.yaml"
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
    "depth": "ablation, 5.1 M: depth only (2 of 6 blocks by Block Influence)",
    "width": "ablation, 5.1 M: width only (6 blocks; 4 of 6 heads, 256 of 384 channels, MLP "
             "538 of 1024)",
    "both": "ablation, 5.1 M: depth and width (4 blocks; 5 heads, 320 channels, MLP 563)",
    "both_random": "ablation, 5.1 M: depth and width at random (control)",
    "specialist": "task specialist: its teacher pruned to the shipped specialist student's "
                  "sizes on the teacher's chains, then chains + cached distributions",
}
PRUNED = {"activation": {**SHAPE, "prune.method": "activation"},
          "random": {**SHAPE, "prune.method": "random"},
          "activation_2x": {**HALF, "prune.method": "activation"},
          "activation_4x": {**QUARTER, "prune.method": "activation"},
          "depth": {**ABLATION["depth"], "prune.method": "activation"},
          "width": {**ABLATION["width"], "prune.method": "activation"},
          "both": {**ABLATION["both"], "prune.method": "activation"},
          "both_random": {**ABLATION["both"], "prune.method": "random"},
          "specialist": {**SPECIALIST, "prune.method": "activation"}}


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


def timing(extra: list[str], out: dict) -> dict:
    """What making each student costs, measured back to back in one process so the load on
    the machine is alike: pruning the teacher (activation importance on data.train's rows,
    into a fresh folder) against the brief CE pre-training of the same shape from scratch
    (build_weights.py's recipe, into a fresh work folder); and the shape's distillation
    step (30 steps of the default run's batch), which converts the difference into steps.
    Entries already in `out` are kept."""
    import tempfile

    import build_weights as bw

    tok = bw.token_stream("weights/student", "data/train.jsonl")
    for name in ("activation", "activation_2x", "activation_4x"):
        have = out.setdefault(name, {})
        if "ce_pretrain_s" in have and "distil_ms_per_step" in have:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            pruned = os.path.join(tmp, "pruned")
            pcfg = load_config("configs/default.yaml", overrides(PRUNED[name]) + extra)
            t0 = time.time()
            r = api.prune(pcfg, pruned, quiet=True, log=lambda m: None)
            prune_s = time.time() - t0
            if "ce_pretrain_s" not in have:
                shape = {k: r["shape_after"][k] for k in (
                    "hidden_size", "num_hidden_layers", "intermediate_size",
                    "num_attention_heads")}
                t0 = time.time()
                bw.train_model("timing", {**bw.MODELS["student"], **shape}, tok, None,
                               os.path.join(tmp, "work"))
                have.update(prune_s=round(prune_s, 1),
                            ce_pretrain_s=round(time.time() - t0, 1))
            run_dir = os.path.join(tmp, "run")
            cfg = load_config("configs/default.yaml", [
                *extra, f"student.model={pruned}", f"run.dir={run_dir}", "train.iters=30",
                "train.report_every=5", "train.eval_every=1000", "train.save_every=1000",
                "train.final_eval=false"])
            api.train(cfg, quiet=True, log=lambda m: None)
            have["distil_ms_per_step"] = step_ms(run_dir, cfg.train.batch_size *
                                                 cfg.data.seq_len, skip_first=True)
        print(f"   {name}: prune {have['prune_s']} s, CE pre-training "
              f"{have['ce_pretrain_s']} s, distillation step {have['distil_ms_per_step']} ms",
              flush=True)
    return out


def overrides(d: dict) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


def specialist_base(extra: list[str]) -> list[str]:
    """configs/specialist.yaml's overrides for the specialist row: the teacher's verified
    chains (written once by `mlxdistill generate`, resumable) as data.train, so the pruning
    measures importance on the task, and a cache and run of its own."""
    chains = os.path.join(OUT, "specialist-chains.jsonl")
    base = [f"generate.out={chains}", f"data.train={chains}",
            f"cache.dir={os.path.join(OUT, 'specialist-cache')}", *extra]
    api.generate(load_config(SPEC_CONFIG, base), quiet=True, log=lambda m: None)
    return base


def row(name: str, extra: list[str]) -> dict:
    prune_s, pruned = 0.0, None
    config = SPEC_CONFIG if name == "specialist" else "configs/default.yaml"
    if name == "specialist":
        extra = specialist_base(extra)
    if name == "shipped":
        student, run_dir = "weights/student", "runs/default"
    elif name.startswith("scratch"):
        student = scratch_student(f"student-{name}", os.path.join(
            OUT, "student-" + name.replace("scratch", "activation")))
        run_dir = os.path.join(OUT, name)
    else:
        student = os.path.join(OUT, f"student-{name}")
        pcfg = load_config(config, overrides(PRUNED[name]) + extra)
        if not os.path.isfile(os.path.join(student, "prune.json")):
            t0 = time.time()
            api.prune(pcfg, student, force=True, quiet=True, log=lambda m: None)
            prune_s = time.time() - t0
        with open(os.path.join(student, "prune.json")) as f:
            pruned = json.load(f)
        run_dir = os.path.join(OUT, name)
    cfg = load_config(config, [*extra, f"student.model={student}", f"run.dir={run_dir}"])
    t0 = time.time()
    res = api.train(cfg, quiet=True, log=lambda m: None)
    train_s = time.time() - t0
    out = {"label": ROWS[name], "student": cfg.student.model, "iters": cfg.train.iters,
           "prune_s": round(prune_s, 1), "train_and_eval_s": round(train_s, 1),
           "ms_per_step": step_ms(run_dir, cfg.train.batch_size * cfg.data.seq_len),
           "params": pruned["params_after"] if pruned else None,
           "params_teacher": pruned["params_before"] if pruned else None,
           "shape": pruned["shape_after"] if pruned else None,
           "kept_blocks": pruned.get("kept_blocks") if pruned else None,
           "teacher": res["teacher"], "before": res["student_before"],
           "after": res["student_after"], "retention": res["retention"]}
    if res.get("task"):
        out["task"] = res["task"]
    return out


def step_ms(run_dir: str, step_tokens: int, skip_first: bool = False) -> float | None:
    """The median training step's wall time (ms), from the throughput in the run's
    metrics.jsonl (tok/s counts every position of a step's batch): pruned and from-scratch
    students of one shape step alike, so equal wall time is a matter of what making each
    student cost."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    recs = [json.loads(line) for line in open(path)][1 if skip_first else 0:]  # compiling
    rates = sorted(r["tok_per_s"] for r in recs if r.get("tok_per_s"))
    return round(1000 * step_tokens / rates[len(rates) // 2], 1) if rates else None


MAIN = ("activation", "random", "shipped", "activation_2x", "scratch_2x", "activation_4x",
        "scratch_4x")
ABLATION_ROWS = ("depth", "width", "both", "both_random")


# A student from scratch has the shape of the pruned one it is compared with.
SAME_SHAPE = {"shipped": "activation", "scratch_2x": "activation_2x",
              "scratch_4x": "activation_4x"}


def _params(rows: dict, name: str) -> str:
    p = rows[name].get("params") or rows.get(SAME_SHAPE.get(name), {}).get("params")
    return f"{p / 1e6:.2f} M" if p else "-"


def markdown(out: dict) -> str:
    head = ("| student | params | CE before → after | KL before → after | top-1 agreement "
            "after | accuracy retention after |", "|---|---|---|---|---|---|")
    lines = list(head)

    def add(name):
        r = out["rows"].get(name)
        if r:
            b, a = r["before"], r["after"]
            lines.append(f"| {r['label']} | {_params(out['rows'], name)} | {b['ce']:.3f} → {a['ce']:.3f} | "
                         f"{b['kl']:.3f} → {a['kl']:.3f} | {a['agree_top1']:.3f} | "
                         f"{r['retention']['student_after']['accuracy_pct']:.1f} % |")
    for name in MAIN:
        add(name)
    if any(n in out["rows"] for n in ABLATION_ROWS):
        lines += ["", "Ablation at one ratio (~5.1 M parameters, 42 % of the teacher):", "",
                  *head]
        for name in ABLATION_ROWS:
            add(name)
    spec = out["rows"].get("specialist")
    if spec and spec.get("task"):
        t = spec["task"]
        ref = _shipped_specialist()
        lines += ["", "| task specialist (held-out task accuracy) | params | teacher | "
                  "student after | retention |", "|---|---|---|---|---|",
                  f"| {spec['label']} | {_params(out['rows'], 'specialist')} of {spec['params_teacher'] / 1e6:.2f} "
                  f"M | {t['teacher']['accuracy']:.3f} | {t['student_after']['accuracy']:.3f} "
                  f"| {t['retention']['student_after']} % |"]
        if ref:
            lines.append(f"| shipped specialist student (0.33 M, from scratch), chains + "
                         f"cached distributions (results/specialist.json) | 0.33 M | "
                         f"{ref['teacher']['accuracy']:.3f} | "
                         f"{ref['student_after']['accuracy']:.3f} | "
                         f"{ref['retention']['student_after']} % |")
    tm = out.get("timing")
    if tm:
        lines += ["", "| making the student (one process, back to back) | pruning (s) | "
                  "CE pre-training from scratch (s) | distillation step (ms) | steps the "
                  "difference buys |", "|---|---|---|---|---|"]
        for name, scratch in (("activation", "shipped"), ("activation_2x", "scratch_2x"),
                              ("activation_4x", "scratch_4x")):
            if name not in tm or name not in out["rows"]:
                continue
            ms = tm[name].get("distil_ms_per_step")
            diff = tm[name]["ce_pretrain_s"] - tm[name]["prune_s"]
            buys = f"{1000 * diff / ms:.0f} for the pruned student" if ms and diff > 0 else \
                f"{-1000 * diff / ms:.0f} for the student from scratch" if ms else "-"
            lines.append(f"| {out['rows'][name]['label']} | {tm[name]['prune_s']} | "
                         f"{tm[name]['ce_pretrain_s']} | {ms or '-'} | {buys} |")
    return "\n".join(lines) + "\n"


def _shipped_specialist() -> dict | None:
    path = os.path.join(RESULTS, "specialist.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return (json.load(f).get("variants", {}).get("chains_kd") or {}).get("task")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    path = os.path.join(RESULTS, "prune.json")
    out = json.load(open(path)) if os.path.isfile(path) else {"rows": {}}
    out["overrides"] = args.overrides
    names = args.only.split(",") if args.only else [*ROWS, "timing"]
    if "timing" in names:
        print("== timing: making each student", flush=True)
        out["timing"] = timing(args.overrides, out.get("timing", {}))
        files.atomic_json(path, out)
    for name in (n for n in names if n != "timing"):
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
