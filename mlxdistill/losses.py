"""Distillation losses: pure functions returning (loss, ntokens).

The student side is float32 log-probabilities: at the cached ids only (its logits there minus
their logsumexp) for sparse targets, over the full vocabulary for dense ones; the teacher
side comes from the cache (sparse) or a live teacher (dense). Per-position values are averaged
over the positions whose mask is 1; a batch with no trained position gives 0, not NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

_EPS = 1e-8


@dataclass(frozen=True)
class KD:
    """The distillation term's settings, fixed for a run (built from `cfg.loss`): the
    divergence `name` (a key of DIVERGENCES), the temperature T, `beta` (JSD's mixture
    weight; symmetric KL's share of reverse KL), `skew` (the skewed KLs' mixture weight) and
    `alpha`, the share of hard-label cross-entropy in the objective."""
    name: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    alpha: float = 0.0


def log_softmax(logits: mx.array, temperature: float = 1.0) -> mx.array:
    z = logits.astype(mx.float32) / temperature
    return z - mx.logsumexp(z, axis=-1, keepdims=True)


def masked_mean(per_pos: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    # where, not a product: a NaN at an untrained position must not reach the sum.
    keep = mask.astype(mx.bool_)
    ntok = keep.astype(mx.float32).sum()
    return mx.where(keep, per_pos, 0.0).sum() / mx.maximum(ntok, 1.0), ntok


def finite_targets(targets: dict, mask: mx.array) -> dict:
    """Float teacher tensors with every untrained position replaced by 0. A value selected
    away by `where` still enters the backward pass (0 x NaN is NaN), so a NaN or inf in a
    teacher row the mask excludes must be removed from the inputs, not only from the sum
    (TRL indexes the trained positions out for the same reason). Integer tensors (ids, draw
    counts) cannot hold one and are passed through untouched."""
    keep = mask.astype(mx.bool_)
    out = {}
    for key, v in targets.items():
        if mx.issubdtype(v.dtype, mx.floating):
            m = keep.reshape(keep.shape + (1,) * (v.ndim - keep.ndim))
            v = mx.where(m, v, mx.zeros_like(v))
        out[key] = v
    return out


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
    return _kl(_log0(logp_t), logp_s)


# log 0 as a finite number: exp of it is exactly 0 in float32, and unlike -inf it never
# makes inf - inf or 0 x inf, so no NaN reaches a gradient.
LOG0 = -1e30


def _log0(lp: mx.array) -> mx.array:
    return mx.maximum(lp.astype(mx.float32), LOG0)


def absent(lp: mx.array) -> mx.array:
    return lp <= LOG0 / 2


def _topk_lse(z: mx.array, ids: mx.array, valid: mx.array, zk: mx.array
              ) -> tuple[mx.array, mx.array]:
    """(logsumexp of z, logsumexp of z without the valid `ids`), both [..., 1]; zk: z at ids.

    Their difference is the log of the student's mass outside the k ids. It is computed
    this way, not as log(1 - sum of the k probabilities), because that difference cancels
    in float32 as the student grows confident: at a tail mass of 1e-5 it was off by up to
    60 %, and below ~1e-7 it was 0, so an over-confident student got no push back toward
    the teacher's tail. The full logsumexp comes from the two parts, so this is one pass
    over the vocabulary, not two. Empty slots point at slot 0's id, removing nothing extra."""
    ids = mx.where(valid, ids, ids[..., :1])
    rest = mx.logsumexp(mx.put_along_axis(z, ids, mx.array(LOG0, z.dtype), axis=-1),
                        axis=-1, keepdims=True)
    lse = logaddexp(rest, mx.logsumexp(mx.where(valid, zk, LOG0), axis=-1, keepdims=True))
    return lse, rest


