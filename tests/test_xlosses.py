"""Cross-tokenizer losses against float64 numpy references (MLX's float64 exp runs at float32
precision on the CPU): values and gradients with respect to the student's logits, at
confident and uncertain positions, masked NaN rows, the merge of teacher ids that share a
student id, and the X-Token property (unmatched student tokens are not suppressed)."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxdistill import xlosses
from mlxdistill.losses import KD, LOG0

VS, VT, K = 64, 48, 5
# (student's mass outside its favoured id, teacher's mass outside its top id), per position
PAIRS = [(1e-1, 1e-9), (1e-3, 1e-7), (1e-5, 1e-5), (1e-7, 1e-3), (1e-9, 1e-1),
         (1e-9, 1e-8), (1e-8, 1e-9), (0.3, 0.5)]
L = len(PAIRS)


def _lsm(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _peaked(rng, rows, V, fav, tails, scale=1.0):
    """Logits whose mass outside id fav[i] is tails[i]."""
    z = rng.normal(size=(rows, V)) * scale
    for i, (a, t) in enumerate(zip(fav, tails)):
        z[i, a] = math.log(np.exp(np.delete(z[i], a)).sum() * (1 - t) / t)
    return z


def _topk_teacher(rng, fav_t, tails, k=K):
    """Top-k targets as a cache holds them: float16 log-probs, most likely first, and the
    float32 log of the mass outside the k ids, computed from the logits."""
    lt = _lsm(_peaked(rng, len(fav_t), VT, fav_t, tails))
    ids = np.argsort(-lt, -1)[:, :k]
    lp = np.take_along_axis(lt, ids, -1).astype(np.float16)
    tail = np.array([np.log(np.sort(np.exp(np.delete(lt[i], ids[i]))).sum())
                     for i in range(len(lt))]).astype(np.float32)
    return ids, lp, tail, lt


def _sampled_teacher(rng, rows, n=8):
    ids = np.stack([rng.permutation(VT)[:n] for _ in range(rows)])
    counts = rng.integers(0, 6, size=(rows, n)).astype(np.uint8)
    counts[:, 0] = np.maximum(counts[:, 0], 1)
    return ids, counts


def _per_row(fn, rows):
    """Each position's loss on its own (a one-hot mask each), stacked: per-row values, and a
    gradient whose row i is row i's own."""
    masks = [mx.array(np.eye(rows)[i]) for i in range(rows)]
    return lambda x: mx.stack([fn(x, m)[0] for m in masks])


def _sorted_l1_ref(c, ps, t):
    """ULD on m + 1 buckets in float64 from the definition: c the student's distribution over
    its support, ps the teacher's slot probabilities (0 = empty), t its tail; the teacher's
    buckets renormalised to sum to 1, as the implementation does. Returns the value and
    each id's bucket sign (dD/dc_j)."""
    p = np.sort(ps[ps > 0])[::-1]
    m, total = len(p), p.sum() + t
    p, t = p / total, t / total
    order = np.argsort(-c)
    top, rest = order[:m], order[m:]
    r = c[rest].sum()
    s = np.full(c.shape, np.sign(r - t))
    s[top] = np.sign(c[top] - p)
    return np.abs(c[top] - p).sum() + abs(r - t), s


def _check(val, ref, g, g_ref, what, rtol=1e-5, value_rtol=1e-5):
    np.testing.assert_allclose(val, ref, rtol=value_rtol, atol=0, err_msg=what)
    g = np.asarray(g, np.float64)
    for i in range(len(ref)):  # every row on its own scale, as tests/test_numerics.py
        err = np.abs(g[i] - g_ref[i]).max() / np.abs(g_ref[i]).max()
        assert err < rtol, f"{what}: row {i} gradient off by {err:.2e} of its scale"


