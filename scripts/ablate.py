"""Objective x target-mode ablation on the embedded pair: equal data, steps and seed.

    python scripts/ablate.py                      # every variant, the default's budget
    python scripts/ablate.py train.iters=150      # overrides apply to every variant
    python scripts/ablate.py --only sample16,topk64

Each variant is a normal `mlxdistill train` run under runs/ablate/NAME, evaluated against
the live teacher on data.test. Results go to results/ablation.json after every variant (a
rerun skips finished ones) and the markdown table to results/ablation.md.
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

OUT = "runs/ablate"
RESULTS = "results"
VARIANTS = {
    "plain_ce": ("plain CE (no teacher)", {"loss.alpha": 1.0}),
    "online_dense": ("online teacher, dense forward KL", {"teacher.mode": "online"}),
    "topk8": ("top-8 + tail bucket", {"cache.mode": "topk", "cache.k": 8}),
    "topk64": ("top-64 + tail bucket", {"cache.mode": "topk", "cache.k": 64}),
    "sample8": ("sampled, n=8", {"cache.n": 8}),
    "sample16": ("sampled, n=16 (default)", {}),
    "sample32": ("sampled, n=32", {"cache.n": 32}),
    "sample16_top1": ("sampled n=16, top-1 kept exactly", {"cache.keep_top1": True}),
    "topk64_alpha05": ("top-64 + tail, 50 % CE", {"cache.mode": "topk", "cache.k": 64,
                                                 "loss.alpha": 0.5}),
    "sample16_alpha05": ("sampled n=16, 50 % CE", {"loss.alpha": 0.5}),
    "hidden": ("sampled n=16 + hidden states of teacher blocks 2, 5 (cosine)",
               {"cache.hidden_layers": [2, 5], "cache.dir": "caches/ablate-sample16-hidden"}),
    "multi_teacher": ("sampled n=16 from two teachers, mixed 0.75 / 0.25",
                      {"cache.mix": ["caches/ablate-teacher2"], "cache.mix_weights": [0.75, 0.25]}),
}
# Caches of other teachers that multi-teacher variants mix in: built with the same data
# settings as the variant's own cache.
MIX_TEACHERS = {"caches/ablate-teacher2": "weights/teacher2"}


# Variants identical to the default run and to scripts/ce_baseline.py's CE run share their
# run and cache directories, so a finished default run is evaluated, not retrained.
SHARED_RUNS = {"sample16": "runs/default", "plain_ce": "runs/default-ce"}


def cache_dir(extra: dict) -> str:
    if "cache.dir" in extra:
        return extra["cache.dir"]
    mode = extra.get("cache.mode", "sample")
    size = extra.get("cache.k", 64) if mode == "topk" else extra.get("cache.n", 16)
    top1 = "-top1" if extra.get("cache.keep_top1") else ""
    if (mode, size, top1) == ("sample", 16, ""):
        return "caches/default"
    return f"caches/ablate-{mode}{size}{top1}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
    os.makedirs(RESULTS, exist_ok=True)
    rpath = os.path.join(RESULTS, "ablation.json")
    saved = json.load(open(rpath)) if os.path.exists(rpath) else {}
    # Finished variants are reused only when they ran with the same overrides.
    results = saved.get("variants", {}) if saved.get("overrides") == args.overrides else {}
    for name in names:
        if name in results:
            continue
        label, extra = VARIANTS[name]
        ov = {"run.dir": SHARED_RUNS.get(name, f"{OUT}/{name}"), "cache.dir": cache_dir(extra),
              **extra}
        cfg = load_config(None, args.overrides + [f"{k}={v}" for k, v in ov.items()])
        print(f"== {name}: {label}", flush=True)
        t0 = time.time()
        for mix_dir in cfg.cache.mix:
            api.build_cache(load_config(None, args.overrides + [
                f"teacher.model={MIX_TEACHERS[mix_dir]}", f"cache.dir={mix_dir}"]),
                quiet=True, log=print)
        res = api.train(cfg, quiet=True, log=print)
        online = cfg.teacher.mode == "online"
        with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as f:
            tps = [r["tok_per_s"] for r in map(json.loads, f) if "tok_per_s" in r]
        m = json.load(open(os.path.join(cfg.cache.dir, "manifest.json"))) if not online else {}
        bpt = None if online else api.inspect_cache(cfg.cache.dir)["bytes_per_token"]
        results[name] = {
            "label": label, "overrides": ov, "iters": cfg.train.iters,
            "hidden_bytes": 2 * (m.get("hidden_size") or 0) * len(m.get("hidden_resolved") or []),
            "bytes_per_token": bpt,
            "train_tok_per_s": round(sum(tps) / len(tps), 1), "wall_s": round(time.time() - t0),
            "teacher": res["teacher"], "before": res["student_before"],
            "after": res["student_after"],
        }
        with open(rpath + ".tmp", "w") as f:
            json.dump({"overrides": args.overrides, "variants": results}, f, indent=2)
        os.replace(rpath + ".tmp", rpath)
    rows = ["| objective (targets) | bytes/token | held-out CE | KL(teacher‖student) | "
            "top-1 agree | ECE | train tok/s |", "|---|---|---|---|---|---|---|"]
    any_res = next(iter(results.values()))
    t, b = any_res["teacher"], any_res["before"]
    rows.append(f"| teacher | - | {t['ce']:.3f} | - | - | {t['ece']:.3f} | - |")
    rows.append(f"| student before training | - | {b['ce']:.3f} | {b['kl']:.3f} | "
                f"{b['agree_top1']:.3f} | {b['ece']:.3f} | - |")
    for name in VARIANTS:
        if name not in results:
            continue
        r = results[name]
        a = r["after"]
        bpt = "live teacher" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:g}"
        if name == "plain_ce":
            bpt = "0"
        extra = r["overrides"]
        if r.get("hidden_bytes"):  # hidden states are stored beside the targets
            bpt += f" + {r['hidden_bytes']:,} hidden"
        if extra.get("cache.mix"):
            bpt = f"{len(extra['cache.mix']) + 1} × {bpt}"
        rows.append(f"| {r['label']} | {bpt} | {a['ce']:.3f} | {a['kl']:.3f} | "
                    f"{a['agree_top1']:.3f} | {a['ece']:.3f} | {r['train_tok_per_s']:,.0f} |")
    table = "\n".join(rows)
    with open(os.path.join(RESULTS, "ablation.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
