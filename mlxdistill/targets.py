"""Teacher logits -> the sparse targets a cache stores: sampled ids + counts (optionally with
the top-1 kept exactly) or the top-k ids with their log-probabilities; optionally the
log-probability of each actual next token."""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import numpy as np


def _inverse_cdf(w, u, xp=mx):
    """For each row of w [R, V] (non-negative weights) and each u [R, m] in [0, row sum):
    the id i with cdf[i-1] <= u < cdf[i] (numpy's searchsorted, side="right"), found in two
    levels — the block of about sqrt(V) entries from the block sums' cumulative sum, then the
    entry from that block's own — so nothing vocabulary-long is summed cumulatively, and
    the comparisons cost R * m * sqrt(V). xp: mlx.core or numpy, whichever holds w."""
    rows, vocab = w.shape
    block = 1 << max(4, math.ceil(math.log2(math.sqrt(vocab))))
    nb = -(-vocab // block)
    if nb * block != vocab:
        w = xp.pad(w, [(0, 0), (0, nb * block - vocab)])
    blocks = w.reshape(rows, nb, block)
    bcdf = xp.cumsum(blocks.sum(-1), axis=-1)  # [R, nb]
    b = xp.minimum((bcdf[:, None, :] <= u[..., None]).sum(-1), nb - 1)  # [R, m]
    below = xp.where(b > 0, xp.take_along_axis(bcdf, xp.maximum(b - 1, 0), -1), 0.0)
    inner = xp.cumsum(xp.take_along_axis(blocks, b[..., None], 1), axis=-1)  # [R, m, block]
    j = xp.minimum((inner <= (u - below)[..., None]).sum(-1), block - 1)
    return xp.minimum(b * block + j, vocab - 1)


def sample_targets(logits: mx.array, n: int, rng: np.random.Generator, keep_top1: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """n draws per position from softmax(logits), as unique ids + counts (padded with count 0).

    The empirical distribution counts/n is an unbiased estimate of the teacher distribution,
    so the student's cross-entropy against it has the forward-KL gradient in expectation
    (Sparse Logit Sampling, Anshumann et al. 2025). Drawn by inverse CDF with uniforms from
    `rng` (so a seed fixes the draws), in two levels (_inverse_cdf): a full cumulative sum
    over the vocabulary cost 12 % of the teacher pass, and mx.random.categorical with
    num_samples makes n Gumbel noises per vocabulary entry, which measured 13x slower for
    n=16, V=4096. On a GPU it all stays on the device; on the CPU backend the host is the
    device, and numpy's vectorised exp measured 4x faster than MLX's there (the exp over the
    vocabulary is most of the sampling's cost).

    keep_top1: slot 0 holds the teacher's most likely id with its probability p1 in 1/255
    units (stochastically rounded, so unbiased), and the other n-1 draws come from the
    distribution without it, each standing for (1 - p1)/(n-1) of the mass: the same bytes,
    no sampling noise on the token that carries most of the mass (see top1_weights)."""
    vocab = logits.shape[-1]
    z = logits.astype(mx.float32).reshape(-1, vocab)
    xp = mx
    if mx.default_device().type == mx.cpu:
        z, xp = np.asarray(z), np
    w = xp.exp(z - z.max(-1, keepdims=True))  # unnormalised: u is scaled to the row sum
    rows, m = w.shape[0], n
    if keep_top1:
        top = xp.argmax(w, axis=-1)
        p1 = xp.take_along_axis(w, top[:, None], -1)[:, 0] / w.sum(-1)
        w = xp.where(xp.arange(vocab)[None] == top[:, None], 0.0, w)
        m = n - 1
    u = rng.random((rows, m)).astype(np.float32)
    u = (u if xp is np else mx.array(u)) * w.sum(-1, keepdims=True)
    draws = np.asarray(_inverse_cdf(w, u, xp)).astype(np.int64)
    ids, counts = merge_ids(draws, np.ones(draws.shape, dtype=np.float32))
    if keep_top1:
        top, p1 = np.asarray(top), np.asarray(p1)
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


def tail_logprob(logprobs: mx.array, ids: np.ndarray) -> np.ndarray:
    """log of the probability outside `ids` per position (float32, -inf when there is none),
    from the full log-probabilities: the logsumexp of the rest, not log(1 - sum p), which
    cancels in float32 when the top k hold nearly all the mass (a peaked teacher's tail
    off by 4e-4 relative under reverse KL or JSD). Stored with top-k caches for the loss."""
    rest = mx.put_along_axis(logprobs, mx.array(ids.astype(np.int32)),
                             mx.array(-mx.inf, logprobs.dtype), axis=-1)
    return np.asarray(mx.logsumexp(rest, axis=-1).astype(mx.float32))


def next_logprob(logits: mx.array, labels: np.ndarray) -> mx.array:
    """log softmax(logits)[t, labels[t]] per position, float32 [B, L], 0 where labels < 0
    (no next token: the end of the stream). The label's logit minus the row's logsumexp,
    both in float32, so no [B, L, V] log-softmax is formed for one value per position."""
    z = logits.astype(mx.float32)
    y = mx.array(labels.astype(np.int32))
    picked = mx.take_along_axis(z, mx.maximum(y, 0)[..., None], axis=-1)[..., 0]
    return mx.where(y >= 0, picked - mx.logsumexp(z, axis=-1), 0.0)


def from_logits(logits: mx.array, mode: str, n: int, k: int, temperature: float,
                rng: np.random.Generator, keep_top1: bool = False,
                labels: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """The teacher targets a cache stores for a batch of logits [B, L, V], as the cache pass
    and `plan --probe` compute them: tempered by `temperature`, then `mode` "topk" (ids,
    logprobs, tail_logprob) or "sample" (ids, counts). Ids come as computed (uint32 top-k,
    int64 draws); the cache casts them to its id dtype (shards.id_dtype).

    labels: the next token of each position (data.hard_targets: -1 where there is none);
    given, "next_logprob" is added, at temperature 1 whatever `temperature` is (a
    likelihood of the text, not a distillation target), from the same logits."""
    logits = logits.astype(mx.float32)
    # Built before tempering, on the logits the targets use: one forward serves both.
    nlp = None if labels is None else next_logprob(logits, labels)
    if temperature != 1.0:  # no second [B, L, V] copy at the default T = 1
        logits = logits / temperature
    if mode == "topk":
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        ids, lp = topk_targets(logprobs, k)
        out = {"ids": ids, "logprobs": lp, "tail_logprob": tail_logprob(logprobs, ids)}
    else:
        ids, counts = sample_targets(logits, n, rng, keep_top1)
        out = {"ids": ids, "counts": counts}
    if nlp is not None:
        out["next_logprob"] = np.asarray(nlp)
    return out


def topk_targets(logprobs: mx.array, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely ids per position, most likely first, with their log-probabilities."""
    idx = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
    lp = mx.take_along_axis(logprobs, idx, axis=-1)
    order = mx.argsort(-lp, axis=-1)
    idx = mx.take_along_axis(idx, order, axis=-1)
    lp = mx.take_along_axis(lp, order, axis=-1)
    return np.asarray(idx), np.asarray(lp.astype(mx.float16))