# ---------------------------------------------------------------- ULD


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_uld_value_and_gradient_match_float64(kind):
    rng = np.random.default_rng(0)
    z = _peaked(rng, L, VS, rng.integers(0, VS, L), [s for s, _ in PAIRS])
    if kind == "topk":
        ids, lp, tail, _ = _topk_teacher(rng, rng.integers(0, VT, L), [t for _, t in PAIRS])
        teacher = {"ids": mx.array(ids), "logprobs": mx.array(lp),
                   "tail_logprob": mx.array(tail)}
        slots = [np.exp(lp[i].astype(np.float64)) for i in range(L)]
        tails = np.exp(tail.astype(np.float64))
    else:
        ids, counts = _sampled_teacher(rng, L)
        teacher = {"ids": mx.array(ids), "counts": mx.array(counts)}
        slots = [counts[i] / counts[i].sum() for i in range(L)]
        tails = np.zeros(L)
    ref, g_ref = [], []
    for i in range(L):
        q = np.exp(_lsm(z[i]))
        v, s = _sorted_l1_ref(q, slots[i], tails[i])
        ref.append(v)
        g_ref.append(q * (s - (q * s).sum()))
        if kind == "sampled":  # exactly ULD's formula: all sorted, the shorter padded with 0
            w = np.zeros(VS)
            w[:len(slots[i])] = np.sort(slots[i])[::-1]
            assert v == pytest.approx(np.abs(np.sort(q)[::-1] - w).sum(), rel=1e-12)
    f = _per_row(lambda x, m: xlosses.uld_loss(x, teacher, m), L)
    zz = mx.array(z.astype(np.float32))
    _check(np.array(f(zz)), np.array(ref), mx.grad(lambda x: f(x).sum())(zz),
           np.array(g_ref), f"uld {kind}")


def test_uld_on_top_k_is_a_lower_bound_of_full_vocabulary_uld():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(L, VS)) * 2
    ids, lp, tail, lt = _topk_teacher(rng, rng.integers(0, VT, L), [0.3] * L)
    teacher = {"ids": mx.array(ids), "logprobs": mx.array(lp), "tail_logprob": mx.array(tail)}
    f = _per_row(lambda x, m: xlosses.uld_loss(x, teacher, m), L)
    ours = np.array(f(mx.array(z.astype(np.float32))))
    q = np.sort(np.exp(_lsm(z)), -1)[:, ::-1]
    p = np.zeros_like(q)
    p[:, :VT] = np.sort(np.exp(lt), -1)[:, ::-1]
    full = np.abs(q - p).sum(-1)
    assert (ours <= full + 1e-3).all() and (ours > 0.1 * full).all()


# ---------------------------------------------------------------- mapped KL


def _id_map(rng):
    """Teacher ids 0..35 map to distinct student ids except two pairs that share one (0 and
    1 -> the same id, 2 and 3 -> another); 36..47 have no student counterpart."""
    m = np.full(VT, -1, np.int32)
    m[:36] = rng.permutation(VS)[:36]
    m[1], m[3] = m[0], m[2]
    return m


def _mapped_ref(z, tid, lp, tail, id_map, name, rest, T):
    """One position: (value, d value / d z) in float64. Buckets: the distinct student ids the
    teacher's slots map to (teacher mass summed) and the rest."""
    lq = _lsm(z / T)
    q = np.exp(lq)
    p = np.where(lp > LOG0 / 2, np.exp(lp), 0.0)
    sid = id_map[tid]
    mapped = sorted(set(sid[(sid >= 0) & (p > 0)]))
    p_b = np.array([p[sid == s].sum() for s in mapped] + [p[sid < 0].sum() + tail])
    p_b = p_b / p_b.sum()  # the cache's float16 rounding spread, as xlosses.normalized
    inside = np.isin(np.arange(len(z)), mapped)
    q_b = np.array([q[s] for s in mapped] + [q[~inside].sum()])
    bucket = np.full(len(z), len(mapped))
    bucket[mapped] = np.arange(len(mapped))
    if name == "forward_kl":  # a bucket the teacher gives 0 adds 0 (draws: all mapped)
        val, g = (p_b * np.log(np.maximum(p_b, 1e-300) / q_b)).sum(), -p_b / q_b
    else:
        val, g = (q_b * np.log(q_b / p_b)).sum(), np.log(q_b / p_b) + 1
    val, grad = val * T * T, T * q * (g[bucket] - (q_b * g).sum())
    if rest == "uld" and p_b[-1] > 0:
        c = q[~inside] / q_b[-1]
        v, s = _sorted_l1_ref(c, np.where(sid < 0, p, 0.0) / p_b[-1], tail / p_b[-1])
        val += p_b[-1] * T * v
        grad[~inside] += p_b[-1] * c * (s - (c * s).sum())
    return val, grad


CASES = [("topk", "forward_kl", "tail", 1.0), ("topk", "reverse_kl", "tail", 1.0),
         ("topk", "forward_kl", "uld", 1.0), ("topk", "reverse_kl", "uld", 2.0),
         ("topk", "forward_kl", "tail", 2.0), ("sampled", "forward_kl", "tail", 1.0),
         ("sampled", "forward_kl", "uld", 1.0)]


