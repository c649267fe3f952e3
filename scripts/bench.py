"""Training throughput: mlx_lm's own LoRA trainer (plain CE) against mlxdistill's KD from a
cache and online, on the same student, rows, batch size, sequence length and steps.

    python scripts/bench.py                      # embedded pair, 40 steps, 3 rounds
    python scripts/bench.py --steps 80 --repeats 5 train.batch_size=16

First, as a user feels it: `mlx_lm.lora` and `mlxdistill train` as processes, timed by the
wall clock (scripts/bench_wall.py, `--wall-repeats` rounds). Then, in one process, each
trainer's own speed report, per variant: positions/s (batch x seq_len per second, median over report windows after the
first, which holds compilation, then the median over rounds), its ratio to mlx_lm's own
trainer, and peak memory. The variants run round-robin, `--repeats` rounds, so a change in
the machine's load hits all of them alike. Also: shard reader throughput alone, teacher-pass
tok/s against a plain teacher forward, bytes per token of each cache on disk and of dense
float16, the student step's model FLOP/s against a float32 matmul measured in the same
process (MFU, full fine-tune; also for a 4x wider random student of the same depth and
vocabulary), and where one step's time goes (forward, loss, backward, update). Writes
results/bench.json, results/bench.md and results/bench.png. Numbers are from one run on one
machine; compare ratios, not figures across machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mlxdistill  # noqa: E402,F401  (OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlxdistill import api  # noqa: E402
from mlxdistill import cache as cache_mod  # noqa: E402
from mlxdistill import files, models, surgery  # noqa: E402
from mlxdistill.config import load_config  # noqa: E402
from mlxdistill.objective import Objective  # noqa: E402
from mlxdistill.step import loop_memory, make_step, to_arrays  # noqa: E402

REPORT = 5


def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
    """The best of `reps` float32 n x n matmuls: a peak rate, so the fastest one, which
    other jobs on a shared machine slowed the least."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


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
    surgery.setup_training(model, mode, t.lora_rank, t.lora_layers, t.lora_scale, 0.0)
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
        api.fit(c, quiet=True, log=lambda m: None)
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
        return api.build_cache(c, quiet=True, log=lambda m: None)["pass_tok_per_s"]


def cache_bytes_per_token(cache_dir: str) -> float:
    """Bytes on disk per cached token: every shard (ids, masks and targets) over the tokens."""
    reader = cache_mod.ShardReader(cache_dir)
    size = sum(os.path.getsize(os.path.join(cache_dir, s["file"])) for s in reader.shards)
    return size / (reader.rows * reader.load_shard(0)["input_ids"].shape[1])


