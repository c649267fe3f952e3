"""Cross-tokenizer distillation losses: pure functions returning (loss, count), as losses.py.

Teacher and student tokenizers differ, so the teacher's cached distribution at a position is
over ids the student does not have. The aligner pairs teacher and student positions that
predict from the same text prefix; the trainer gathers, per batch, the student's logits at
the aligned positions and the teacher's cached targets at the paired teacher positions,
padded to a fixed count per row with a mask. Three ways to compare them:

- `uld_loss` (ULD, Boizard et al. 2024): L1 between the two *sorted* probability vectors,
  which needs no correspondence between the vocabularies. Needs the teacher's top-k or draws
  at the aligned positions (today's caches hold them).
- `mapped_kl_loss` (GOLD's hybrid, TRL): where the next chunk is one token on both sides,
  the teacher ids whose byte string is a student token are compared id by id, the rest as
  one bucket (optionally with ULD inside it). Same cache content as ULD.
- `chunk_likelihood_loss` (ALM, Minixhofer et al. 2025, tokenkit): per chunk of text
  between shared token boundaries, the teacher's and the student's likelihood of the same
  text. Needs the teacher's log-probability of the *actual* next token at every position,
  which today's caches do not hold: a sampled cache gives no such value, and a top-k cache
  gives it only at positions where that token is among the k.

Every function takes the run's `losses.KD` (its temperature T; `alpha` is the trainer's:
(1 - alpha) x this + alpha x CE, as for same-tokenizer runs). Untrained units are removed
from the inputs with `where` before any arithmetic (losses.finite_targets), so a NaN there
reaches neither the loss nor the gradient. The teacher side is constant (stop_gradient).
"""

from __future__ import annotations

import mlx.core as mx

from . import losses
from .losses import KD, LOG0, absent, logaddexp

# tokenkit's shift of both chunk log-likelihoods (its `epsilon`): keeps log(1 - p) finite
# when a chunk's log-likelihood rounds to 0 in float32, and still lets gradient through
# (a clamp would stop it exactly where a confident student must be pulled back).
CHUNK_EPS = 1e-6


def _lse(x: mx.array) -> mx.array:
    return mx.logsumexp(x, axis=-1, keepdims=True)


def _student(student_lp: mx.array, keep: mx.array, temperature: float,
             extra: bool = False) -> mx.array:
    """The student's float32 log-softmax at T; masked rows become 0 first (finite, no NaN
    in the backward pass). Logits and log-probabilities give the same result (a per-row
    shift cancels). extra: one more column of log 0, a slot that empty ids can point at."""
    lq = losses.log_softmax(
        mx.where(keep[..., None], student_lp.astype(mx.float32), 0.0), temperature)
    if extra:
        lq = mx.concatenate([lq, mx.full(lq.shape[:-1] + (1,), LOG0)], -1)
    return lq


def _teacher_slots(teacher: dict) -> tuple[mx.array, mx.array]:
    """(log p per slot [..., n] with LOG0 at empty slots, log of the mass outside the slots
    [..., 1]). Top-k: the cached log-probs and tail. Draws: the empirical distribution
    counts / n (normalised as losses.sampled_kl_pos does); it has no mass outside them."""
    if "counts" in teacher:
        c = teacher["counts"].astype(mx.float32)
        w = c / mx.maximum(c.sum(-1, keepdims=True), 1.0)
        lp = mx.where(w > 0, mx.log(mx.maximum(w, 1e-30)), LOG0)
        tail = mx.full(lp.shape[:-1] + (1,), LOG0)
    else:
        lp = mx.maximum(teacher["logprobs"].astype(mx.float32), LOG0)
        tail = (teacher["tail_logprob"].astype(mx.float32)[..., None]
                if "tail_logprob" in teacher else losses.teacher_tail(teacher["logprobs"]))
        tail = mx.maximum(tail, LOG0)
    return mx.stop_gradient(lp), mx.stop_gradient(tail)