@pytest.mark.parametrize("kind,name,rest,T", CASES)
def test_mapped_kl_value_and_gradient_match_float64(kind, name, rest, T):
    rng = np.random.default_rng(2)
    id_map = _id_map(rng)
    fav_t = np.where(np.arange(L) % 2 == 0, 0, rng.integers(0, VT, L))  # a shared pair
    if kind == "topk":
        ids, lp, tail, _ = _topk_teacher(rng, fav_t, [t for _, t in PAIRS])
        for i in range(0, L, 2):  # put both ids of the pair in the top k
            if 1 not in ids[i]:
                ids[i, -1] = 1
        teacher = {"ids": mx.array(ids), "logprobs": mx.array(lp),
                   "tail_logprob": mx.array(tail)}
        lps, tails = lp.astype(np.float64), np.exp(tail.astype(np.float64))
    else:
        ids, counts = _sampled_teacher(rng, L)
        ids[::2, :2] = [0, 1]
        teacher = {"ids": mx.array(ids), "counts": mx.array(counts)}
        w = counts / counts.sum(-1, keepdims=True)
        lps, tails = np.where(w > 0, np.log(np.maximum(w, 1e-300)), LOG0), np.zeros(L)
    fav_s = np.where(id_map[fav_t] >= 0, id_map[fav_t], 0)
    z = _peaked(rng, L, VS, fav_s, [s for s, _ in PAIRS]) * T
    kd = KD(name, temperature=T)
    f = _per_row(lambda x, m: xlosses.mapped_kl_loss(x, teacher, mx.array(id_map), m,
                                                     rest=rest, kd=kd), L)
    refs = [_mapped_ref(z[i], ids[i], lps[i], tails[i], id_map, name, rest, T)
            for i in range(L)]
    zz = mx.array(z.astype(np.float32))
    _check(np.array(f(zz)), np.array([r[0] for r in refs]),
           mx.grad(lambda x: f(x).sum())(zz), np.array([r[1] for r in refs]),
           f"mapped {kind} {name} {rest} T={T}",
           # row 2 (both tails 1e-5) is float32's limit: its KL (1e-6) sums terms ~10x its
           # size, and the top id's gradient, q_top - p_top = (teacher's other mass) -
           # (student's), is a difference of two masses 5 % apart, each carrying the
           # rounding of float32 log-probs at the logits' scale (~5e-7 at |log q| ~ 15):
           # 1.2e-5 .. 2.3e-5 here (tests/test_numerics.py allows 1e-4)
           rtol=3e-5, value_rtol=3e-5)


def test_mapped_kl_merges_teacher_ids_that_share_a_student_id():
    """Teacher ids 0 and 1 both map to student id 7: the same loss and gradient as one
    slot holding their summed probability (the other empty), not twice the bucket."""
    id_map = np.full(VT, -1, np.int32)
    id_map[:10] = [7, 7, 3, 4, 5, 6, 8, 9, 10, 11]
    lp = np.log(np.array([[0.4, 0.3, 0.1, 0.05, 0.05]]))
    merged = np.log(np.array([[0.7, 1.0, 0.1, 0.05, 0.05]]))
    merged[0, 1] = -np.inf  # an empty slot, as a multi-teacher merge pads
    tail = np.log(np.array([0.1]))
    z = mx.array(np.random.default_rng(3).normal(size=(1, VS)).astype(np.float32))
    ids = mx.array([[0, 1, 2, 3, 40]])
    for rest in ("tail", "uld"):
        def loss(x, lps):
            t = {"ids": ids, "logprobs": mx.array(lps.astype(np.float32)),
                 "tail_logprob": mx.array(tail.astype(np.float32))}
            return xlosses.mapped_kl_loss(x, t, mx.array(id_map), mx.ones((1,)), rest)[0]
        a, b = loss(z, lp), loss(z, merged)
        assert a.item() == pytest.approx(b.item(), rel=1e-6), rest
        ga = mx.grad(lambda x: loss(x, lp))(z)
        gb = mx.grad(lambda x: loss(x, merged))(z)
        np.testing.assert_allclose(np.array(ga), np.array(gb), rtol=1e-5, atol=1e-7)