def buckets(lq: mx.array, logp_t: mx.array, tail_s: mx.array, tail_t: mx.array
            ) -> tuple[mx.array, mx.array]:
    """(log p_teacher, log q_student) over k+1 buckets: the teacher's k cached ids (lq: the
    student's log-probabilities there) plus one tail bucket holding the rest of each side's
    mass (tail_s, tail_t: [..., 1] log-masses). Each divergence below is exact on these
    buckets: the divergence between the two distributions coarsened to k+1 outcomes (a
    lower bound on the full-vocabulary value). Slots whose teacher log-prob is -inf are
    empty (a multi-teacher merge pads with them): log 0 on both sides, no mass counted."""
    lp_t = _log0(logp_t)
    lq = mx.where(absent(lp_t), LOG0, lq)
    return (mx.concatenate([lp_t, _log0(tail_t)], -1),
            mx.concatenate([lq, _log0(tail_s)], -1))


def teacher_tail(logp_t: mx.array) -> mx.array:
    """log(1 - sum p) of cached top-k log-probs, [..., 1]: only for targets written without
    the teacher's tail (caches store it, computed from the logits, see
    targets.tail_logprob). Computed in float32 here, so it cancels when the teacher is
    confident."""
    s = mx.exp(_log0(logp_t)).sum(-1, keepdims=True)
    return mx.log(mx.maximum(1.0 - s, 0.0))


def _kl(lp: mx.array, lq: mx.array) -> mx.array:
    """sum p (log p - log q) over the outcomes where both sides have mass. An outcome with
    p = 0 adds 0; one with q = 0 < p (the true KL is +inf there) is skipped, as torchtune's
    and DistiLLM's losses skip ids whose log-probability is -inf (TRL returns +inf): a loss
    of inf would stop training, while the rest of the sum still pulls q toward p."""
    keep = ~(absent(lp) | absent(lq))
    lp, lq = mx.where(keep, lp, 0.0), mx.where(keep, lq, 0.0)
    return mx.where(keep, mx.exp(lp) * (lp - lq), 0.0).sum(-1)


def logaddexp(a: mx.array, b: mx.array) -> mx.array:
    """log(e^a + e^b) with a gradient accurate for both arguments. mx.logaddexp's gradient
    toward its second argument is 1 - (the first's share) when the second is the smaller:
    it cancels, off by 7e-4 relative at a gap of 11 nats and 1 % at 13; here each share is
    its own ratio of exponentials."""
    m = mx.stop_gradient(mx.maximum(a, b))
    return m + mx.log(mx.exp(a - m) + mx.exp(b - m))


def _log_mix(lp: mx.array, lq: mx.array, w: float) -> mx.array:
    """log(w p + (1 - w) q), computed in log space."""
    return logaddexp(lp + math.log(w), lq + math.log(1.0 - w))


def _jsd(lp, lq, beta, _skew):
    """Generalized JSD in TRL's convention: beta KL(p ‖ m) + (1 - beta) KL(q ‖ m) with
    m = beta p + (1 - beta) q. beta = 0 and beta = 1 are defined as forward and reverse KL
    (as TRL does); they are special cases, not limits: the mixture tends to 0 at both ends
    (jsd(1e-3) is about 1e-3 x forward KL)."""
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
    # (1 - beta) forward + beta reverse KL: torchtune's SymmetricKLLoss(sym_kd_ratio) and
    # DistiLLM's symmetric_kl(lam) weight forward KL by 1 - beta.
    "symmetric_kl": lambda lp, lq, b, s: (1.0 - b) * _kl(lp, lq) + b * _kl(lq, lp),
    # DistiLLM (Ko et al. 2024): KL against a skewed mixture, bounded and smoother.
    "skew_kl": lambda lp, lq, b, s: _kl(lp, _log_mix(lp, lq, s)),
    "skew_reverse_kl": lambda lp, lq, b, s: _kl(lq, _log_mix(lq, lp, s)),
    "tvd": lambda lp, lq, b, s: 0.5 * mx.abs(mx.exp(lp) - mx.exp(lq)).sum(-1),
}