def _softplus(x: mx.array) -> mx.array:
    # log(1 + e^x), its gradient sigmoid(x) accurate at both ends (logaddexp(x, 0) is not)
    return mx.maximum(x, 0.0) + mx.log1p(mx.exp(-mx.abs(x)))


def normalized(lb: mx.array) -> mx.array:
    """Log-masses over the last axis (LOG0 = empty) renormalised to sum to 1, each bucket
    from the others' logsumexp: log p_b = -log(1 + e^(lse of the others - l_b)).

    Not l - logsumexp(l): near certainty the large bucket's log-mass is ~ -1e-9 and the
    logsumexp's rounding (an ulp of the logits' scale, ~1e-6) swamps it, so a confident
    student's or teacher's top bucket would be off by 1e-6 against a difference of 1e-9.
    Here a small bucket's error is relative, and the large one comes from the small ones.
    On the student's buckets this is a no-op in exact arithmetic; on the teacher's it
    spreads the cache's float16 rounding (the k log-probs and the tail need not sum to 1)
    over the buckets in proportion."""
    n = lb.shape[-1]
    others = mx.logsumexp(mx.where(mx.eye(n, dtype=mx.bool_), LOG0, lb[..., None, :]), -1)
    return mx.where(absent(lb), LOG0, -_softplus(others - lb))


def _absdiff(a: mx.array, b: mx.array) -> mx.array:
    """|e^a - e^b| without cancellation when both are near 1: e^hi (1 - e^(lo - hi)) with
    expm1 while lo - hi > -log 2. Only there: MLX differentiates expm1 as expm1(x) + 1,
    which cancels as x falls (off by 2e-4 at x = -12), so farther apart the plain
    difference, which does not cancel, is taken."""
    hi, lo = mx.maximum(a, b), mx.minimum(a, b)
    d = lo - hi
    near = d > -0.6931471805599453
    return mx.where(near, mx.exp(hi) * -mx.expm1(mx.where(near, d, 0.0)),
                    mx.exp(hi) - mx.exp(lo))


def sorted_l1(lq: mx.array, lp: mx.array, tail: mx.array) -> mx.array:
    """ULD's distance per position on m + 1 buckets. lq [..., V]: the student's
    log-probabilities (LOG0 = not part of the distribution); lp [..., n]: the teacher's known
    log-probabilities in any order (LOG0 = empty slot), m of them valid; tail [..., 1]: the
    log of the teacher's mass outside them.

    Both sides are sorted; the i-th largest teacher probability is paired with the
    student's i-th largest (i <= m), and the rest of each side is one bucket: the teacher's
    tail, the student's mass beyond its top m. Sum |q_i - p_i| + |rest_s - tail|: exactly
    ULD's summed L1 when the teacher has no tail (draws: their empirical distribution), and
    otherwise a lower bound on it (the L1 over the unknown ranks is at least the difference
    of their sums), as the top-k divergences in losses.py are exact on k + 1 buckets. Both
    bucket vectors are renormalised (`normalized`), and each difference is taken without
    cancellation (`_absdiff`), so two near-certain distributions compare to full precision."""
    n = lp.shape[-1]
    if n > lq.shape[-1]:
        raise ValueError(f"{n} teacher slots but only {lq.shape[-1]} student ids")
    lp = -mx.sort(-lp, axis=-1)  # caches store most likely first; a merge may not
    valid = ~absent(lp)
    top = mx.argpartition(-mx.stop_gradient(lq), n - 1, axis=-1)[..., :n]
    order = mx.argsort(-mx.take_along_axis(mx.stop_gradient(lq), top, -1), axis=-1)
    top = mx.take_along_axis(top, order, -1)
    ls = mx.take_along_axis(lq, top, -1)
    beyond = _lse(mx.put_along_axis(lq, top, mx.array(LOG0, lq.dtype), axis=-1))
    rest_s = logaddexp(beyond, _lse(mx.where(valid, LOG0, ls)))  # student mass beyond rank m
    s = normalized(mx.concatenate([mx.where(valid, ls, LOG0), rest_s], -1))
    t = normalized(mx.concatenate([lp, tail], -1))
    return _absdiff(s, t).sum(-1)