def test_mapped_kl_does_not_suppress_a_student_token_the_teacher_lacks():
    """X-Token: the student has "12", the teacher only "1" and "2". Student vocabulary
    ["1", "2", "12", "a", "b", "c"], teacher ["1", "2", "a", "x"] ("x": no student token).
    At a position where the teacher's top 3 are "1" 0.6, "x" 0.2, "2" 0.1 (tail 0.1, on "a"),
    the mapped buckets are "1" and "2"; everything else of the student's -- "12" included --
    is the rest (p_rest = 0.3). The exact statement, forward KL, T = 1:
      d loss / d z_j = q_j (1 - p_rest / q_rest) for every j in the rest,
    so "12" keeps its share of the rest, and is pushed down only when the student's rest
    mass exceeds the teacher's (and then exactly as the rest as a whole); with rest="uld"
    the gradients over the rest still sum to q_rest - p_rest (the ULD inside the rest moves
    mass within it, never its total)."""
    id_map = mx.array([0, 1, 3, -1], dtype=mx.int32)
    t = {"ids": mx.array([[0, 3, 1]]), "logprobs": mx.array(np.log([[0.6, 0.2, 0.1]])),
         "tail_logprob": mx.array(np.log([0.1]))}
    rest_ids = [2, 3, 4, 5]
    for z0 in ([2.0, 1.0, 0.5, -1.0, -2.0, -2.0], [0.0, -1.0, 2.0, 0.0, -1.0, -3.0]):
        z = mx.array([z0])
        q = np.exp(_lsm(np.array(z0)))
        q_rest = q[rest_ids].sum()
        for rest in ("tail", "uld"):
            g = np.array(mx.grad(lambda x: xlosses.mapped_kl_loss(
                x, t, id_map, mx.ones((1,)), rest)[0])(z), np.float64)[0]
            assert g[rest_ids].sum() == pytest.approx(q_rest - 0.3, rel=1e-5), rest
            if rest == "tail":
                np.testing.assert_allclose(g[rest_ids], q[rest_ids] * (1 - 0.3 / q_rest),
                                           rtol=1e-5)
                assert (g[2] <= 0) == (q_rest <= 0.3)


# ---------------------------------------------------------------- chunk likelihood

B, LS, KC, V = 2, 12, 5, 32
S_CHUNK = np.array([[0, 0, 1, 2, 2, 2, 3, -1, 4, 4, -1, -1],
                    [0, 1, 1, 1, 2, 3, 3, 4, -1, -1, -1, -1]], np.int32)
# teacher chunk log-likelihoods; row 0 chunk 1 / row 1 chunk 3 meet a near-certain student
T_CHUNK = np.array([[-1e-9, -0.5, -3.0, -1e-9, -20.0],
                    [-0.01, -2.0, -1e-5, -0.7, -1e-9]])


def _chunk_inputs(seed=4):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(B, LS, V)) * 2
    labels = rng.integers(0, V, size=(B, LS))
    for b, p in ((0, 2), (1, 5), (1, 6)):  # near-certain next tokens (mass 1e-9 elsewhere)
        z[b, p] = _peaked(rng, 1, V, [labels[b, p]], [1e-9])[0]
    return z.astype(np.float32), labels


def _binary_ref(a, b, name):
    """(value, d value / d b) of the binarised divergence on log-probs a (teacher), b."""
    p, q = np.exp(a), np.exp(b)
    la, lb = np.log(-np.expm1(a)), np.log(-np.expm1(b))
    if name == "forward_kl":
        return p * (a - b) + (1 - p) * (la - lb), (q - p) / (1 - q)
    return q * (b - a) + (1 - q) * (lb - la), q * (b - a) - q * (lb - la)


@pytest.mark.parametrize("name,T", [("forward_kl", 1.0), ("reverse_kl", 1.0),
                                    ("forward_kl", 100.0)])