def _per_position(student_logits: mx.array, targets: dict, labels, kd: KD):
    """(KD per position, CE per position or None when labels is None).

    Sparse targets never build the student's [B, L, V] log-softmax: the student's log-prob
    at an id is its logit there minus the logsumexp, so one gather of the k ids (and the
    label, when T = 1 lets CE share the logsumexp) is all that is taken from the logits —
    the same [B, L, V] work as plain cross-entropy, forward and backward. Top-k targets
    remove their ids from one copy of the logits for the student's tail (_topk_lse), whose
    logsumexp then gives the full one."""
    z = _scaled(student_logits, kd.temperature)
    sparse = "ids" in targets
    topk = sparse and "logprobs" in targets
    share = labels is not None and kd.temperature == 1.0
    cols = [targets["ids"].astype(mx.int32)] if sparse else []
    if share:
        cols.append(mx.maximum(labels, 0).astype(mx.int32)[..., None])
    picked = (mx.take_along_axis(z, cols[0] if len(cols) == 1 else mx.concatenate(cols, -1), -1)
              if cols else None)
    if topk:
        k = targets["ids"].shape[-1]
        lse, rest = _topk_lse(z, cols[0], ~absent(_log0(targets["logprobs"])),
                              picked[..., :k])
    else:
        lse = mx.logsumexp(z, axis=-1, keepdims=True)
    at = picked - lse if cols else None
    if "counts" in targets:
        if kd.name != "forward_kl":
            raise ValueError(f"loss {kd.name!r} is not defined on sampled targets")
        per = sampled_kl_pos(at[..., :targets["ids"].shape[-1]], targets["counts"])
    elif topk:
        tail_t = (targets["tail_logprob"][..., None] if "tail_logprob" in targets
                  else teacher_tail(targets["logprobs"]))
        per = DIVERGENCES[kd.name](*buckets(at[..., :k], targets["logprobs"], rest - lse,
                                            tail_t), kd.beta, kd.skew)
    else:
        per = DIVERGENCES[kd.name](_log0(targets["logprobs"]), z - lse, kd.beta, kd.skew)
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
    teacher's probability of ids they missed), {"ids", "logprobs", "tail_logprob"} (top-k;
    the teacher's log-mass outside the k ids, computed from its logits when the cache was
    written; without it the tail is 1 - sum p in float32) or {"logprobs"} (dense, full
    vocabulary)."""
    per, _ = _per_position(student_logits, finite_targets(targets, mask), None,
                           KD(name, temperature, beta, skew))
    loss, ntok = masked_mean(per, mask)
    return loss * (temperature ** 2), ntok


def hidden_loss(pred: mx.array, target: mx.array, mask: mx.array,
                kind: str = "cosine") -> tuple[mx.array, mx.array]:
    """Feature distillation: projected student states against cached teacher states.
    "mse" averages the squared error over the width; "cosine" is 1 - cosine similarity,
    which ignores scale (intermediate states are not normalised, and their norms differ
    between models)."""
    p = pred.astype(mx.float32)
    t = finite_targets({"t": target.astype(mx.float32)}, mask)["t"]
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
                 kd: KD = KD()):
    """(1 - alpha) * KD + alpha * CE -> (loss, ntokens, kd, ce). CE is computed even at
    alpha = 0: it is logged, and shares the KD's logsumexp and gather."""
    kd_v, ntok, ce, _ = _kd_and_ce(student_logits, targets, labels, mask, kd)
    return (1.0 - kd.alpha) * kd_v + kd.alpha * ce, ntok, kd_v, ce


def _kd_and_ce(student_logits, targets, labels, mask, kd: KD):
    """(KD x T^2, its trained tokens, CE, its tokens): masked means of _per_position."""
    per, ce_per = _per_position(student_logits, finite_targets(targets, mask), labels, kd)
    kd_v, ntok = masked_mean(per, mask)
    ce, n_ce = masked_mean(ce_per, mask.astype(mx.bool_) & (labels >= 0))
    return kd_v * (kd.temperature ** 2), ntok, ce, n_ce


def chunked_distill_loss(hidden: mx.array, head, head_params, targets: dict,
                         labels: mx.array, mask: mx.array, chunk: int, kd: KD = KD()):
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
        kd_v, n, ce, n_ce = _kd_and_ce(logits, {k: v[:, sl] for k, v in targets.items()},
                                       labels[:, sl], mask[:, sl], kd)
        return [kd_v * n, n, ce * n_ce, n_ce]

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
    kd_v = kd_sum / mx.maximum(ntok, 1.0)
    ce = ce_sum / mx.maximum(n_ce, 1.0)
    return (1.0 - kd.alpha) * kd_v + kd.alpha * ce, ntok, kd_v, ce
