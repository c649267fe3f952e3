"""Teacher logits -> the sparse targets a cache stores: sampled ids + counts (optionally with
the top-1 kept exactly) or the top-k ids with their log-probabilities."""

from __future__ import annotations

import mlx.core as mx
import numpy as np


BLOCK = 64  # vocabulary entries per block of the two-level inverse CDF


def _inverse_cdf(probs: mx.array, u: mx.array) -> mx.array:
    """For each row of probs [R, V] and each u [R, m] in [0, row sum): the id i with
    cdf[i-1] <= u < cdf[i] (numpy's searchsorted, side="right"), found in two levels — the
    block of BLOCK entries from the block sums' cumulative sum, then the entry from that
    block's own — so nothing the size of the vocabulary is summed cumulatively or leaves the
    device."""
    rows, vocab = probs.shape
    nb = -(-vocab // BLOCK)
    if nb * BLOCK != vocab:
        probs = mx.pad(probs, [(0, 0), (0, nb * BLOCK - vocab)])
    blocks = probs.reshape(rows, nb, BLOCK)
    bcdf = mx.cumsum(blocks.sum(-1), axis=-1)  # [R, nb]
    b = mx.minimum((bcdf[:, None, :] <= u[..., None]).sum(-1), nb - 1)  # [R, m]
    below = mx.where(b > 0, mx.take_along_axis(bcdf, mx.maximum(b - 1, 0), -1), 0.0)
    inner = mx.cumsum(mx.take_along_axis(blocks, b[..., None], 1), axis=-1)  # [R, m, BLOCK]
    j = mx.minimum(((inner <= (u - below)[..., None]).sum(-1)), BLOCK - 1)
    return mx.minimum(b * BLOCK + j, vocab - 1)


def sample_targets(logits: mx.array, n: int, rng: np.random.Generator, keep_top1: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """n draws per position from softmax(logits), as unique ids + counts (padded with count 0).

    The empirical distribution counts/n is an unbiased estimate of the teacher distribution,
    so the student's cross-entropy against it has the forward-KL gradient in expectation
    (Sparse Logit Sampling, Anshumann et al. 2025). Drawn by inverse CDF with uniforms from
    `rng` (so a seed fixes the draws), in two levels on the device (_inverse_cdf): a full
    cumulative sum over the vocabulary cost 12 % of the teacher pass, and
    mx.random.categorical with num_samples makes n Gumbel noises per vocabulary entry, which
    measured 13x slower for n=16, V=4096.

    keep_top1: slot 0 holds the teacher's most likely id with its probability p1 in 1/255
    units (stochastically rounded, so unbiased), and the other n-1 draws come from the
    distribution without it, each standing for (1 - p1)/(n-1) of the mass: the same bytes,
    no sampling noise on the token that carries most of the mass (see top1_weights)."""
    vocab = logits.shape[-1]
    probs = mx.softmax(logits.astype(mx.float32), axis=-1).reshape(-1, vocab)
    rows, m = probs.shape[0], n
    if keep_top1:
        top_a = mx.argmax(probs, axis=-1)
        p1_a = mx.max(probs, axis=-1)
        probs = mx.where(mx.arange(vocab)[None] == top_a[:, None], 0.0, probs)
        m = n - 1
    u = mx.array(rng.random((rows, m)), dtype=mx.float32) * probs.sum(-1, keepdims=True)
    draws = np.asarray(_inverse_cdf(probs, u)).astype(np.int64)
    ids, counts = merge_ids(draws, np.ones(draws.shape, dtype=np.float32))
    if keep_top1:
        top, p1 = np.asarray(top_a), np.asarray(p1_a)
        scaled = p1 * 255.0
        c0 = np.floor(scaled) + (rng.random(scaled.shape) < scaled - np.floor(scaled))
        ids = np.concatenate([top[:, None].astype(ids.dtype), ids], axis=1)
        counts = np.concatenate([c0[:, None].astype(np.float32), counts], axis=1)
    shape = tuple(logits.shape[:-1]) + (n,)
    return ids.reshape(shape), counts.astype(np.uint8).reshape(shape)


def top1_weights(counts: np.ndarray) -> np.ndarray:
    """Probability weights of a keep_top1 cache's counts: slot 0 is p1 in 1/255 units, the
    n-1 other slots share 1 - p1 in proportion to their draws."""
    c = counts.astype(np.float32)
    w0 = c[..., :1] / 255.0
    rest = c[..., 1:]
    rest = rest / np.maximum(rest.sum(-1, keepdims=True), 1.0) * (1.0 - w0)
    return np.concatenate([w0, rest], axis=-1)


def merge_ids(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the weights of equal ids per position: [..., m] -> unique ids first, their summed
    weights, then padding (id 0, weight 0)."""
    shape = ids.shape
    ids2, w2 = ids.reshape(-1, shape[-1]).astype(np.int64), weights.reshape(-1, shape[-1])
    order = np.argsort(ids2, axis=1, kind="stable")
    s = np.take_along_axis(ids2, order, 1)
    sw = np.take_along_axis(w2, order, 1)
    first = np.ones_like(s, dtype=bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    group = np.cumsum(first, axis=1) - 1
    rows = np.broadcast_to(np.arange(s.shape[0])[:, None], s.shape)
    out_w = np.zeros(s.shape, dtype=np.float32)
    np.add.at(out_w, (rows, group), sw)
    out_ids = np.zeros(s.shape, dtype=ids.dtype)
    out_ids[rows[first], group[first]] = s[first]
    return out_ids.reshape(shape), out_w.reshape(shape)


def topk_targets(logprobs: mx.array, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely ids per position, most likely first, with their log-probabilities."""
    idx = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
    lp = mx.take_along_axis(logprobs, idx, axis=-1)
    order = mx.argsort(-lp, axis=-1)
    idx = mx.take_along_axis(idx, order, axis=-1)
    lp = mx.take_along_axis(lp, order, axis=-1)
    return np.asarray(idx), np.asarray(lp.astype(mx.float16))