def test_chunk_likelihood_value_and_gradient_match_float64(name, T):
    z, labels = _chunk_inputs()
    next_lp = lambda x: xlosses.next_token_logprobs(x, mx.array(labels))  # noqa: E731
    nl = np.array(next_lp(mx.array(z)), np.float64)  # what the loss receives
    soft = np.exp(_lsm(z))
    onehot = np.eye(V)[labels]
    refs, grads, masks = [], [], []
    for b in range(B):
        for k in range(KC):
            at = S_CHUNK[b] == k
            a = T_CHUNK[b, k] / T - xlosses.CHUNK_EPS
            s = nl[b, at].sum() / T - xlosses.CHUNK_EPS
            v, d = _binary_ref(a, s, name)
            refs.append(v * T)
            g = np.zeros((B, LS, V))
            g[b, at] = d * (onehot[b, at] - soft[b, at])
            grads.append(g)
            m = np.zeros((B, KC))
            m[b, k] = 1
            masks.append(mx.array(m))
    kd = KD(name, temperature=T)
    s_chunk, t_chunk = mx.array(S_CHUNK), mx.array(T_CHUNK.astype(np.float32))
    zz = mx.array(z)

    def one(x, m):
        return xlosses.chunk_likelihood_loss(next_lp(x), s_chunk, t_chunk, m, kd)[0]

    vals = [one(zz, m).item() for m in masks]
    g = np.stack([np.array(mx.grad(lambda x, m=m: one(x, m))(zz)).ravel() for m in masks])
    _check(np.array(vals), np.array(refs), g, np.stack([g.ravel() for g in grads]),
           f"chunk {name} T={T}")
    all_in = xlosses.chunk_likelihood_loss(next_lp(zz), s_chunk, t_chunk, mx.ones((B, KC)), kd)
    assert all_in[1].item() == B * KC
    assert all_in[0].item() == pytest.approx(np.mean(refs), rel=1e-5)


def test_chunk_likelihood_large_temperature_is_tokenkits_limit():
    """T x binary KL at temperature T tends to tokenkit's binary_kl_temp_limit,
    (a - b) + a log(b / a) on the raw chunk log-likelihoods a (teacher), b (student)."""
    a = np.array([[-1.0, -2.5, -4.0]])
    b = np.array([[-2.0, -1.5, -4.5]])
    got = [xlosses.chunk_likelihood_loss(mx.array(b[:, i:i + 1].astype(np.float32)),
                                         mx.array([[0]], dtype=mx.int32),
                                         mx.array(a[:, i:i + 1].astype(np.float32)),
                                         mx.ones((1, 1)), KD(temperature=1e3))[0].item()
           for i in range(3)]
    limit = ((a - b) + a * np.log(b / a))[0]
    np.testing.assert_allclose(got, limit, rtol=1e-2)


# ---------------------------------------------------------------- masks


def test_nan_at_masked_units_does_not_leak():
    rng = np.random.default_rng(5)
    id_map = mx.array(_id_map(rng))
    z = rng.normal(size=(3, VS)).astype(np.float32)
    z[1] = np.nan
    ids, lp, tail, _ = _topk_teacher(rng, [0, 1, 2], [0.1, 0.1, 0.1])
    lp[1], tail[1] = np.nan, np.nan
    t = {"ids": mx.array(ids), "logprobs": mx.array(lp), "tail_logprob": mx.array(tail)}
    mask = mx.array([1.0, 0.0, 1.0])
    clean = {k: v[::2] for k, v in t.items()}
    fns = [lambda x, t, m: xlosses.uld_loss(x, t, m),
           lambda x, t, m: xlosses.mapped_kl_loss(x, t, id_map, m),
           lambda x, t, m: xlosses.mapped_kl_loss(x, t, id_map, m, rest="uld")]
    for i, fn in enumerate(fns):
        loss, n = fn(mx.array(z), t, mask)
        g = np.array(mx.grad(lambda x: fn(x, t, mask)[0])(mx.array(z)))
        assert np.isfinite(loss.item()) and n.item() == 2 and np.isfinite(g).all(), i
        assert (g[1] == 0).all(), i
        want = fn(mx.array(z[::2]), clean, mask[::2])[0].item()
        assert loss.item() == pytest.approx(want, rel=1e-6), i
    # chunk: a NaN teacher chunk that is masked, and NaN student positions in that chunk
    # and outside every chunk
    nl = rng.uniform(-3, -0.01, size=(B, LS)).astype(np.float32)
    nl[0, 3], nl[0, 7] = np.nan, np.nan  # chunk 2 (masked) and no chunk
    tc = T_CHUNK.astype(np.float32).copy()
    tc[0, 2] = np.nan
    cm = np.ones((B, KC))
    cm[0, 2] = 0
    args = (mx.array(S_CHUNK), mx.array(tc), mx.array(cm))
    loss, n = xlosses.chunk_likelihood_loss(mx.array(nl), *args)
    g = np.array(mx.grad(lambda x: xlosses.chunk_likelihood_loss(x, *args)[0])(mx.array(nl)))
    assert np.isfinite(loss.item()) and n.item() == B * KC - 1 and np.isfinite(g).all()
    nl2 = np.where(np.isnan(nl), -1.0, nl)
    tc2 = np.where(np.isnan(tc), -1.0, tc)
    want = xlosses.chunk_likelihood_loss(mx.array(nl2), mx.array(S_CHUNK), mx.array(tc2),
                                         mx.array(cm))[0].item()
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_no_trained_unit_gives_zero():
    rng = np.random.default_rng(6)
    z = mx.array(rng.normal(size=(2, VS)).astype(np.float32))
    ids, counts = _sampled_teacher(rng, 2)
    t = {"ids": mx.array(ids), "counts": mx.array(counts)}
    zero = mx.zeros((2,))
    for loss, n in (xlosses.uld_loss(z, t, zero),
                    xlosses.mapped_kl_loss(z, t, mx.array(_id_map(rng)), zero),
                    xlosses.chunk_likelihood_loss(mx.zeros((B, LS)), mx.array(S_CHUNK),
                                                  mx.array(T_CHUNK.astype(np.float32)),
                                                  mx.zeros((B, KC)))):
        assert loss.item() == 0.0 and n.item() == 0.0
    with pytest.raises(ValueError, match="sampled"):
        xlosses.mapped_kl_loss(z, t, mx.array(_id_map(rng)), zero, kd=KD("reverse_kl"))


