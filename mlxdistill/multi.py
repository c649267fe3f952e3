"""Multi-teacher distillation: several caches over one token stream, combined per position.

`cache.mix: [caches/other, ...]` names caches built by other teachers (with `mlxdistill
cache` and the same data settings) next to `cache.dir`. Per position their distributions are
combined either as a mixture with `cache.mix_weights` (one weight per cache, `cache.dir`
first) or, with `cache.mix_mode: confidence`, by taking the teacher most sure of its top
token. The result has the same form as one cache's targets, so every loss applies as is.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from . import data as data_mod
from .cache import ShardReader
from .shards import CacheError
from .targets import merge_ids

# Settings that must agree for the caches to describe the same positions. The rows are the
# ones each reader serves, not its manifest's (or max_rows): a cache built for more rows
# serves the same first ones (cache.covers).
SAME_STREAM = ("tokenizer_fingerprint", "vocab_size", "seq_len", "dataset_sha256",
               "mask_prompt", "shard_rows", "mode")


def check_same_stream(readers: list[ShardReader]) -> None:
    first = readers[0].manifest
    for r in readers[1:]:
        for key in SAME_STREAM:
            if r.manifest.get(key) != first.get(key):
                raise CacheError(
                    f"cache {r.dir} has {key}={r.manifest.get(key)!r} but {readers[0].dir} has "
                    f"{first.get(key)!r}; multi-teacher caches must cover the same token "
                    "stream with the same cache.mode")
        if r.rows != readers[0].rows:
            raise CacheError(f"cache {r.dir} serves {r.rows} rows but {readers[0].dir} serves "
                             f"{readers[0].rows}; multi-teacher caches must cover the same "
                             "token stream (build them with the same data.max_rows)")


def _probs(targets: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, probabilities, residual mass) of one cache's targets."""
    if "counts" in targets:
        c = targets["counts"].astype(np.float32)
        p = c / np.maximum(c.sum(-1, keepdims=True), 1.0)
        return targets["ids"], p, np.zeros(p.shape[:-1], np.float32)
    p = np.exp(targets["logprobs"].astype(np.float32))
    if "tail_logprob" in targets:
        return targets["ids"], p, np.exp(targets["tail_logprob"].astype(np.float32))
    return targets["ids"], p, np.clip(1.0 - p.sum(-1), 0.0, 1.0)


def combine(targets: list[dict], weights: list[float], mode: str = "weights") -> dict:
    """One target dict from several teachers' targets for the same positions."""
    parts = [_probs(t) for t in targets]
    if mode == "confidence":
        top = np.stack([p.max(-1) for _, p, _ in parts])  # [teachers, B, L]
        pick = top.argmax(0)
        width = max(p.shape[-1] for _, p, _ in parts)
        ids = np.zeros(pick.shape + (width,), dtype=parts[0][0].dtype)
        p = np.zeros(pick.shape + (width,), dtype=np.float32)
        for t, (i, q, _) in enumerate(parts):
            sel = pick == t
            ids[sel, : i.shape[-1]] = i[sel]
            p[sel, : q.shape[-1]] = q[sel]
    else:
        ids = np.concatenate([i for i, _, _ in parts], -1)
        p = np.concatenate([w * q for w, (_, q, _) in zip(weights, parts)], -1)
        ids, p = merge_ids(ids, p)
    if "counts" in targets[0]:
        # Mixture of empirical distributions: weights in place of counts (normalised by
        # the loss), so the sampled estimator stays unbiased for the mixture.
        return {"ids": ids, "counts": p}
    # Only top-k targets have a residual (the mass outside the cached ids) to mix.
    residual = (np.choose(pick, [r for _, _, r in parts]) if mode == "confidence"
                else sum(w * r for w, (_, _, r) in zip(weights, parts)))
    # Empty slots (padding after merging) get -inf: the loss skips them. The tail is each
    # teacher's mass outside its own k ids, mixed like the rest; an id one teacher cached
    # and another did not keeps only the first's share, the other's stays in its tail.
    with np.errstate(divide="ignore"):
        lp = np.where(p > 0, np.log(p), -np.inf).astype(np.float16)
        tail = np.log(residual).astype(np.float32)
    return {"ids": ids, "logprobs": lp, "tail_logprob": tail}


class MixedReader:
    """Several verified caches read in lockstep; batches carry the combined targets."""

    def __init__(self, readers: list[ShardReader], weights: list[float], mode: str):
        check_same_stream(readers)
        self.readers, self.weights, self.mode = readers, weights, mode
        self.manifest = readers[0].manifest
        self.rows = readers[0].rows

    def batches(self, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                size: int = 1) -> Iterator[data_mod.Batch]:
        its = [r.batches(batch_size, seed, start_step, rank, size) for r in self.readers]
        while True:
            bs = [next(it) for it in its]
            for b, r in zip(bs[1:], self.readers[1:]):
                if not np.array_equal(b.input_ids, bs[0].input_ids):
                    raise CacheError(f"cache {r.dir} holds other tokens than "
                                     f"{self.readers[0].dir} at the same position")
            hidden = {k: v for k, v in bs[0].targets.items() if k.startswith("hidden.")}
            targets = combine([b.targets for b in bs], self.weights, self.mode)
            yield data_mod.Batch(bs[0].input_ids, bs[0].loss_mask, bs[0].next_ids,
                                 {**targets, **hidden})


# ---------------------------------------------------------------- teachers of other tokenizers

def step_teacher(seed: int, step: int, weights: list[float]) -> int:
    """Which cache step `step` trains on when the caches cannot be combined per position
    (teachers of different tokenizers: their rows hold different stretches of text): one
    cache per step, drawn with probability `weights` from (seed, step) alone, so a resumed
    run draws the same ones. Over many steps each teacher gets its weight's share of the
    updates: the mixture in expectation."""
    u = np.random.default_rng([seed, step, 0x6D6978]).random()
    return int(min(np.searchsorted(np.cumsum(weights), u * sum(weights), side="right"),
                   len(weights) - 1))


def steps_per_teacher(seed: int, step: int, weights: list[float]) -> list[int]:
    """How many of steps 0 .. step-1 each cache trained: where each cache's own batch
    stream resumes."""
    counts = [0] * len(weights)
    for s in range(step):
        counts[step_teacher(seed, s, weights)] += 1
    return counts
