"""Distillation losses: pure functions returning (loss, ntokens).

The student side is float32 log-probabilities: at the cached ids only (its logits there minus
their logsumexp) for sparse targets, over the full vocabulary for dense ones; the teacher
side comes from the cache (sparse) or a live teacher (dense). Per-position values are averaged
over the positions whose mask is 1; a batch with no trained position gives 0, not NaN.
"""

from __future__ import annotations

import math

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

_EPS = 1e-8


def log_softmax(logits: mx.array, temperature: float = 1.0) -> mx.array:
    z = logits.astype(mx.float32) / temperature
    return z - mx.logsumexp(z, axis=-1, keepdims=True)


def masked_mean(per_pos: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    m = mask.astype(mx.float32)
    ntok = m.sum()
    return (per_pos * m).sum() / mx.maximum(ntok, 1.0), ntok


def _scaled(logits: mx.array, temperature: float) -> mx.array:
    z = logits.astype(mx.float32)
    return z if temperature == 1.0 else z / temperature


def sampled_kl_pos(lq: mx.array, counts: mx.array) -> mx.array:
    """KL(empirical ‖ student) per position, the empirical distribution being counts / n;
    lq holds the student's log-probabilities at the drawn ids.

    Its gradient is the cross-entropy gradient against the draws, an unbiased estimate of
    the forward-KL gradient; subtracting the empirical entropy only makes the value 0 when
    the student matches the draws exactly."""
    c = counts.astype(mx.float32)
    w = c / mx.maximum(c.sum(axis=-1, keepdims=True), 1.0)
    logw = mx.log(mx.maximum(w, _EPS))
    return mx.where(w > 0, w * (logw - lq), 0.0).sum(axis=-1)


def dense_kl_pos(logp_s: mx.array, logp_t: mx.array) -> mx.array:
    """KL(teacher ‖ student) per position over the full vocabulary."""
    return _kl(logp_t.astype(mx.float32), logp_s)


def buckets(lq: mx.array, logp_t: mx.array) -> tuple[mx.array, mx.array]:
    """(log p_teacher, log q_student) over k+1 buckets: the teacher's k cached ids (lq: the
    student's log-probabilities there) plus one tail bucket holding the rest of each side's
    mass. Each divergence below is exact on these buckets: the divergence between the two
    distributions coarsened to k+1 outcomes (a lower bound on the full-vocabulary value)."""
    lp_t = logp_t.astype(mx.float32)
    # Slots marked -inf are empty (a multi-teacher merge pads with them): no mass on either
    # side, so a padding id repeated there is not counted twice in the student's tail.
    valid = lp_t > -mx.inf
    lp_t = mx.where(valid, lp_t, -1e4)
    lq = mx.where(valid, lq, -1e4)
    tail_t = mx.log(mx.maximum(1.0 - mx.exp(lp_t).sum(-1, keepdims=True), _EPS))
    tail_s = mx.log(mx.maximum(1.0 - mx.exp(lq).sum(-1, keepdims=True), _EPS))
    return mx.concatenate([lp_t, tail_t], -1), mx.concatenate([lq, tail_s], -1)


def _kl(lp: mx.array, lq: mx.array) -> mx.array:
    p = mx.exp(lp)
    return mx.where(p > _EPS, p * (lp - lq), 0.0).sum(-1)


def _log_mix(lp: mx.array, lq: mx.array, w: float) -> mx.array:
    """log(w p + (1 - w) q), computed in log space."""
    return mx.logaddexp(lp + math.log(w), lq + math.log(1.0 - w))


def _jsd(lp, lq, beta, _skew):
    # TRL's generalized JSD: beta = 0 is forward KL, beta = 1 reverse KL (the limits).
    if beta == 0.0:
        return _kl(lp, lq)
    if beta == 1.0:
        return _kl(lq, lp)
    lm = _log_mix(lp, lq, beta)
    return beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)