def uld_loss(student_lp: mx.array, teacher: dict, mask: mx.array,
             kd: KD = KD()) -> tuple[mx.array, mx.array]:
    """ULD at aligned positions, averaged over the positions whose mask is 1, times T.

    student_lp [..., Vs]: the student's logits or log-probabilities at the aligned
    positions (log-softmax at kd.temperature is taken here); teacher: the cached targets at
    the paired teacher positions, {"ids", "logprobs", "tail_logprob"} (top-k) or {"ids",
    "counts"} (draws); only their values are used, ULD needs no vocabulary map. mask [...]:
    1 where a position is aligned and trained.

    Top-k: the k sorted teacher probabilities against the student's top k, and the two
    tails as one bucket each (sorted_l1: a lower bound on the full-vocabulary ULD). Draws:
    the number of distinct draws m is per position; the student's top m are compared with
    the draws' sorted frequencies and all its other mass with 0 -- the exact ULD against
    the empirical distribution. The L1's gradient shrinks as 1/T (not 1/T^2 as KL's), so T
    is its factor, as T^2 is the KL's in losses.kd_loss (TRL's ULD applies none; at T = 1,
    the default, the two agree)."""
    keep = mask.astype(mx.bool_)
    lp, tail = _teacher_slots(losses.finite_targets(teacher, mask))
    per = sorted_l1(_student(student_lp, keep, kd.temperature), lp, tail)
    loss, n = losses.masked_mean(per, mask)
    return loss * kd.temperature, n


def _merged(sid: mx.array, lp: mx.array) -> tuple[mx.array, mx.array]:
    """Teacher slots whose ids map to one student id become one bucket: (first [..., k],
    true at the first slot of each mapped student id; the log of the summed probability
    there). Summing, not counting each, keeps the teacher's buckets a distribution."""
    k = sid.shape[-1]
    mapped = (sid >= 0) & ~absent(lp)
    same = (sid[..., :, None] == sid[..., None, :]) & mapped[..., :, None] & mapped[..., None, :]
    earlier = mx.tril(mx.ones((k, k), dtype=mx.bool_), -1)
    first = mapped & ~(same & earlier).any(-1)
    merged = mx.logsumexp(mx.where(same, lp[..., None, :], LOG0), axis=-1)
    return first, mx.where(first, merged, LOG0)


def mapped_kl_loss(student_lp: mx.array, teacher: dict, id_map: mx.array, mask: mx.array,
                   rest: str = "tail", kd: KD = KD()) -> tuple[mx.array, mx.array]:
    """Divergence kd.name between teacher and student over [mapped ids..., rest] at
    one-to-one positions, averaged over the positions whose mask is 1, times T^2.

    student_lp [..., Vs]: the student's logits or log-probabilities at the aligned
    positions (log-softmax at kd.temperature here); teacher: the cached targets at the
    paired teacher positions (top-k or draws, as uld_loss); id_map [Vt] int32: teacher id ->
    the student id with the same byte string, -1 when none (the aligner's string_map);
    mask [...]: 1 where a position is aligned, one-to-one (its next chunk is a single token
    on both sides) and trained -- the caller ANDs these.

    Each teacher slot is mapped through id_map; slots that land on the same student id are
    merged (their probabilities summed). The teacher's rest bucket is its unmapped slots'
    mass plus its tail (draws: the unmapped draws' share); the student's rest is its mass
    outside this position's mapped ids, a logsumexp with those ids removed (as
    losses._topk_lse), never 1 - sum q, which cancels when the student is confident. The
    divergence is exact on these buckets (losses.buckets and DIVERGENCES; draws: forward KL
    only, as in losses.kd_loss).

    A student token with no teacher counterpart at this position (the student's "12" where
    the teacher has "1" and "2") is in the rest bucket: it moves with the rest as a whole,
    its share of the rest untouched -- for forward KL, d loss / d z_j = q_j (1 - p_rest /
    q_rest), no push down unless the student's rest outweighs the teacher's. Dropping the
    rest bucket (KL over the mapped ids alone, as GOLD's matched part) would push every
    such token down by q_j x (teacher's mapped mass): the suppression X-Token measured.

    rest="uld" (GOLD's hybrid: exact divergence where strings match, ULD where they do not)
    keeps the rest bucket for the rest's mass and adds, weighted by the teacher's rest mass
    p_rest, ULD between the two sides' distributions *within* the rest (sorted_l1 on the
    conditionals: the teacher's unmapped slots and tail, the student's ids outside the
    mapped ones), times T -- KL's chain rule with the within-rest KL, which needs a
    correspondence, replaced by ULD. That term cannot change the rest's total mass, so the
    property above holds for the rest as a whole."""
    per, _ = _mapped_per(student_lp, teacher, id_map, mask, rest, kd)
    return losses.masked_mean(per, mask)


