"""Loss numerics against float64 references: the tail bucket of top-k targets when the
student (or the teacher) is confident, and non-finite teacher values where the mask says
nothing is trained."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxdistill import losses
from mlxdistill.sections import LOSSES
from mlxdistill.targets import tail_logprob

V, K = 64, 4
TAILS = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9]
TOPK_LOSSES = [n for n in LOSSES]


def _setup(seed=0):
    """Student logits (one position per student tail mass in TAILS) and top-k teacher
    targets on the same K ids, teacher tail ~0.1."""
    rng = np.random.default_rng(seed)
    L = len(TAILS)
    ids = np.stack([rng.permutation(V)[:K] for _ in range(L)])  # [L, K]
    z = rng.normal(size=(L, V))
    t = rng.normal(size=(L, V))
    top = np.array([5.0, 4.0, 3.0, 2.0])
    for i, tail in enumerate(TAILS):
        rest = np.delete(np.arange(V), ids[i])
        s_rest = np.exp(z[i, rest]).sum()
        z[i, ids[i]] = top + math.log(s_rest * (1 - tail) / (tail * np.exp(top).sum()))
        t[i, ids[i]] = top[::-1] + 2.0  # the teacher ranks them otherwise
    lt = t - np.log(np.exp(t).sum(-1, keepdims=True))
    lp = np.take_along_axis(lt, ids, -1).astype(np.float32)
    tail_t = np.array([np.log(np.exp(np.delete(lt[i], ids[i])).sum()) for i in range(L)])
    return z[None].astype(np.float32), ids[None], lp[None], tail_t[None].astype(np.float32)


def _ref(z, ids, lp, tail_t, name, beta, skew):
    """The bucketed divergence and its gradient in numpy float64, from the definitions: p
    and q over the K ids plus one tail bucket, q's tail as 1 - sum (exact enough in float64).
    (MLX's float64 exp runs in float32 on the CPU, so the reference is numpy.) The
    gradient: dD/dz_j = q_j (g_b(j) - sum_b q_b g_b), g_b = dD/dq_b, b(j) the bucket of j."""
    z = np.asarray(z, np.float64)
    lq = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        z.max(-1, keepdims=True)
    q_all = np.exp(lq)
    qk = np.take_along_axis(q_all, ids, -1)
    q = np.concatenate([qk, 1.0 - qk.sum(-1, keepdims=True)], -1)
    p = np.exp(np.concatenate([np.asarray(lp, np.float64),
                               np.asarray(tail_t, np.float64)[..., None]], -1))
    b_, s_ = beta, skew
    if name == "forward_kl":
        per, g = (p * np.log(p / q)).sum(-1), -p / q
    elif name == "reverse_kl":
        per, g = (q * np.log(q / p)).sum(-1), np.log(q / p) + 1
    elif name == "symmetric_kl":
        per = (1 - b_) * (p * np.log(p / q)).sum(-1) + b_ * (q * np.log(q / p)).sum(-1)
        g = (1 - b_) * (-p / q) + b_ * (np.log(q / p) + 1)
    elif name == "jsd":
        m = b_ * p + (1 - b_) * q
        per = b_ * (p * np.log(p / m)).sum(-1) + (1 - b_) * (q * np.log(q / m)).sum(-1)
        g = (1 - b_) * np.log(q / m)
    elif name == "skew_kl":
        m = s_ * p + (1 - s_) * q
        per, g = (p * np.log(p / m)).sum(-1), -p * (1 - s_) / m
    elif name == "skew_reverse_kl":
        m = s_ * q + (1 - s_) * p
        per, g = (q * np.log(q / m)).sum(-1), np.log(q / m) + 1 - q * s_ / m
    else:
        per, g = 0.5 * np.abs(p - q).sum(-1), 0.5 * np.sign(q - p)
    bucket = np.full(z.shape, K)
    np.put_along_axis(bucket, ids, np.broadcast_to(np.arange(K), ids.shape), -1)
    g_j = np.take_along_axis(g, bucket, -1)
    grad = q_all * (g_j - (q * g).sum(-1, keepdims=True))
    return per, grad


@pytest.mark.parametrize("name", TOPK_LOSSES)
def test_topk_tail_value_and_gradient_match_float64_for_a_confident_student(name):
    z, ids, lp, tail_t = _setup()
    beta, skew = 0.3, 0.1
    targets = {"ids": mx.array(ids), "logprobs": mx.array(lp),
               "tail_logprob": mx.array(tail_t)}
    mask = mx.ones(z.shape[:2])

    def ours(x):  # per position: each holds one student tail mass
        return mx.stack([losses.kd_loss(x[:, i:i + 1], {k: v[:, i:i + 1] for k, v in
                                                         targets.items()},
                                        mask[:, i:i + 1], name=name, beta=beta,
                                        skew=skew)[0] for i in range(len(TAILS))])

    val = np.array(ours(mx.array(z)))
    ref, g_ref = _ref(z, ids, lp, tail_t, name, beta, skew)
    np.testing.assert_allclose(val, ref[0], rtol=1e-4, atol=1e-12)
    g = np.array(mx.grad(lambda x: ours(x).sum())(mx.array(z)), dtype=np.float64)
    for i, tail in enumerate(TAILS):  # every tail level on its own scale
        scale = np.abs(g_ref[0, i]).max()
        err = np.abs(g[0, i] - g_ref[0, i]).max() / scale
        assert err < 1e-4, f"student tail {tail:g}: gradient off by {err:.2e} of its scale"
        # the tail ids' gradient (tiny next to the top ids') relative to its own size
        rest = np.delete(np.arange(V), ids[0, i])
        gr, gr_ref = g[0, i, rest], g_ref[0, i, rest]
        rel = np.abs(gr - gr_ref).max() / np.abs(gr_ref).max()
        assert rel < 1e-4, f"student tail {tail:g}: tail-id gradient off by {rel:.2e}"


def test_teacher_tail_written_from_logits_is_exact_when_the_teacher_is_peaked():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(3, V))
    t[:, :K] += np.array([[30.0], [25.0], [20.0]])  # tail masses ~1e-11 .. 1e-7
    lt = t - np.log(np.exp(t).sum(-1, keepdims=True))
    want = np.log(np.exp(lt[:, K:]).sum(-1))
    ids = np.tile(np.arange(K), (3, 1))
    got = tail_logprob(mx.array(lt.astype(np.float32)), ids)
    np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-4)
    # what the loss falls back to without it cancels (the old cache had only this)
    old = np.array(losses.teacher_tail(mx.array(lt[:, :K].astype(np.float32))))[:, 0]
    assert not np.allclose(np.exp(old), np.exp(want), rtol=1e-2)


@pytest.mark.parametrize("kind", ["dense", "topk", "sampled"])
def test_nan_teacher_row_at_a_masked_position_does_not_leak(kind):
    rng = np.random.default_rng(2)
    z = mx.array(rng.normal(size=(1, 3, V)).astype(np.float32))
    lt = losses.log_softmax(mx.array(rng.normal(size=(1, 3, V)).astype(np.float32)))
    nan_row = np.zeros((1, 3, 1), bool)
    nan_row[0, 1] = True
    if kind == "dense":
        t = {"logprobs": mx.where(mx.array(nan_row), mx.nan, lt)}
    elif kind == "topk":
        ids = np.tile(np.arange(K), (1, 3, 1))
        lp = np.array(lt)[..., :K]
        lp[0, 1] = np.nan
        tail = np.log1p(-np.exp(lp).sum(-1))
        t = {"ids": mx.array(ids), "logprobs": mx.array(lp), "tail_logprob": mx.array(tail)}
    else:
        w = np.ones((1, 3, K), np.float32) / K
        w[0, 1] = np.nan  # float weights (keep_top1 or a teacher mix)
        t = {"ids": mx.array(np.tile(np.arange(K), (1, 3, 1))), "counts": mx.array(w)}
    mask = mx.array([[1.0, 0.0, 1.0]])
    names = ["forward_kl"] if kind == "sampled" else TOPK_LOSSES
    for name in names:
        loss, n = losses.kd_loss(z, t, mask, name=name)
        g = mx.grad(lambda x: losses.kd_loss(x, t, mask, name=name)[0])(z)
        assert np.isfinite(loss.item()) and n.item() == 2, name
        assert np.isfinite(np.array(g)).all(), name
        clean = {k: v[:, ::2] for k, v in t.items()}
        want = losses.kd_loss(z[:, ::2], clean, mask[:, ::2], name=name)[0]
        assert loss.item() == pytest.approx(want.item(), rel=1e-6), name


def test_nan_hidden_target_at_a_masked_position_does_not_leak():
    pred = mx.ones((1, 2, 4))
    tgt = mx.array([[[1.0, 2.0, 3.0, 4.0], [np.nan] * 4]])
    mask = mx.array([[1.0, 0.0]])
    for kind in ("cosine", "mse"):
        g = mx.grad(lambda p: losses.hidden_loss(p, tgt, mask, kind)[0])(pred)
        assert np.isfinite(np.array(g)).all(), kind


def test_teacher_log_prob_of_minus_inf_gives_finite_divergences():
    """Ids the teacher rules out (log p = -inf) are skipped by reverse KL and the KL terms
    of the others (torchtune and DistiLLM skip them too): a finite loss and gradient, equal
    to the sum over the ids the teacher allows."""
    rng = np.random.default_rng(3)
    t = rng.normal(size=(1, 1, V)).astype(np.float32)
    t[..., :10] = -np.inf
    lt = losses.log_softmax(mx.array(t))
    z = mx.array(rng.normal(size=(1, 1, V)).astype(np.float32))
    for name in TOPK_LOSSES:
        loss, _ = losses.kd_loss(z, {"logprobs": lt}, mx.ones((1, 1)), name=name)
        g = mx.grad(lambda x: losses.kd_loss(x, {"logprobs": lt}, mx.ones((1, 1)),
                                             name=name)[0])(z)
        assert np.isfinite(loss.item()) and np.isfinite(np.array(g)).all(), name
    q = np.exp(np.array(losses.log_softmax(z), dtype=np.float64))[0, 0]
    p = np.exp(np.array(lt, dtype=np.float64))[0, 0]
    keep = p > 0
    want = (q[keep] * np.log(q[keep] / p[keep])).sum()
    got = losses.kd_loss(z, {"logprobs": lt}, mx.ones((1, 1)), name="reverse_kl")[0].item()
    assert got == pytest.approx(want, rel=1e-5)


def test_symmetric_kl_weights_forward_and_reverse_as_torchtune():
    rng = np.random.default_rng(4)
    z = mx.array(rng.normal(size=(2, 3, V)).astype(np.float32))
    t = {"logprobs": losses.log_softmax(mx.array(rng.normal(size=(2, 3, V)).astype(np.float32)))}
    mask = mx.ones((2, 3))
    fkl = losses.kd_loss(z, t, mask, name="forward_kl")[0].item()
    rkl = losses.kd_loss(z, t, mask, name="reverse_kl")[0].item()
    for beta in (0.0, 0.1, 0.5, 1.0):
        got = losses.kd_loss(z, t, mask, name="symmetric_kl", beta=beta)[0].item()
        # torchtune SymmetricKLLoss(sym_kd_ratio=r): r * forward + (1 - r) * reverse
        assert got == pytest.approx((1 - beta) * fkl + beta * rkl, rel=1e-5)


def test_jsd_end_points_are_special_cases_not_limits():
    rng = np.random.default_rng(5)
    z = mx.array(rng.normal(size=(1, 4, V)).astype(np.float32))
    t = {"logprobs": losses.log_softmax(mx.array(rng.normal(size=(1, 4, V)).astype(np.float32)))}
    mask = mx.ones((1, 4))
    fkl = losses.kd_loss(z, t, mask, name="forward_kl")[0].item()
    assert losses.kd_loss(z, t, mask, name="jsd", beta=0.0)[0].item() == pytest.approx(fkl)
    small = losses.kd_loss(z, t, mask, name="jsd", beta=1e-3)[0].item()
    assert small < 2e-3 * fkl  # the mixture vanishes near beta = 0; it does not approach KL
