"""Distillation-aware 4-bit quantization vs. plain 4-bit on the embedded default run.

    python scripts/dwq.py                         # runs/default (train it first: `mlxdistill train`)
    python scripts/dwq.py --run runs/lora --iters 100 --lrs 1e-5,3e-5

Exports RUN at 4 bits with `mlxdistill export` (plain), and again with `--tune-iters ITERS`
at each learning rate in --lrs (scales and biases tuned against the run's teacher cache).
The learning rate is chosen on data.valid (KL to the live teacher on --valid-rows rows);
then the float32 student, plain 4-bit and the chosen tuned 4-bit are compared with the
teacher on all of data.test. Quantized models are evaluated from their exported folders,
dequantized to float32 (the same weights; a CPU has no fast quantized kernels). Writes
--out (default results/dwq.json) with the Markdown table README.md shows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mlxdistill  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from mlxdistill import api  # noqa: E402
from mlxdistill import data as data_mod  # noqa: E402
from mlxdistill import models  # noqa: E402
from mlxdistill.evaluate import compare  # noqa: E402

METRICS = [("kl", "KL(teacher‖student)"), ("agree_top1", "top-1 agreement"),
           ("ce", "held-out CE (nats)"), ("accuracy", "next-token accuracy")]


def load_export(folder: str):
    """An exported folder as float32 weights (quantized layers dequantized exactly)."""
    from mlx_lm.utils import dequantize_model, load

    model = dequantize_model(load(folder)[0])
    model.set_dtype(mx.float32)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/default")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--lrs", default="1e-5,3e-5")
    ap.add_argument("--valid-rows", type=int, default=32)
    ap.add_argument("--out", default="results/dwq.json")
    args = ap.parse_args()
    cfg = api.load_run_config(args.run)
    teacher, tok, tcfg = models.load_role(cfg, "teacher")
    vocab = models.logits_size(tcfg)
    work = tempfile.mkdtemp(prefix="mlxdistill-dwq-")
    quiet = lambda m: None  # noqa: E731
    t0 = time.time()
    folders = {"plain": os.path.join(work, "plain")}
    reports = {"plain": api.export(args.run, folders["plain"], args.bits, args.group_size,
                                   log=quiet)}
    print(f"plain {args.bits}-bit exported ({time.time() - t0:.0f} s)", flush=True)
    lrs = [float(x) for x in args.lrs.split(",")]
    for lr in lrs:
        name = f"tuned lr={lr:g}"
        folders[name] = os.path.join(work, f"tuned-{lr:g}")
        reports[name] = api.export(args.run, folders[name], args.bits, args.group_size,
                                   log=print, tune_iters=args.iters, tune_lr=lr)
        print(f"{name} exported ({time.time() - t0:.0f} s)", flush=True)

    # Choose the learning rate on validation data, report on test data.
    valid = data_mod.pack(cfg.data.valid, tok, cfg.data.seq_len, cfg.data.mask_prompt,
                          args.valid_rows, packing=cfg.data.packing)
    val = compare(teacher, {n: load_export(f) for n, f in folders.items()}, valid, vocab)
    best = min((n for n in folders if n != "plain"), key=lambda n: val[n]["kl"])
    print(f"chosen on {cfg.data.valid}: {best} ({time.time() - t0:.0f} s)", flush=True)
    test = data_mod.pack(cfg.data.test, tok, cfg.data.seq_len, cfg.data.mask_prompt,
                         packing=cfg.data.packing)
    students = {"float32 student": api.load_student(args.run)[0],
                f"{args.bits}-bit plain": load_export(folders["plain"]),
                f"{args.bits}-bit tuned": load_export(folders[best])}
    res = compare(teacher, students, test, vocab)
    rows = ["| student | " + " | ".join(label for _, label in METRICS) + " |",
            "|---|" + "---|" * len(METRICS)]
    for name in students:
        rows.append(f"| {name} | " + " | ".join(f"{res[name][k]:.4f}" for k, _ in METRICS)
                    + " |")
    table = "\n".join(rows)
    out = {"run": args.run, "bits": args.bits, "group_size": args.group_size,
           "iters": args.iters, "lrs": lrs, "chosen": best,
           "valid": {"data": cfg.data.valid, "rows": args.valid_rows,
                     "kl": {n: val[n]["kl"] for n in folders}},
           "test": {"data": cfg.data.test, "tokens": res["tokens"],
                    **{n: res[n] for n in ("teacher", *students)}},
           "export_reports": {n: {"tuning": r["tuning"], "round_trip": r["round_trip"],
                                  "size_bytes": r["size_bytes"]} for n, r in reports.items()},
           "kl_reduction_pct": round(100 * (1 - res[f"{args.bits}-bit tuned"]["kl"]
                                            / res[f"{args.bits}-bit plain"]["kl"]), 2),
           "wall_s": round(time.time() - t0, 1), "table": table}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
