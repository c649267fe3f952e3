"""On-policy distillation (GKD, Agarwal et al. 2024): with `loss.lmbda` > 0 that fraction of
steps trains on sequences the *student* wrote, scored by the live teacher.

Training only on the teacher's (or the data's) sequences leaves the student unprepared for
the prefixes its own mistakes lead to at inference; on-policy batches put those prefixes in
front of the teacher. Each chosen row keeps its first half as the prompt and the student
continues it by sampling at temperature 1 with a KV cache; only the continuation is trained
on. Whether a step is on-policy and what is sampled are functions of (seed, step), so a
resumed run repeats them exactly.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def is_on_policy(lmbda: float, seed: int, step: int) -> bool:
    return lmbda > 0 and np.random.default_rng([seed, step, 7]).random() < lmbda


def count(lmbda: float, seed: int, steps: int) -> int:
    """On-policy steps among the first `steps` (for metrics.jsonl)."""
    return sum(is_on_policy(lmbda, seed, s) for s in range(steps))


def rollout(model, vocab_size: int, x: mx.array, prompt_len: int) -> mx.array:
    """x[:, :prompt_len] continued by the student's samples to x's length (ids < vocab)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(x[:, :prompt_len], cache=cache)[:, -1, :vocab_size]
    out = [x[:, :prompt_len]]
    for _ in range(x.shape[1] - prompt_len):
        tok = mx.random.categorical(logits.astype(mx.float32))[:, None].astype(x.dtype)
        out.append(tok)
        logits = model(tok, cache=cache)[:, -1, :vocab_size]
        mx.eval(tok, logits)  # keeps the graph one token deep
    return mx.stop_gradient(mx.concatenate(out, axis=1))


def on_policy_batch(model, vocab_size: int, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(ids, loss mask, labels) of a student-written batch. The mask covers the positions
    that predict a sampled token and the last one (the teacher scores every position);
    labels are -1 so hard-label CE, which would fit the student's own samples, sees none."""
    L = x.shape[1]
    prompt = max(1, L // 2)
    ids = rollout(model, vocab_size, x, prompt)
    mask = (mx.arange(L) >= prompt - 1).astype(mx.uint8)
    mask = mx.broadcast_to(mask[None], x.shape)
    labels = mx.full(x.shape, -1, dtype=mx.int32)
    return ids, mask, labels