def _mapped_per(student_lp: mx.array, teacher: dict, id_map: mx.array, mask: mx.array,
                rest: str, kd: KD) -> tuple[mx.array, mx.array]:
    """mapped_kl_loss per position, and the student's logsumexp at T [..., 1] (CE shares it).

    The student's distribution is never built over the vocabulary: its log-probability at a
    mapped id is the logit there minus the logsumexp, and its rest bucket is the logsumexp
    of the logits with this position's mapped ids removed, from which the full logsumexp
    follows (losses._topk_lse's construction: one pass over the vocabulary, as the
    same-tokenizer top-k loss). A position where no slot maps removes one id (slot 0's
    fallback, 0) and adds it back, so every position takes the same shape of work."""
    if rest not in ("tail", "uld"):
        raise ValueError(f"rest must be 'tail' or 'uld', not {rest!r}")
    if "counts" in teacher and kd.name != "forward_kl":
        raise ValueError(f"loss {kd.name!r} is not defined on sampled targets")
    keep = mask.astype(mx.bool_)
    lp, tail = _teacher_slots(losses.finite_targets(teacher, mask))
    # masked rows become 0 first: a NaN there must not reach the logsumexp's backward
    z = mx.where(keep[..., None], student_lp.astype(mx.float32), 0.0) / kd.temperature
    sid = mx.take(id_map.astype(mx.int32), teacher["ids"].astype(mx.int32))
    first, lp_m = _merged(sid, lp)
    k = sid.shape[-1]
    any_m = first.any(-1, keepdims=True)
    fallback = mx.where(any_m, mx.max(mx.where(first, sid, -1), -1, keepdims=True), 0)
    idx = mx.where(first, sid, fallback)  # every slot points at an id removed once
    once = first | ((mx.arange(k) == 0) & ~any_m)
    zr = mx.take_along_axis(z, idx, -1)
    outside = mx.put_along_axis(z, idx, mx.array(LOG0, z.dtype), axis=-1)
    rest_z = _lse(outside)
    lse = logaddexp(rest_z, _lse(mx.where(once, zr, LOG0)))
    rest_z = mx.where(any_m, rest_z, lse)  # nothing mapped: the rest is everything
    unmapped = ~absent(lp) & (sid < 0)
    rest_t = logaddexp(tail, _lse(mx.where(unmapped, lp, LOG0)))
    lp_b, lq_b = losses.buckets(mx.where(first, zr - lse, LOG0), lp_m, rest_z - lse, rest_t)
    lp_b, lq_b = normalized(lp_b), normalized(lq_b)
    per = losses.DIVERGENCES[kd.name](lp_b, lq_b, kd.beta, kd.skew) * kd.temperature ** 2
    if rest == "uld":
        t_in = mx.where(unmapped, lp - rest_t, LOG0)
        tail_in = mx.where(absent(tail), LOG0, tail - rest_t)
        # the student's conditional within its rest; the mapped ids stay at log 0
        inside = mx.where(any_m, outside, z)
        s_in = mx.where(absent(inside), LOG0, inside - rest_z)
        p_rest = mx.exp(lp_b[..., -1])  # the teacher's rest share, renormalised
        per = per + p_rest * sorted_l1(s_in, t_in, tail_in) * kd.temperature
    return per, lse


