"""The divergence family on dense and top-k targets: defining properties, by-hand values."""

import mlx.core as mx
import numpy as np
import pytest

from mlxdistill import losses
from mlxdistill.config import ConfigError, load_config

V = 9
NAMES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


def logits(seed, scale=2.0, shape=(2, 3, V)):
    return mx.random.normal(shape, key=mx.random.key(seed)) * scale


def probs(x):
    x = np.array(x, dtype=np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


def by_hand(name, p, q, beta=0.5, skew=0.1):
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_kl":
        return kl(p, skew * p + (1 - skew) * q)
    if name == "skew_reverse_kl":
        return kl(q, skew * q + (1 - skew) * p)
    return 0.5 * np.abs(p - q).sum(-1)


def dense(name, t, s, mask=None, **kw):
    mask = mx.ones(t.shape[:2]) if mask is None else mask
    return losses.kd_loss(s, {"logprobs": losses.log_softmax(t)}, mask, name=name, **kw)[0].item()


@pytest.mark.parametrize("name", NAMES)
def test_dense_matches_by_hand(name):
    t, s = logits(0), logits(1)
    expect = by_hand(name, probs(t), probs(s), beta=0.3, skew=0.2).mean()
    assert dense(name, t, s, beta=0.3, skew=0.2) == pytest.approx(expect, abs=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_zero_at_equality_and_positive_otherwise(name):
    t = logits(2)
    assert abs(dense(name, t, t)) < 1e-6
    assert dense(name, t, logits(3)) > 1e-3


def test_jsd_symmetric_at_half_and_ends_are_kl():
    t, s = logits(4), logits(5)
    assert dense("jsd", t, s, beta=0.5) == pytest.approx(dense("jsd", s, t, beta=0.5), abs=1e-6)
    assert dense("jsd", t, s, beta=0.0) == pytest.approx(dense("forward_kl", t, s), abs=1e-6)
    assert dense("jsd", t, s, beta=1.0) == pytest.approx(dense("reverse_kl", t, s), abs=1e-6)
    # and the interior approaches the ends' scaled limits rather than jumping
    assert 0 < dense("jsd", t, s, beta=0.01) < dense("forward_kl", t, s)


@pytest.mark.parametrize("name", NAMES)
def test_topk_with_k_equal_vocab_is_dense(name):
    from mlxdistill.targets import topk_targets

    t, s = logits(6), logits(7)
    ids, lp = topk_targets(losses.log_softmax(t), V)
    tk = losses.kd_loss(s, {"ids": mx.array(ids), "logprobs": mx.array(lp)}, mx.ones((2, 3)),
                        name=name)[0].item()
    assert tk == pytest.approx(dense(name, t, s), abs=3e-3)  # float16 cache precision


@pytest.mark.parametrize("name", NAMES)
def test_masking_and_finite_gradients(name):
    t, s = logits(8, scale=30.0), logits(9, scale=30.0)
    mask = mx.array([[1, 0, 0], [0, 0, 0]])
    full = dense(name, t[:1, :1], s[:1, :1])
    assert dense(name, t, s, mask=mask) == pytest.approx(full, abs=1e-5)
    assert dense(name, t, s, mask=mx.zeros((2, 3))) == 0.0
    tg = {"logprobs": losses.log_softmax(t)}
    g = mx.grad(lambda x: losses.kd_loss(x, tg, mx.ones((2, 3)), name=name)[0])(s)
    assert bool(mx.all(mx.isfinite(g)).item()) and float(mx.abs(g).sum()) > 0


def test_sampled_cache_refuses_losses_it_cannot_estimate(tmp_path):
    with pytest.raises(ConfigError, match="sampled cache"):
        load_config(None, ["loss.name=reverse_kl"])
    cfg = load_config(None, ["loss.name=reverse_kl", "cache.mode=topk"])
    assert cfg.loss.name == "reverse_kl"
    with pytest.raises(ConfigError, match="re-tempered"):
        load_config(None, ["loss.temperature=2.0"])