def test_temperature_applies_to_the_student_only():
    """uld and mapped KL take the student's log-softmax at T (and scale by T, T^2): the same
    as logits divided by T at T = 1, times that factor."""
    rng = np.random.default_rng(7)
    z = rng.normal(size=(4, VS)).astype(np.float32) * 3
    ids, lp, tail, _ = _topk_teacher(rng, [0, 1, 2, 3], [0.2] * 4)
    t = {"ids": mx.array(ids), "logprobs": mx.array(lp), "tail_logprob": mx.array(tail)}
    m, id_map = mx.ones((4,)), mx.array(_id_map(rng))
    hot, cold = mx.array(z), mx.array(z / 2)
    assert xlosses.uld_loss(hot, t, m, KD(temperature=2.0))[0].item() == pytest.approx(
        2 * xlosses.uld_loss(cold, t, m)[0].item(), rel=1e-5)
    assert xlosses.mapped_kl_loss(hot, t, id_map, m, kd=KD(temperature=2.0))[0].item() == \
        pytest.approx(4 * xlosses.mapped_kl_loss(cold, t, id_map, m)[0].item(), rel=1e-5)


def test_training_keeps_a_student_token_the_teacher_lacks():
    """X-Token's failure, trained: the student's "12" (the teacher spells "1" "2") keeps its
    share of the rest under mapped KL, while KL on the shared tokens alone (the teacher's
    mapped mass against the student's full softmax, no rest bucket) drives it toward 0."""
    id_map = mx.array([0, 1, 3, -1], dtype=mx.int32)
    t = {"ids": mx.array([[0, 3, 1]]), "logprobs": mx.array(np.log([[0.6, 0.2, 0.1]])),
         "tail_logprob": mx.array(np.log([0.1]))}
    rest_ids = [2, 3, 4, 5]
    z0 = mx.array([[0.5, 0.0, 1.0, 0.0, -0.5, -1.0]])

    def matched_only(z):
        lq = z - mx.logsumexp(z, axis=-1, keepdims=True)
        return -(0.6 * lq[0, 0] + 0.2 * lq[0, 3] + 0.1 * lq[0, 1])

    def mapped(z):
        return xlosses.mapped_kl_loss(z, t, id_map, mx.ones((1,)))[0]

    def train(loss):
        z = z0
        for _ in range(300):
            z = z - 0.5 * mx.grad(loss)(z)
        return np.array(mx.softmax(z, axis=-1))[0]

    q0 = np.array(mx.softmax(z0, axis=-1))[0]
    share0 = q0[2] / q0[rest_ids].sum()
    q = train(mapped)
    assert q[rest_ids].sum() == pytest.approx(0.3, abs=0.01)  # the rest matches the teacher's
    assert q[2] / q[rest_ids].sum() > 0.8 * share0  # "12" keeps its share of it
    assert q[2] > 0.1
    assert train(matched_only)[2] < 0.1 * q0[2]  # suppressed without the rest bucket