def log1mexp(x: mx.array) -> mx.array:
    """log(1 - e^x) for x < 0, as tokenkit's log1mexp (Maechler 2012): log1p(-e^x) far
    from 0, log(-expm1(x)) near it, each where it does not cancel."""
    return mx.where(x < -0.6931471805599453, mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))


def next_token_logprobs(student_logits: mx.array, labels: mx.array) -> mx.array:
    """The student's log-probability of each position's actual next token (labels [B, L];
    < 0: none, 0 there), chunk_likelihood_loss's input, as -log(1 + sum over j != y of
    e^(z_j - z_y)), not z_y - logsumexp(z): near certainty the latter rounds to 0 (an ulp of
    the logits' scale, ~1e-6, against a true -1e-9) and its gradient toward z_y, 1 - q_y,
    to 0, while the binary divergence's gradient grows as 1 / (1 - q): both factors must be
    right. One pass over the vocabulary, as a logsumexp."""
    z = student_logits.astype(mx.float32)
    y = mx.maximum(labels, 0).astype(mx.int32)[..., None]
    zy = mx.take_along_axis(z, y, -1)
    others = _lse(mx.put_along_axis(z, y, mx.array(LOG0, z.dtype), axis=-1))
    return mx.where(labels >= 0, -_softplus(others - zy)[..., 0], 0.0)


def chunk_likelihood_loss(student_next_lp: mx.array, s_chunk: mx.array,
                          teacher_chunk_lp: mx.array, chunk_mask: mx.array,
                          kd: KD = KD()) -> tuple[mx.array, mx.array]:
    """ALM's binarised divergence between the teacher's and the student's likelihood of each
    chunk, averaged over the chunks whose mask is 1, times T.

    student_next_lp [B, Ls]: the student's log-probability (plain softmax, T = 1) of its
    actual next token at each position (next_token_logprobs); s_chunk [B, Ls] int32: the
    chunk (0..K-1) holding the token each position predicts, -1 for none (ids >= K are
    ignored as well);
    teacher_chunk_lp [B, K]: the teacher's chunk log-likelihoods (the caller sums its
    per-token log-probs per chunk); chunk_mask [B, K]: 1 for chunks to train.

    The student's chunk log-likelihood is a segment sum, done as a [B, 1, Ls] x [B, Ls, K]
    matmul with a one-hot matrix rather than a scatter-add: the one-hot products are exact
    and every chunk is summed in one fixed order, so the value is deterministic (a GPU
    scatter-add accumulates with atomics in arbitrary order, which breaks bit-exact
    resume); its backward is another matmul, not a scatter; and the one-hot costs B Ls K
    floats (16 MB a row at Ls = K = 2048), small next to the [B, Ls, V] logits.

    Per chunk, with a = lp_t / T and b = lp_s / T (each shifted by CHUNK_EPS, as tokenkit),
    the two outcomes {the chunk, not the chunk} get log-probs [a, log(1 - e^a)] and
    [b, log(1 - e^b)], and DIVERGENCES[kd.name] is taken on them. forward_kl gives
    p log(p/q) + (1-p) log((1-p)/(1-q)): tokenkit's default `binary_ce` minus the teacher's
    binary entropy (a constant: same gradient, 0 when the two match); reverse_kl is its
    `reverse_binary_kl`. T is ALM's chunk temperature (tokenkit's `bce_temp`, 100 in its
    recipes): both chunk probabilities raised to 1/T, which moves long chunks' tiny
    probabilities toward 1, where the binary divergence sees their ratio. The factor T keeps
    the gradient's scale as T grows, and makes the large-T limit tokenkit's
    `binary_kl_temp_limit`: (a - b) + a log(b / a) for the raw log-likelihoods."""
    B, K = teacher_chunk_lp.shape
    cm = chunk_mask.astype(mx.bool_)
    valid = (s_chunk >= 0) & (s_chunk < K)
    ci = mx.where(valid, s_chunk, 0).astype(mx.int32)
    # a position whose chunk is masked must be zeroed too: in a matmul 0 x NaN is NaN in
    # every chunk of its row, not only its own
    pos = valid & mx.take_along_axis(cm, ci, -1)
    x = mx.where(pos, student_next_lp.astype(mx.float32), 0.0)
    onehot = (ci[..., None] == mx.arange(K)) & pos[..., None]
    ls = mx.matmul(x[:, None, :], onehot.astype(mx.float32))[:, 0, :]
    ls = mx.where(cm, ls, 0.0)
    lt = mx.stop_gradient(mx.where(cm, teacher_chunk_lp.astype(mx.float32), 0.0))
    t = kd.temperature
    a = mx.maximum(mx.minimum(lt, 0.0) / t, LOG0) - CHUNK_EPS
    # a sum above 0 (a caller's rounding) counts as 0; a where, not mx.minimum, whose
    # gradient at a tie is 0 -- and a near-certain student's sum is exactly 0 in float32
    b = mx.where(ls > 0, 0.0, ls) / t - CHUNK_EPS
    two_t = mx.stack([a, log1mexp(a)], -1)
    two_s = mx.stack([b, log1mexp(b)], -1)
    per = losses.DIVERGENCES[kd.name](two_t, two_s, kd.beta, kd.skew)
    loss, n = losses.masked_mean(per, cm)
    return loss * t, n


