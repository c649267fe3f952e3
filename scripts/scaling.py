"""How a distillation step's cost grows with sequence length and vocabulary size.

    python scripts/scaling.py                 # the grid below, ~10 min on a 2-core CPU
    python scripts/scaling.py --quick         # two points per axis

A random Qwen-like student (2 blocks of width 64, tied embeddings; Qwen2.5's vocabulary of
151,936 ids at the top of the grid) takes full fine-tuning steps on sampled targets (n=16),
with the whole-sequence loss and with `train.loss_chunk` = 128 (+ gradient checkpointing).
Each point reports tokens/s (median of the timed steps after a warm-up) and the peak memory
of one step. Writes results/scaling.json, results/scaling.md and results/scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mlxdistill  # noqa: E402,F401  (OpenBLAS before mlx)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402

from mlxdistill import losses, surgery  # noqa: E402

WIDTH, LAYERS, N = 64, 2, 16
CHUNK = 128


def student(vocab: int):
    from mlx_lm.models import qwen2

    mx.random.seed(0)
    return qwen2.Model(qwen2.ModelArgs.from_dict(dict(
        model_type="qwen2", hidden_size=WIDTH, num_hidden_layers=LAYERS,
        intermediate_size=4 * WIDTH, num_attention_heads=4, num_key_value_heads=2,
        rms_norm_eps=1e-6, vocab_size=vocab, tie_word_embeddings=True, rope_theta=1e6)))


def measure(vocab: int, seq: int, chunked: bool, steps: int) -> dict:
    model = student(vocab)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, vocab, (1, seq)), dtype=mx.int32)
    ids = mx.array(rng.integers(0, vocab, (1, seq, N)), dtype=mx.int32)
    counts = mx.ones((1, seq, N), dtype=mx.uint8)
    targets = {"ids": ids, "counts": counts}
    labels, mask = x, mx.ones((1, seq), dtype=mx.uint8)
    if chunked:
        surgery.grad_checkpoint(model)
        body, head, hm = surgery.split_head(model, vocab)

        def loss_fn(m):
            return losses.chunked_distill_loss(body(x), head, hm.trainable_parameters(), targets,
                                               labels, mask, CHUNK)[0]
    else:
        def loss_fn(m):
            return losses.distill_loss(m(x), targets, labels, mask)[0]
    opt = optim.AdamW(learning_rate=1e-4)
    grad = nn.value_and_grad(model, loss_fn)

    def step():
        loss, g = grad(model)
        opt.update(model, g)
        mx.eval(loss, model.parameters(), opt.state)

    step()  # warm-up
    mx.clear_cache()
    mx.reset_peak_memory()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"vocab": vocab, "seq_len": seq, "chunked": chunked,
            "tok_per_s": round(seq / statistics.median(times), 1),
            "peak_mem_mb": round(mx.get_peak_memory() / 1e6, 1),
            "logits_mb": round(seq * vocab * 4 / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    seqs = [256, 1024] if args.quick else [128, 256, 512, 1024]
    vocabs = [4096, 151936] if args.quick else [4096, 32768, 151936]
    points = []
    # seq_len axis at the Qwen vocabulary, vocab axis at 512 positions
    grid = [(151936, s) for s in seqs] + [(v, 512) for v in vocabs if v != 151936]
    for vocab, seq in grid:
        for chunked in (False, True):
            p = measure(vocab, seq, chunked, args.steps)
            print(json.dumps(p), flush=True)
            points.append(p)
    os.makedirs(args.out, exist_ok=True)
    meta = {"command": "python scripts/scaling.py" + (" --quick" if args.quick else ""),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, mlx {mx.__version__}, "
                       f"{'Metal' if mx.metal.is_available() else 'CPU'}",
            "student": f"qwen2 {LAYERS}x{WIDTH}, tied embeddings, full fine-tune, batch 1",
            "targets": f"sampled n={N}", "chunk": CHUNK}
    with open(os.path.join(args.out, "scaling.json.tmp"), "w") as f:
        json.dump({**meta, "points": points}, f, indent=2)
    os.replace(os.path.join(args.out, "scaling.json.tmp"), os.path.join(args.out, "scaling.json"))
    rows = ["| vocab | seq_len | logits [L,V] fp32 | whole: tok/s | whole: peak | "
            f"chunk {CHUNK} + ckpt: tok/s | chunk {CHUNK} + ckpt: peak |",
            "|---|---|---|---|---|---|---|"]
    by = {(p["vocab"], p["seq_len"], p["chunked"]): p for p in points}
    for vocab, seq in grid:
        a, b = by[(vocab, seq, False)], by[(vocab, seq, True)]
        rows.append(f"| {vocab:,} | {seq} | {a['logits_mb']:,.0f} MB | {a['tok_per_s']:,.0f} | "
                    f"{a['peak_mem_mb']:,.0f} MB | {b['tok_per_s']:,.0f} | "
                    f"{b['peak_mem_mb']:,.0f} MB |")
    with open(os.path.join(args.out, "scaling.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    print("\n".join(rows))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for chunked, style in ((False, "o-"), (True, "s--")):
            pts = [by[(151936, s, chunked)] for s in seqs]
            lab = f"chunk {CHUNK} + ckpt" if chunked else "whole sequence"
            axes[0].plot(seqs, [p["peak_mem_mb"] for p in pts], style, label=lab)
            axes[1].plot(seqs, [p["tok_per_s"] for p in pts], style, label=lab)
        axes[0].set(xlabel="seq_len (vocab 151,936)", ylabel="peak memory (MB)")
        axes[1].set(xlabel="seq_len (vocab 151,936)", ylabel="tokens/s")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "scaling.png"), dpi=100)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