# name -> per-position divergence of (log p_teacher, log q_student, beta, skew)
DIVERGENCES = {
    "forward_kl": lambda lp, lq, b, s: _kl(lp, lq),
    "reverse_kl": lambda lp, lq, b, s: _kl(lq, lp),
    "jsd": _jsd,
    # DistiLLM (Ko et al. 2024): KL against a skewed mixture, bounded and smoother.
    "skew_kl": lambda lp, lq, b, s: _kl(lp, _log_mix(lp, lq, s)),
    "skew_reverse_kl": lambda lp, lq, b, s: _kl(lq, _log_mix(lq, lp, s)),
    "tvd": lambda lp, lq, b, s: 0.5 * mx.abs(mx.exp(lp) - mx.exp(lq)).sum(-1),
}


def _per_position(student_logits: mx.array, targets: dict, labels, temperature: float,
                  name: str, beta: float, skew: float):
    """(KD per position, CE per position or None when labels is None).

    Sparse targets never build the student's [B, L, V] log-softmax: the student's log-prob
    at an id is its logit there minus the logsumexp, so one gather of the k ids (and the
    label, when T = 1 lets CE share the logsumexp) is all that is taken from the logits —
    the same [B, L, V] work as plain cross-entropy, forward and backward."""
    z = _scaled(student_logits, temperature)
    lse = mx.logsumexp(z, axis=-1, keepdims=True)
    sparse = "ids" in targets
    share = labels is not None and temperature == 1.0
    cols = [targets["ids"].astype(mx.int32)] if sparse else []
    if share:
        cols.append(mx.maximum(labels, 0).astype(mx.int32)[..., None])
    at = (mx.take_along_axis(z, cols[0] if len(cols) == 1 else mx.concatenate(cols, -1), -1)
          - lse) if cols else None
    if "counts" in targets:
        if name != "forward_kl":
            raise ValueError(f"loss {name!r} is not defined on sampled targets")
        per = sampled_kl_pos(at[..., :targets["ids"].shape[-1]], targets["counts"])
    elif sparse:
        lq = at[..., :targets["ids"].shape[-1]]
        per = DIVERGENCES[name](*buckets(lq, targets["logprobs"]), beta, skew)
    else:
        lp_t = targets["logprobs"].astype(mx.float32)
        per = DIVERGENCES[name](lp_t, z - lse, beta, skew)
    if labels is None:
        return per, None
    ce = -at[..., -1] if share else _ce_pos(student_logits, labels)
    return per, ce


def _ce_pos(student_logits: mx.array, labels: mx.array) -> mx.array:
    z = student_logits.astype(mx.float32)
    lab = mx.maximum(labels, 0).astype(mx.int32)[..., None]
    return (mx.logsumexp(z, axis=-1, keepdims=True) - mx.take_along_axis(z, lab, -1))[..., 0]


def kd_loss(student_logits: mx.array, targets: dict, mask: mx.array,
            temperature: float = 1.0, name: str = "forward_kl", beta: float = 0.5,
            skew: float = 0.1) -> tuple[mx.array, mx.array]:
    """Divergence `name` of the student from cached or live teacher targets, times T^2 (so
    the gradient scale does not shrink as T grows, Hinton et al. 2015).

    targets: {"ids", "counts"} (sampled: forward KL only, the draws say nothing about the
    teacher's probability of ids they missed), {"ids", "logprobs"} (top-k) or {"logprobs"}
    (dense, full vocabulary)."""
    per, _ = _per_position(student_logits, targets, None, temperature, name, beta, skew)
    loss, ntok = masked_mean(per, mask)
    return loss * (temperature ** 2), ntok


def hidden_loss(pred: mx.array, target: mx.array, mask: mx.array,
                kind: str = "cosine") -> tuple[mx.array, mx.array]:
    """Feature distillation: projected student states against cached teacher states.
    "mse" averages the squared error over the width; "cosine" is 1 - cosine similarity,
    which ignores scale (intermediate states are not normalised, and their norms differ
    between models)."""
    p, t = pred.astype(mx.float32), target.astype(mx.float32)
    if kind == "mse":
        per = ((p - t) ** 2).mean(-1)
    else:
        cos = (p * t).sum(-1) / (mx.linalg.norm(p, axis=-1) * mx.linalg.norm(t, axis=-1) + _EPS)
        per = 1.0 - cos
    return masked_mean(per, mask)