TEACHER_KEYS = ("ids", "counts", "logprobs", "tail_logprob")


def cross_distill_loss(kind: str, student_logits: mx.array, targets: dict, labels: mx.array,
                       mask: mx.array, id_map: mx.array, kd: KD = KD()):
    """(1 - alpha) x the cross-tokenizer loss `kind` + alpha x CE -> (loss, ntokens, kd, ce),
    as losses.distill_loss, on a batch in the student's tokens (xtok.AlignedReader):
    targets holds the teacher's cached draws or top-k gathered at each student position's
    paired teacher position, "aligned" and "one" (1 where a position is paired / its next
    token is the same string on both sides) and, for "chunk", "s_chunk", "chunk_lp" and
    "chunk_mask". mask: the student's trained positions; CE is over them."""
    trained = mask.astype(mx.bool_)
    teacher = {k: v for k, v in targets.items() if k in TEACHER_KEYS}
    if kind in ("mapped", "hybrid"):
        # per position over every trained one (their logits kept), averaged over `one`
        per, lse = _mapped_per(student_logits, teacher, id_map, trained,
                               "tail" if kind == "mapped" else "uld", kd)
        kd_v, _ = losses.masked_mean(per, trained & targets["one"].astype(mx.bool_))
        if kd.temperature == 1.0:  # CE from the same logsumexp: no second pass
            lab = mx.maximum(labels, 0).astype(mx.int32)[..., None]
            ce_pos = (lse - mx.take_along_axis(student_logits.astype(mx.float32), lab, -1))
            ce, ntok = losses.masked_mean(ce_pos[..., 0], trained & (labels >= 0))
            return (1.0 - kd.alpha) * kd_v + kd.alpha * ce, ntok, kd_v, ce
    elif kind == "uld":
        kd_v, _ = uld_loss(student_logits, teacher, trained & targets["aligned"].astype(mx.bool_),
                           kd)
    elif kind == "chunk":
        kd_v, _ = chunk_likelihood_loss(next_token_logprobs(student_logits, labels),
                                        targets["s_chunk"], targets["chunk_lp"],
                                        targets["chunk_mask"], kd)
    else:
        raise ValueError(f"unknown cross-tokenizer loss {kind!r}")
    ce, ntok = losses.ce_loss(student_logits, labels, mask)
    return (1.0 - kd.alpha) * kd_v + kd.alpha * ce, ntok, kd_v, ce
