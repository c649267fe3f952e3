"""Training throughput: mlx_lm's own LoRA trainer (plain CE) against mlxdistill's KD from a
cache and online, on the same student, rows, batch size, sequence length and steps.

    python scripts/bench.py                      # embedded pair, 40 steps per variant
    python scripts/bench.py --steps 80 train.batch_size=16

Per variant: positions/s (batch x seq_len per second, median over report windows after the
first, which holds compilation), its ratio to mlx_lm LoRA CE, and peak memory. Also: shard
reader throughput alone, teacher-pass tok/s against a plain teacher forward, bytes per token
of each cache mode and of dense float16, and the student step's model FLOP/s against a
float32 matmul measured in the same process (MFU, full fine-tune). Writes results/bench.json
and results/bench.md. Numbers are from one run on one machine; compare ratios, not figures
across machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mlxdistill  # noqa: E402,F401  (OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlxdistill import cache as cache_mod  # noqa: E402
from mlxdistill import models, trainer  # noqa: E402
from mlxdistill.config import load_config  # noqa: E402

REPORT = 5


def matmul_gflops(n: int = 1024, reps: int = 10) -> float:
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def mlx_lm_lora_ce(cfg, steps: int, mode: str) -> dict:
    """mlx_lm.tuner.train with its default CE loss on the same packed rows."""
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.trainer import train as mlx_train

    reader = cache_mod.ShardReader(cfg.cache.dir)
    rows = [reader.load_shard(i)["input_ids"] for i in range(len(reader.shards))]
    # Rows of seq_len tokens: mlx_lm pads them to 1 + seq_len and feeds seq_len positions.
    dataset = [(r.tolist(), 0) for shard in rows for r in shard]
    model, _, _ = models.load(cfg.student.model, "student")
    t = cfg.train
    models.setup_training(model, mode, t.lora_rank, t.lora_layers, t.lora_scale, 0.0)
    speeds, peaks = [], []

    class Cb(TrainingCallback):
        def on_train_loss_report(self, info):
            speeds.append(info["iterations_per_second"] * t.batch_size * cfg.data.seq_len)
            peaks.append(info["peak_memory"])

    with tempfile.TemporaryDirectory() as d:
        args = TrainingArgs(batch_size=t.batch_size, iters=steps, val_batches=0,
                            steps_per_report=REPORT, steps_per_eval=10 ** 9,
                            steps_per_save=10 ** 9, max_seq_length=cfg.data.seq_len + 1,
                            adapter_file=os.path.join(d, "a.safetensors"))
        mx.reset_peak_memory()
        mlx_train(model, optim.AdamW(learning_rate=t.lr), dataset, None, args,
                  training_callback=Cb())
    return {"pos_per_s": statistics.median(speeds[1:] or speeds), "peak_gb": max(peaks)}


def ours(cfg, steps: int, **over) -> dict:
    with tempfile.TemporaryDirectory() as d:
        c = dataclasses.replace(
            cfg, run=dataclasses.replace(cfg.run, dir=d),
            train=dataclasses.replace(cfg.train, iters=steps, report_every=REPORT,
                                      eval_every=10 ** 9, save_every=10 ** 9, eval_rows=0,
                                      **{k: v for k, v in over.items() if k != "teacher"}),
            teacher=dataclasses.replace(cfg.teacher, mode=over.get("teacher", "cache")))
        mx.reset_peak_memory()
        trainer.fit(c, quiet=True, log=lambda m: None)
        recs = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
    speeds = [r["tok_per_s"] for r in recs if "tok_per_s" in r]
    return {"pos_per_s": statistics.median(speeds[1:] or speeds),
            "peak_gb": max(r["peak_mem_gb"] for r in recs if "peak_mem_gb" in r)}


def loader_rate(cfg, n: int = 200) -> float:
    reader = cache_mod.ShardReader(cfg.cache.dir)
    it = reader.batches(cfg.train.batch_size, 0)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - t0)


def teacher_forward_rate(cfg, rows: int = 64) -> float:
    teacher, _, tcfg = models.load(cfg.teacher.model, "teacher")
    reader = cache_mod.ShardReader(cfg.cache.dir)
    x = mx.array(reader.load_shard(0)["input_ids"][:rows])
    f = models.logits_fn(teacher, models.logits_size(tcfg))
    mx.eval(f(x[:8]))
    t0 = time.perf_counter()
    for b in range(0, rows, cfg.cache.batch_size):
        mx.eval(f(x[b:b + cfg.cache.batch_size]))
    return x.size / (time.perf_counter() - t0)


def cache_rate(cfg, rows: int = 64) -> float:
    """Teacher-pass tok/s of a fresh cache build (the pass itself, not model loading)."""
    with tempfile.TemporaryDirectory() as d:
        c = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, dir=d),
                                data=dataclasses.replace(cfg.data, max_rows=rows))
        return cache_mod.build(c, quiet=True, log=lambda m: None)["pass_tok_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="results")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = load_config(None, ["cache.dir=caches/bench-sample", "data.max_rows=256"]
                       + args.overrides)
    topk = load_config(None, ["cache.dir=caches/bench-topk", "cache.mode=topk",
                              "data.max_rows=256"] + args.overrides)
    for c in (base, topk):
        cache_mod.build(c, quiet=True, log=print)
    res: dict = {"steps": args.steps, "batch_size": base.train.batch_size,
                 "seq_len": base.data.seq_len, "variants": {}}
    v = res["variants"]
    plan = [("mlx_lm LoRA, CE", lambda: mlx_lm_lora_ce(base, args.steps, "lora")),
            ("mlxdistill LoRA, KD from top-64 cache", lambda: ours(topk, args.steps, mode="lora")),
            ("mlxdistill LoRA, KD from sampled cache", lambda: ours(base, args.steps, mode="lora")),
            ("mlxdistill LoRA, online KD", lambda: ours(base, args.steps, mode="lora",
                                                         teacher="online")),
            ("mlx_lm full, CE", lambda: mlx_lm_lora_ce(base, args.steps, "full")),
            ("mlxdistill full, KD from sampled cache", lambda: ours(base, args.steps))]
    for name, fn in plan:
        print(f"== {name}", flush=True)
        v[name] = fn()
    anchor = {"lora": v["mlx_lm LoRA, CE"], "full": v["mlx_lm full, CE"]}
    for name, r in v.items():
        a = anchor["lora" if "LoRA" in name else "full"]
        r["ratio_to_mlx_lm"] = round(r["pos_per_s"] / a["pos_per_s"], 3)
        r["peak_ratio_to_mlx_lm"] = round(r["peak_gb"] / max(a["peak_gb"], 1e-9), 3)
    student, _, scfg = models.load(base.student.model, "student")
    n_params = sum(x.size for _, x in tree_flatten(student.parameters()))
    peak = matmul_gflops()
    full_pos = v["mlxdistill full, KD from sampled cache"]["pos_per_s"]
    res.update({
        "loader_batches_per_s": round(loader_rate(base), 1),
        "trainer_batches_per_s": round(full_pos / (base.train.batch_size * base.data.seq_len), 2),
        "teacher_forward_tok_s": round(teacher_forward_rate(base), 1),
        "cache_build_tok_s": round(cache_rate(base), 1),
        "bytes_per_token": {"sample n=16": 48, "topk k=64": 256,
                            "dense float16": 2 * models.logits_size(scfg)},
        "matmul_gflops_fp32": round(peak, 1),
        # 6 FLOPs per parameter per token (forward + backward) for the full fine-tune.
        "full_ft_model_gflops": round(6 * n_params * full_pos / 1e9, 1),
    })
    res["mfu"] = round(res["full_ft_model_gflops"] / peak, 3)
    lines = ["| variant | positions/s | × mlx_lm | peak GB | × mlx_lm peak |",
             "|---|---|---|---|---|"]
    for name, r in v.items():
        lines.append(f"| {name} | {r['pos_per_s']:,.0f} | {r['ratio_to_mlx_lm']:.2f} | "
                     f"{r['peak_gb']:.3f} | {r['peak_ratio_to_mlx_lm']:.2f} |")
    lines += ["", f"shard reader alone: {res['loader_batches_per_s']} batches/s vs the trainer's "
              f"{res['trainer_batches_per_s']}; teacher pass {res['cache_build_tok_s']:,.0f} "
              f"tok/s vs plain teacher forward {res['teacher_forward_tok_s']:,.0f} tok/s; "
              f"student full fine-tune {res['full_ft_model_gflops']} model GFLOP/s = "
              f"{res['mfu']:.0%} of a {res['matmul_gflops_fp32']} GFLOP/s float32 matmul."]
    os.makedirs(args.out, exist_ok=True)
    for name, text in (("bench.json", json.dumps(res, indent=2)), ("bench.md", "\n".join(lines))):
        with open(os.path.join(args.out, name + ".tmp"), "w") as f:
            f.write(text + "\n")
        os.replace(os.path.join(args.out, name + ".tmp"), os.path.join(args.out, name))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