def ce_loss(student_logits: mx.array, labels: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Hard-label cross-entropy; labels < 0 (no next token) are ignored."""
    return masked_mean(_ce_pos(student_logits, labels), mask.astype(mx.bool_) & (labels >= 0))


def distill_loss(student_logits: mx.array, targets: dict, labels: mx.array, mask: mx.array,
                 alpha: float = 0.0, temperature: float = 1.0, name: str = "forward_kl",
                 beta: float = 0.5, skew: float = 0.1):
    """(1 - alpha) * KD + alpha * CE -> (loss, ntokens, kd, ce). CE is computed even at
    alpha = 0: it is logged, and shares the KD's logsumexp and gather."""
    kd, ntok, ce, _ = _kd_and_ce(student_logits, targets, labels, mask, temperature, name,
                                 beta, skew)
    return (1.0 - alpha) * kd + alpha * ce, ntok, kd, ce


def _kd_and_ce(student_logits, targets, labels, mask, temperature, name, beta, skew):
    """(KD x T^2, its trained tokens, CE, its tokens): masked means of _per_position."""
    per, ce_per = _per_position(student_logits, targets, labels, temperature, name, beta, skew)
    kd, ntok = masked_mean(per, mask)
    ce, n_ce = masked_mean(ce_per, mask.astype(mx.bool_) & (labels >= 0))
    return kd * (temperature ** 2), ntok, ce, n_ce


def chunked_distill_loss(hidden: mx.array, head, head_params, targets: dict,
                         labels: mx.array, mask: mx.array, chunk: int, alpha: float = 0.0,
                         temperature: float = 1.0, name: str = "forward_kl", beta: float = 0.5,
                         skew: float = 0.1):
    """distill_loss from the final hidden states, `chunk` positions at a time, so [B, L, V]
    float32 logits, their log-softmax and its gradient never exist for the whole sequence —
    what bounds memory for 150k-token vocabularies.

    A custom VJP recomputes each chunk's logits in the backward pass, and mx.depends chains
    the chunks so that MLX evaluates them one after another: with plain mx.checkpoint per
    chunk the graph lets all chunks' recomputations run at once, which measured 3x the peak
    of this. Sums, not means, are accumulated, so the result equals the unchunked loss up to
    float summation order.

    head(params, h) -> logits; head_params (a parameter tree) gets its gradient through the
    custom VJP; ids, labels and the mask are constants."""
    names = [k for k, _ in tree_flatten(head_params)]
    leaves = [v for _, v in tree_flatten(head_params)]
    nl = len(names)
    slices = [slice(lo, lo + chunk) for lo in range(0, hidden.shape[1], chunk)]

    def sums(ls, h, sl):
        logits = head(tree_unflatten(list(zip(names, ls))), h)
        kd, n, ce, n_ce = _kd_and_ce(logits, {k: v[:, sl] for k, v in targets.items()},
                                     labels[:, sl], mask[:, sl], temperature, name, beta, skew)
        return [kd * n, n, ce * n_ce, n_ce]

    @mx.custom_function
    def total(*args):
        ls, h = list(args[:nl]), args[nl]
        acc, prev = [mx.array(0.0)] * 4, None
        for sl in slices:
            hs = h[:, sl] if prev is None else mx.depends(h[:, sl], prev)
            prev = sums(ls, hs, sl)
            acc = [a + b for a, b in zip(acc, prev)]
        return acc

    @total.vjp
    def total_vjp(primals, cotangents, _outputs):
        ls, h = list(primals[:nl]), primals[nl]
        dls, dh, prev = [mx.zeros_like(v) for v in ls], [], None
        for sl in slices:
            hs = h[:, sl] if prev is None else mx.depends(h[:, sl], prev)
            _, g = mx.vjp(lambda *a, sl=sl: sums(list(a[:nl]), a[nl], sl), ls + [hs],
                          list(cotangents))
            dls = [a + b for a, b in zip(dls, g[:nl])]
            dh.append(g[nl])
            prev = [g[nl]] + dls
        return tuple(dls) + (mx.concatenate(dh, axis=1),)

    kd_sum, ntok, ce_sum, n_ce = total(*leaves, hidden)
    kd = kd_sum / mx.maximum(ntok, 1.0)
    ce = ce_sum / mx.maximum(n_ce, 1.0)
    return (1.0 - alpha) * kd + alpha * ce, ntok, kd, ce
