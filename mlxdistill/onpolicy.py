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
    # The coin is numpy's, seeded by (seed, step) alone: every rank draws the same one (they
    # must all take the same path through the step), and it is apart from the trainer's
    # per-step mx.random seed, which also mixes in the rank, so it does not correlate with
    # dropout or the student's samples. The trailing 7 tags this stream: [seed, step] alone
    # is the seed the cache reader's shuffle gives epoch `step` ([seed, epoch]), so without
    # it the coin at step e would be the first draw of the stream that orders epoch e. Any
    # constant would do; 7 is the one every run so far used (another changes which steps
    # are on-policy).
    return lmbda > 0 and np.random.default_rng([seed, step, 7]).random() < lmbda


# (lmbda, seed) -> on-policy steps among the first i steps, for i = 0, 1, ..., as far as asked
_counts: dict[tuple[float, int], list[int]] = {}


def count(lmbda: float, seed: int, steps: int) -> int:
    """On-policy steps among the first `steps` (for metrics.jsonl). The trainer asks at every
    report with a growing `steps`: the running counts are kept per (lmbda, seed), so each
    step's coin is drawn once per process and a call costs only the steps it has not seen."""
    if lmbda <= 0:
        return 0
    done = _counts.setdefault((lmbda, seed), [0])
    for s in range(len(done) - 1, steps):
        done.append(done[-1] + is_on_policy(lmbda, seed, s))
    return done[steps]


def rollout(model, vocab_size: int, x: mx.array, prompt_len: int) -> mx.array:
    """x[:, :prompt_len] continued by the student's samples to x's length (ids < vocab)."""
    from mlx_lm.models.cache import make_prompt_cache  # here: mlx_lm takes ~1 s to import

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
