"""`plan --probe`: run the teacher pass and the training step briefly on this machine, built
as `cache` and `train` build them, and measure their peak memory and speed."""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from . import models
from .config import Config
from .step import make_step


def _fake_targets(cfg: Config, batch: int, vocab: int) -> dict:
    """Cache-shaped teacher targets of the configured mode (values do not change the cost)."""
    c, L = cfg.cache, cfg.data.seq_len
    rng = np.random.default_rng(0)
    idt = np.uint16 if vocab <= 65536 else np.int32
    if c.mode == "sample":
        return {"ids": mx.array(rng.integers(0, vocab, (batch, L, c.n)).astype(idt)),
                "counts": mx.array(np.ones((batch, L, c.n), np.uint8))}
    k = min(c.k, vocab)
    return {"ids": mx.array(rng.integers(0, vocab, (batch, L, k)).astype(idt)),
            "logprobs": mx.array(np.full((batch, L, k), -np.log(k + 1), np.float16)),
            "tail_logprob": mx.array(np.full((batch, L), -np.log(k + 1), np.float32))}


def baseline() -> int:
    """MLX memory already held by the process (unreachable arrays collected first), which a
    probe's peak must not count."""
    import gc

    gc.collect()
    return mx.get_active_memory()


def probe_training(cfg: Config, steps: int = 2) -> dict:
    """Load the student as `train` does and run `steps` optimizer steps of the configured
    micro-batch on random tokens, the step built as the trainer builds it: peak MLX memory
    (weights included) and seconds per step after the first (compiled) one."""
    import mlx.optimizers as optim

    t = cfg.train
    base = baseline()
    model, _, scfg = models.load(cfg.student.model, "student")
    vocab = models.logits_size(scfg)
    models.setup_training(model, t.mode, t.lora_rank, t.lora_layers, t.lora_scale,
                          t.lora_dropout)
    opt = optim.AdamW(learning_rate=t.lr, weight_decay=t.weight_decay)
    opt.init(model.trainable_parameters())
    mx.eval(model.parameters(), opt.state)
    from .trainer import kd_objective, step_loss

    step_fn = make_step(model, opt, step_loss(kd_objective(cfg, model, vocab)), t.grad_clip,
                        t.grad_accum)
    L = cfg.data.seq_len
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, vocab, (t.batch_size, L)).astype(np.int32))
    labels = mx.array(rng.integers(0, vocab, (t.batch_size, L)).astype(np.int32))
    mask = mx.ones((t.batch_size, L), dtype=mx.uint8)
    targets = _fake_targets(cfg, t.batch_size, vocab)
    # The trainer keeps the validation rows' teacher distributions (float16) in memory.
    ev = mx.zeros((t.eval_rows, L, vocab), dtype=mx.float16) if cfg.data.valid and \
        t.eval_rows else None
    mx.eval(x, labels, mask, targets, ev)
    mx.reset_peak_memory()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        mx.eval(step_fn(x, mask, labels, targets), model.parameters(), opt.state)
        times.append(time.perf_counter() - t0)
    peak = mx.get_peak_memory() - base
    return {"peak_bytes": int(peak), "step_s": float(np.median(times[1:] or times)),
            "tokens_per_step": t.batch_size * L}


def probe_teacher(cfg: Config, batches: int = 2) -> dict:
    """Run the teacher over `batches` cache batches of random tokens as the cache pass does:
    peak MLX memory and tokens per second."""
    from .cache import sample_targets, topk_targets

    c = cfg.cache
    base = baseline()
    teacher, _, tcfg = models.load(cfg.teacher.model, "teacher")
    vocab = models.logits_size(tcfg)
    forward = models.logits_fn(teacher, vocab)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, vocab, (c.batch_size, cfg.data.seq_len)).astype(np.int32))
    mx.eval(x)
    mx.reset_peak_memory()
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        logits = forward(x).astype(mx.float32)
        if c.temperature != 1.0:  # as the cache pass does
            logits = logits / c.temperature
        if c.mode == "topk":
            topk_targets(logits - mx.logsumexp(logits, axis=-1, keepdims=True), c.k)
        else:
            sample_targets(logits, c.n, rng)
        times.append(time.perf_counter() - t0)
        del logits
    peak = mx.get_peak_memory() - base
    dt = float(np.median(times[1:] or times))
    return {"peak_bytes": int(peak), "tok_per_s": x.size / dt}


# ---------------------------------------------------------------- the plan
