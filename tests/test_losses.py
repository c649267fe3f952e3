"""Defining properties of the distillation losses on a tiny vocabulary."""

import mlx.core as mx
import numpy as np
import pytest

from mlxdistill import losses
from mlxdistill.targets import sample_targets, top1_weights, topk_targets

V = 11


def rand_logits(seed, shape=(2, 5, V), scale=2.0):
    return mx.random.normal(shape, key=mx.random.key(seed)) * scale


def by_hand_kl(t_logits, s_logits):
    t = np.array(t_logits, dtype=np.float64)
    s = np.array(s_logits, dtype=np.float64)
    lp = t - np.log(np.exp(t).sum(-1, keepdims=True))
    lq = s - np.log(np.exp(s).sum(-1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(-1).mean()


def topk_of(t_logits, k, temperature=1.0):
    ids, lp = topk_targets(losses.log_softmax(t_logits, temperature), k)
    return {"ids": mx.array(ids), "logprobs": mx.array(lp)}


def test_topk_with_k_equal_vocab_matches_dense_kl_by_hand():
    t, s = rand_logits(0), rand_logits(1)
    mask = mx.ones(t.shape[:2])
    loss, n = losses.kd_loss(s, topk_of(t, V), mask)
    assert n.item() == 10
    # float16 log-probs in the cache bound the agreement
    assert loss.item() == pytest.approx(by_hand_kl(t, s), abs=2e-3)
    dense, _ = losses.kd_loss(s, {"logprobs": losses.log_softmax(t)}, mask)
    assert dense.item() == pytest.approx(by_hand_kl(t, s), abs=1e-5)


def test_zero_when_student_equals_teacher():
    t = rand_logits(2)
    mask = mx.ones(t.shape[:2])
    for k in (3, V):  # on the top-k support plus the tail bucket
        loss, _ = losses.kd_loss(t, topk_of(t, k), mask)
        assert abs(loss.item()) < 2e-3
    dense, _ = losses.kd_loss(t, {"logprobs": losses.log_softmax(t)}, mask)
    assert abs(dense.item()) < 1e-6


def test_sampled_is_zero_when_student_matches_the_draws():
    ids = mx.array([[[2, 5, 0, 0]]])
    counts = mx.array([[[3, 1, 0, 0]]], dtype=mx.uint8)
    p = np.full(V, 1e-9)
    p[2], p[5] = 0.75, 0.25
    s = mx.array(np.log(p)[None, None].astype(np.float32))
    loss, _ = losses.kd_loss(s, {"ids": ids, "counts": counts}, mx.ones((1, 1)))
    assert abs(loss.item()) < 1e-5
    other, _ = losses.kd_loss(mx.zeros((1, 1, V)), {"ids": ids, "counts": counts},
                              mx.ones((1, 1)))
    assert other.item() > 0.5


def test_topk_tail_bucket_matches_by_hand():
    """k ids + one bucket for the rest, on both sides, computed in float64 by hand."""
    t, s = rand_logits(3), rand_logits(4)
    mask = mx.ones(t.shape[:2])
    k = 4
    loss, _ = losses.kd_loss(s, topk_of(t, k), mask)
    tp = np.exp(np.array(losses.log_softmax(t), dtype=np.float64))
    sq = np.exp(np.array(losses.log_softmax(s), dtype=np.float64))
    top = np.argsort(-tp, axis=-1)[..., :k]
    p = np.take_along_axis(tp, top, -1)
    q = np.take_along_axis(sq, top, -1)
    p = np.concatenate([p, 1 - p.sum(-1, keepdims=True)], -1)
    q = np.concatenate([q, 1 - q.sum(-1, keepdims=True)], -1)
    expect = (p * (np.log(p) - np.log(q))).sum(-1).mean()
    assert loss.item() == pytest.approx(expect, abs=2e-3)
    # and it is not the head-only sum: the tail term carries real mass here
    head_only = (p[..., :k] * (np.log(p[..., :k]) - np.log(q[..., :k]))).sum(-1).mean()
    assert abs(expect - head_only) > 1e-2


def test_masked_positions_ignored_and_all_masked_is_zero():
    t, s = rand_logits(5), rand_logits(6)
    mask = mx.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    tg = {"logprobs": losses.log_softmax(t)}
    loss, n = losses.kd_loss(s, tg, mask)
    assert n.item() == 2
    assert loss.item() == pytest.approx(by_hand_kl(t[0, :2], s[0, :2]), abs=1e-5)
    # changing masked positions changes nothing
    s2 = mx.concatenate([s[:, :2], s[:, 2:] * 7.0], axis=1)
    loss2, _ = losses.kd_loss(s2, tg, mask)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)
    zero = mx.zeros_like(mask)
    for targets in (tg, topk_of(t, 4)):
        l0, n0 = losses.kd_loss(s, targets, zero)
        assert l0.item() == 0.0 and n0.item() == 0
    ce0, _ = losses.ce_loss(s, mx.zeros(mask.shape, dtype=mx.int32), zero)
    assert ce0.item() == 0.0


def test_temperature_scaling():
    t, s = rand_logits(7), rand_logits(8)
    mask = mx.ones(t.shape[:2])
    T = 2.0
    loss, _ = losses.kd_loss(s, {"logprobs": losses.log_softmax(t, T)}, mask, temperature=T)
    assert loss.item() == pytest.approx(T * T * by_hand_kl(t / T, s / T), abs=1e-4)


def test_gradients_finite_even_for_extreme_logits():
    t = rand_logits(9, scale=50.0)
    s = rand_logits(10, scale=50.0)
    mask = mx.ones(t.shape[:2])
    ids, counts = sample_targets(t, 16, np.random.default_rng(0))
    targets = [topk_of(t, 4), {"ids": mx.array(ids), "counts": mx.array(counts)},
               {"logprobs": losses.log_softmax(t)}]
    labels = mx.zeros(mask.shape, dtype=mx.int32)
    for tg in targets:
        g = mx.grad(lambda x: losses.distill_loss(x, tg, labels, mask, losses.KD(alpha=0.5))[0])(s)
        assert bool(mx.all(mx.isfinite(g)).item())
        assert float(mx.abs(g).sum()) > 0


def test_sample_targets_counts_sum_to_n_and_ids_unique():
    t = rand_logits(11)
    ids, counts = sample_targets(t, 16, np.random.default_rng(1))
    assert ids.shape == (2, 5, 16) and counts.dtype == np.uint8
    assert (counts.sum(-1) == 16).all()
    for i, c in zip(ids.reshape(-1, 16), counts.reshape(-1, 16)):
        used = i[c > 0]
        assert len(set(used.tolist())) == len(used)


@pytest.mark.parametrize("xp", ["mlx", "numpy"])
@pytest.mark.parametrize("vocab", [7, 64, 100, 5000])
def test_two_level_inverse_cdf_equals_searchsorted(vocab, xp):
    """The two-level sampler (on the device with MLX, on the host with numpy) picks the id
    numpy's searchsorted picks on the full float64 CDF, for vocabularies that do and do not
    fill whole blocks, and never an id of probability zero (every third id here). Float32
    sums may differ from float64 only for a u within rounding of a boundary between ids."""
    from mlxdistill.targets import _inverse_cdf

    rng = np.random.default_rng(vocab)
    p = rng.dirichlet(np.full(vocab, 0.05), size=40).astype(np.float32)
    p[:, ::3] = 0
    p /= p.sum(1, keepdims=True)
    u = rng.random((40, 16)).astype(np.float32) * p.sum(1, keepdims=True)
    cdf = np.cumsum(p.astype(np.float64), axis=1)
    want = np.stack([np.searchsorted(cdf[i], u[i], side="right") for i in range(40)])
    got = np.asarray(_inverse_cdf(p, u, np) if xp == "numpy" else
                     _inverse_cdf(mx.array(p), mx.array(u)))
    rows, cols = np.nonzero(got != want)
    assert len(rows) <= 2
    for r, c in zip(rows, cols):  # u sits on the boundary between the two ids
        lo, hi = sorted((want[r, c], got[r, c]))
        assert abs(cdf[r, hi - 1] - u[r, c]) < 1e-6
    assert (p[np.arange(40)[:, None], got] > 0).all()


def test_sampled_gradient_matches_dense_forward_kl_in_expectation():
    """Mean over many independent draws of the sampled loss's gradient equals the dense
    forward-KL gradient (unbiasedness); tolerance 0.02 absolute per logit with 4000 draws."""
    t = rand_logits(12, shape=(1, 1, V))
    s = rand_logits(13, shape=(1, 1, V), scale=1.0)
    mask = mx.ones((1, 1))
    dense_g = mx.grad(lambda x: losses.kd_loss(x, {"logprobs": losses.log_softmax(t)}, mask)[0])(s)
    tt = mx.broadcast_to(t, (1, 4000, V))
    ids, counts = sample_targets(tt, 4, np.random.default_rng(3))
    tg = {"ids": mx.array(ids), "counts": mx.array(counts)}
    ss = mx.broadcast_to(s, (1, 4000, V))
    g = mx.grad(lambda x: losses.kd_loss(x, tg, mx.ones((1, 4000)))[0])(ss)
    mean_g = g.sum(axis=1) * 1.0  # mean over positions is already in the loss
    assert np.abs(np.array(mean_g[0]) - np.array(dense_g[0, 0])).max() < 0.02


def _per_position_grads(s, targets, positions):
    ss = mx.broadcast_to(s, (1, positions, V))
    g = mx.grad(lambda x: losses.kd_loss(x, targets, mx.ones((1, positions)))[0])(ss)
    return np.array(g[0]) * positions  # the loss is a mean over positions


def test_keep_top1_is_unbiased_and_less_noisy():
    """Keeping the top-1 id exactly and sampling the rest: the mean gradient still equals
    dense forward KL's (tolerance 0.02 per logit over 4000 draws), and the spread of the
    per-position gradient around it is smaller than plain sampling with the same n."""
    t = rand_logits(12, shape=(1, 1, V), scale=3.0)
    s = rand_logits(13, shape=(1, 1, V), scale=1.0)
    dense_g = np.array(mx.grad(lambda x: losses.kd_loss(
        x, {"logprobs": losses.log_softmax(t)}, mx.ones((1, 1)))[0])(s))[0, 0]
    tt = mx.broadcast_to(t, (1, 4000, V))
    ids, counts = sample_targets(tt, 4, np.random.default_rng(3), keep_top1=True)
    assert ids.shape == (1, 4000, 4) and counts.dtype == np.uint8
    assert (ids[..., 0] == int(mx.argmax(t).item())).all()
    assert (counts[..., 1:].sum(-1) == 3).all() and not (ids[..., 1:][counts[..., 1:] > 0]
                                                         == ids[..., :1].repeat(3, -1)[
                                                             counts[..., 1:] > 0]).any()
    g_top1 = _per_position_grads(s, {"ids": mx.array(ids),
                                     "counts": mx.array(top1_weights(counts))}, 4000)
    assert np.abs(g_top1.mean(0) - dense_g).max() < 0.02
    ids_p, counts_p = sample_targets(tt, 4, np.random.default_rng(3))
    g_plain = _per_position_grads(s, {"ids": mx.array(ids_p), "counts": mx.array(counts_p)},
                                  4000)
    spread = lambda g: ((g - dense_g) ** 2).sum(-1).mean()  # noqa: E731
    assert spread(g_top1) < 0.8 * spread(g_plain), (spread(g_top1), spread(g_plain))


def test_ce_ignores_missing_labels():
    s = rand_logits(14)
    labels = mx.array([[1, 2, 3, 4, -1], [5, 6, 7, 8, -1]])
    mask = mx.ones((2, 5))
    loss, n = losses.ce_loss(s, labels, mask)
    assert n.item() == 8
    assert np.isfinite(loss.item())