def model_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 2 per weight of every
    matmul (the tied embedding counts once, as the output head) and the attention's two
    L x L products (PaLM's model FLOPs; the causal half is not discounted)."""
    n = sum(x.size for _, x in tree_flatten(model.parameters()))
    layers = len(model.layers)
    q_dim = model.layers[0].self_attn.n_heads * (model.args.head_dim or
                                                   model.args.hidden_size // model.args.num_attention_heads)
    return 3 * (2 * n + 4 * layers * seq_len * q_dim)


def step_profile(cfg, peak_gflops: float, reps: int = 9) -> dict:
    """Where one full fine-tune step's time goes, on one cached batch, each part compiled as
    the trainer compiles it: forward to the logits; forward and loss; forward, loss and
    backward; the whole step (clipping and AdamW too). Differences give each part's time;
    `matmul_at_peak_s` is what the model's matmuls would take at the measured matmul rate."""
    model, _, scfg = models.load(cfg.student.model, "student")
    vocab = models.logits_size(scfg)
    reader = cache_mod.ShardReader(cfg.cache.dir)
    x, mask, labels, targets = to_arrays(next(reader.batches(cfg.train.batch_size, 0)))
    loss_fn = Objective.from_config(cfg).bind(model, vocab)  # no hidden-state term here
    forward = models.logits_fn(model, vocab)

    grad = nn.value_and_grad(model, loss_fn)
    st = [model.state]
    fwd = mx.compile(lambda x: forward(x), inputs=st)
    lossf = mx.compile(lambda x: loss_fn(model, x, mask, labels, targets)[0], inputs=st)
    gradf = mx.compile(lambda x: grad(model, x, mask, labels, targets), inputs=st, outputs=st)
    opt = optim.AdamW(learning_rate=1e-5)
    opt.init(model.trainable_parameters())
    step = make_step(model, opt, loss_fn, cfg.train.grad_clip)
    fns = {"forward": lambda: fwd(x), "forward+loss": lambda: lossf(x),
           "forward+loss+backward": lambda: gradf(x),
           "whole step": lambda: (step(x, mask, labels, targets), model.parameters(), opt.state)}
    times: dict = {k: [] for k in fns}
    restore = loop_memory()  # the memory setup the training loop runs in
    try:
        for f in fns.values():
            mx.eval(f())  # compile / warm up
        # The parts take turns, so a change in the machine's load hits all of them alike
        # and their differences stay meaningful.
        for _ in range(reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                mx.eval(f())
                times[k].append(time.perf_counter() - t0)
    finally:
        restore()
    t = {k: statistics.median(v) for k, v in times.items()}
    flops = model_flops_per_token(model, cfg.data.seq_len) * x.size
    parts = {"forward (body + head)": t["forward"],
             "loss": t["forward+loss"] - t["forward"],
             "backward": t["forward+loss+backward"] - t["forward+loss"],
             "clip + AdamW update": t["whole step"] - t["forward+loss+backward"]}
    return {"step_s": round(t["whole step"], 4),
            "parts_s": {k: round(v, 4) for k, v in parts.items()},
            "matmul_at_peak_s": round(flops / (peak_gflops * 1e9), 4),
            "model_gflops": round(flops / t["whole step"] / 1e9, 1)}


def wide_student(src: str, dest: str, factor: int = 4) -> str:
    """A random student `factor`x wider than `src` (same depth, heads and vocabulary), for
    MFU at a width where matmuls, not per-element work, dominate."""
    import mlx_lm.models.llama as llama

    with open(os.path.join(src, "config.json")) as f:
        c = json.load(f)
    c.update(hidden_size=c["hidden_size"] * factor,
             intermediate_size=c["intermediate_size"] * factor, torch_dtype="float32")
    mx.random.seed(0)
    m = llama.Model(llama.ModelArgs.from_dict(c))
    os.makedirs(dest, exist_ok=True)
    mx.save_safetensors(os.path.join(dest, "model.safetensors"),
                        dict(tree_flatten(m.parameters())))
    files.atomic_json(os.path.join(dest, "config.json"), c)
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name.endswith(".model"):
            shutil.copy(os.path.join(src, name), dest)
    return dest


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["variants"])
    r = [res["variants"][n] for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    y = np.arange(len(names))
    for ax, key, title in ((axes[0], "ratio_to_mlx_lm", "positions/s, x mlx_lm's trainer"),
                           (axes[1], "peak_ratio_to_mlx_lm", "peak memory, x mlx_lm's")):
        ax.barh(y, [v[key] for v in r], color=["grey" if "mlx_lm" in n else "tab:blue"
                                               for n in names])
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_markdown(res: dict, path: str) -> str:
    """bench.md from bench.json's contents: the wall-clock comparison of the command lines
    (scripts/bench_wall.py) when present, then the in-process figures."""
    import bench_wall

    lines = []
    if res.get("wall_clock"):
        lines += bench_wall.lines(res["wall_clock"]) + [""]
    if res.get("page_faults"):
        lines += bench_wall.fault_lines(res["page_faults"]) + [""]
    if res.get("variants"):
        v = res["variants"]
        lines += [f"In one process, each trainer's own speed report ({res['steps']} steps, "
                  f"median of {res['repeats']} rounds):", "",
                  "| variant | positions/s | × mlx_lm | peak GB | × mlx_lm peak |",
                  "|---|---|---|---|---|"]
        for name, r in v.items():
            lines.append(f"| {name} | {r['pos_per_s']:,.0f} | {r['ratio_to_mlx_lm']:.2f} | "
                         f"{r['peak_gb']:.3f} | {r['peak_ratio_to_mlx_lm']:.2f} |")
    if res.get("step_profile"):
        sp = res["step_profile"]
        bpt = ", ".join(f"{k} {b:,.0f}" for k, b in res["bytes_per_token"].items())
        lines += ["", f"KD from the sampled cache vs online KD (LoRA): "
                  f"{res['cache_vs_online_lora']}x; shard reader alone: "
                  f"{res['loader_batches_per_s']} batches/s vs the trainer's "
                  f"{res['trainer_batches_per_s']}; teacher pass {res['cache_build_tok_s']:,.0f} "
                  f"tok/s vs plain teacher forward {res['teacher_forward_tok_s']:,.0f} tok/s "
                  f"({res['cache_build_ratio']}x); bytes per token: {bpt}.", "",
                  f"MFU: student full fine-tune {res['full_ft_model_gflops']} model GFLOP/s = "
                  f"{res['mfu']:.0%} of a {res['matmul_gflops_fp32']} GFLOP/s float32 matmul; "
                  f"a 4x wider random student ({res['wide_student']['params'] / 1e6:.1f} M "
                  f"parameters): {res['wide_student']['model_gflops']} GFLOP/s = "
                  f"{res['wide_student']['mfu']:.0%}.",
                  "", f"One full fine-tune step, {sp['step_s']} s: " + ", ".join(
                      f"{k} {s_:.3f} s" for k, s_ in sp["parts_s"].items())
                  + f"; its matmuls at the measured matmul rate would take "
                  f"{sp['matmul_at_peak_s']} s."]
    text = "\n".join(lines) + "\n"
    with files.atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3, help="round-robin rounds of all variants")
    ap.add_argument("--wall-repeats", type=int, default=3,
                    help="rounds of the wall-clock comparison of the command lines "
                         "(scripts/bench_wall.py); 0 keeps the one in OUT/bench.json")
    ap.add_argument("--out", default="results")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.steps < 2 or args.repeats < 1 or args.wall_repeats < 0:
        ap.error("--steps needs at least 2, --repeats at least 1, --wall-repeats at least 0")
    base = load_config(None, ["cache.dir=caches/bench-sample", "data.max_rows=256"]
                       + args.overrides)
    topk = load_config(None, ["cache.dir=caches/bench-topk", "cache.mode=topk",
                              "data.max_rows=256"] + args.overrides)
    for c in (base, topk):
        api.build_cache(c, quiet=True, log=print)
    res: dict = {"steps": args.steps, "repeats": args.repeats,
                 "batch_size": base.train.batch_size, "seq_len": base.data.seq_len,
                 "variants": {}}
    plan = [("mlx_lm LoRA, CE", lambda: mlx_lm_lora_ce(base, args.steps, "lora")),
            ("mlxdistill LoRA, KD from top-64 cache", lambda: ours(topk, args.steps, mode="lora")),
            ("mlxdistill LoRA, KD from sampled cache", lambda: ours(base, args.steps, mode="lora")),
            ("mlxdistill LoRA, online KD", lambda: ours(base, args.steps, mode="lora",
                                                         teacher="online")),
            ("mlx_lm full, CE", lambda: mlx_lm_lora_ce(base, args.steps, "full")),
            ("mlxdistill full, KD from top-64 cache", lambda: ours(topk, args.steps)),
            ("mlxdistill full, KD from sampled cache", lambda: ours(base, args.steps))]
    runs: dict = {name: [] for name, _ in plan}
    for r in range(args.repeats):
        for name, fn in plan:
            print(f"== round {r + 1}/{args.repeats}: {name}", flush=True)
            runs[name].append(fn())
    v = res["variants"]
    for name, rs in runs.items():
        v[name] = {"pos_per_s": statistics.median(x["pos_per_s"] for x in rs),
                   "peak_gb": max(x["peak_gb"] for x in rs),
                   "rounds_pos_per_s": [round(x["pos_per_s"], 1) for x in rs]}
    anchor = {"lora": v["mlx_lm LoRA, CE"], "full": v["mlx_lm full, CE"]}
    for name, r in v.items():
        a = anchor["lora" if "LoRA" in name else "full"]
        r["ratio_to_mlx_lm"] = round(r["pos_per_s"] / a["pos_per_s"], 3)
        r["peak_ratio_to_mlx_lm"] = round(r["peak_gb"] / max(a["peak_gb"], 1e-9), 3)
    student, _, scfg = models.load(base.student.model, "student")
    peak = matmul_gflops()
    full_pos = v["mlxdistill full, KD from sampled cache"]["pos_per_s"]
    online = v["mlxdistill LoRA, online KD"]["pos_per_s"]
    with tempfile.TemporaryDirectory() as d:
        wide = load_config(None, ["cache.dir=caches/bench-sample", "data.max_rows=256",
                                  f"student.model={wide_student(base.student.model, d)}"]
                           + args.overrides)
        print("== 4x wider random student, full KD from sampled cache", flush=True)
        wide_pos = ours(wide, max(10, args.steps // 4))["pos_per_s"]
        wide_model = models.load(wide.student.model, "student")[0]
        wide_flops = model_flops_per_token(wide_model, base.data.seq_len) * wide_pos / 1e9
        wide_params = sum(x.size for _, x in tree_flatten(wide_model.parameters()))
    res.update({
        "loader_batches_per_s": round(loader_rate(base), 1),
        "trainer_batches_per_s": round(full_pos / (base.train.batch_size * base.data.seq_len), 2),
        "cache_vs_online_lora": round(v["mlxdistill LoRA, KD from sampled cache"]["pos_per_s"]
                                      / online, 2),
        "teacher_forward_tok_s": round(teacher_forward_rate(base), 1),
        "cache_build_tok_s": round(cache_rate(base), 1),
        "bytes_per_token": {f"sample n={base.cache.n}": round(cache_bytes_per_token(
                                base.cache.dir), 1),
                            f"topk k={topk.cache.k}": round(cache_bytes_per_token(
                                topk.cache.dir), 1),
                            "dense float16 (computed)": 2 * models.logits_size(scfg)},
        "matmul_gflops_fp32": round(peak, 1),
        "full_ft_model_gflops": round(model_flops_per_token(student, base.data.seq_len)
                                      * full_pos / 1e9, 1),
        "wide_student": {"params": wide_params, "pos_per_s": round(wide_pos, 1),
                         "model_gflops": round(wide_flops, 1), "mfu": round(wide_flops / peak, 3)},
        "step_profile": step_profile(base, peak),
    })
    res["mfu"] = round(res["full_ft_model_gflops"] / peak, 3)
    res["cache_build_ratio"] = round(res["cache_build_tok_s"] / res["teacher_forward_tok_s"], 3)
    import bench_wall

    print("== page faults of one step, in a fresh process", flush=True)
    res["page_faults"] = bench_wall.fresh_page_faults(args.overrides)
    path = os.path.join(args.out, "bench.json")
    if args.wall_repeats:
        print("== wall clock: mlx_lm.lora and mlxdistill train as processes", flush=True)
        res["wall_clock"] = bench_wall.measure(repeats=args.wall_repeats,
                                               overrides=args.overrides)
    elif os.path.exists(path):  # kept from the last run that measured it (it has its date)
        with open(path) as f:
            if "wall_clock" in (old := json.load(f)):
                res["wall_clock"] = old["wall_clock"]
    os.makedirs(args.out, exist_ok=True)
    files.atomic_json(path, res)
    text = write_markdown(res, os.path.join(args.out, "bench.md"))
    plot(res, os.path.join(args.out, "bench.png"))
    print(text)


if __name__ == "__main__":
    main()
