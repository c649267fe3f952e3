"""Distillation losses: pure functions returning (loss, ntokens).

The student side is always a float32 log-softmax over the full vocabulary; the teacher side
comes from the cache (sparse) or a live teacher (dense). Per-position values are averaged
over the positions whose mask is 1; a batch with no trained position gives 0, not NaN.
"""

from __future__ import annotations

import mlx.core as mx

_EPS = 1e-8


def log_softmax(logits: mx.array, temperature: float = 1.0) -> mx.array:
    z = logits.astype(mx.float32) / temperature
    return z - mx.logsumexp(z, axis=-1, keepdims=True)


def masked_mean(per_pos: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    m = mask.astype(mx.float32)
    ntok = m.sum()
    return (per_pos * m).sum() / mx.maximum(ntok, 1.0), ntok


def sampled_kl_pos(logp_s: mx.array, ids: mx.array, counts: mx.array) -> mx.array:
    """KL(empirical ‖ student) per position, the empirical distribution being counts / n.

    Its gradient is the cross-entropy gradient against the draws, an unbiased estimate of
    the forward-KL gradient; subtracting the empirical entropy only makes the value 0 when
    the student matches the draws exactly."""
    c = counts.astype(mx.float32)
    w = c / mx.maximum(c.sum(axis=-1, keepdims=True), 1.0)
    lq = mx.take_along_axis(logp_s, ids.astype(mx.int32), axis=-1)
    logw = mx.log(mx.maximum(w, _EPS))
    return mx.where(w > 0, w * (logw - lq), 0.0).sum(axis=-1)


def topk_kl_pos(logp_s: mx.array, ids: mx.array, logp_t: mx.array) -> mx.array:
    """Forward KL over k+1 buckets: the teacher's top-k ids, plus one "tail" bucket holding the
    teacher's residual mass 1 - sum(top-k) against the student's mass outside those ids."""
    lp_t = logp_t.astype(mx.float32)
    p_t = mx.exp(lp_t)
    lq = mx.take_along_axis(logp_s, ids.astype(mx.int32), axis=-1)
    head = (p_t * (lp_t - lq)).sum(axis=-1)
    tail_t = mx.maximum(1.0 - p_t.sum(axis=-1), 0.0)
    tail_s = mx.maximum(1.0 - mx.exp(lq).sum(axis=-1), _EPS)
    tail = mx.where(tail_t > _EPS, tail_t * (mx.log(mx.maximum(tail_t, _EPS)) - mx.log(tail_s)),
                    0.0)
    return head + tail


def dense_kl_pos(logp_s: mx.array, logp_t: mx.array) -> mx.array:
    """KL(teacher ‖ student) per position over the full vocabulary."""
    lp_t = logp_t.astype(mx.float32)
    return (mx.exp(lp_t) * (lp_t - logp_s)).sum(axis=-1)


def kd_loss(student_logits: mx.array, targets: dict, mask: mx.array,
            temperature: float = 1.0) -> tuple[mx.array, mx.array]:
    """Forward KL of the student against cached or live teacher targets, times T^2 (so the
    gradient scale does not shrink as T grows, Hinton et al. 2015).

    targets: {"ids", "counts"} (sampled), {"ids", "logprobs"} (top-k) or {"logprobs"} (dense,
    full vocabulary)."""
    logp_s = log_softmax(student_logits, temperature)
    if "counts" in targets:
        per = sampled_kl_pos(logp_s, targets["ids"], targets["counts"])
    elif "ids" in targets:
        per = topk_kl_pos(logp_s, targets["ids"], targets["logprobs"])
    else:
        per = dense_kl_pos(logp_s, targets["logprobs"])
    loss, ntok = masked_mean(per, mask)
    return loss * (temperature ** 2), ntok


def ce_loss(student_logits: mx.array, labels: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Hard-label cross-entropy; labels < 0 (no next token) are ignored."""
    logp = log_softmax(student_logits)
    valid = labels >= 0
    lq = mx.take_along_axis(logp, mx.maximum(labels, 0).astype(mx.int32)[..., None], axis=-1)
    return masked_mean(-lq[..., 0], mask.astype(mx.bool_) & valid)


def distill_loss(student_logits: mx.array, targets: dict, labels: mx.array, mask: mx.array,
                 alpha: float = 0.0, temperature: float = 1.0):
    """(1 - alpha) * KD + alpha * CE -> (loss, ntokens, kd, ce). CE is computed even at
    alpha = 0: it is logged, and costs one gather next to the model's forward pass."""
    kd, ntok = kd_loss(student_logits, targets, mask, temperature)
    ce, _ = ce_loss(student_logits, labels, mask)
    return (1.0 - alpha) * kd + alpha * ce, ntok, kd, ce
