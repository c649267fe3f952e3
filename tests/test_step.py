"""The compiled optimizer step: accumulation equals one big batch, and a non-finite step
leaves weights and optimizer state exactly as they were."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlxdistill.step import LOSS, NTOK, make_step


def _setup(seed=0):
    mx.random.seed(seed)
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
    opt = optim.AdamW(learning_rate=1e-2, weight_decay=0.1)
    opt.init(model.trainable_parameters())
    mx.eval(model.parameters(), opt.state)
    return model, opt


def _loss(model, x, mask, labels, targets):
    logits = model(x) * targets["scale"][:, None, None]
    ce = nn.losses.cross_entropy(logits, labels) * mask
    ntok = mask.sum()
    loss = ce.sum() / ntok
    return loss, (ntok, loss, loss, mx.array(0.0))


def _batch():
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, 16, (4, 6)))
    labels = mx.array(rng.integers(0, 16, (4, 6)))
    # Unequal trained tokens per half: a plain mean of micro-batch means would be wrong.
    mask = mx.array(np.array([[1] * 6, [1] * 6, [1] * 6, [1, 0, 0, 0, 0, 0]], np.float32))
    return x, mask, labels


def _flat(model, opt):
    return {k: np.array(v) for k, v in tree_flatten([model.parameters(), opt.state])}


def test_accumulated_micro_batches_equal_one_batch():
    x, mask, labels = _batch()
    targets = {"scale": mx.ones((4,))}
    out = {}
    for micro in (1, 2):
        model, opt = _setup()
        step = make_step(model, opt, _loss, grad_clip=1.0, micro_batches=micro)
        stats, gnorm, ok = step(x, mask, labels, targets)
        mx.eval(model.parameters(), opt.state)
        out[micro] = (_flat(model, opt), np.array(stats), gnorm.item(), ok.item())
    (a, sa, ga, oka), (b, sb, gb, okb) = out[1], out[2]
    assert oka and okb and sa[NTOK] == sb[NTOK] == 19
    assert np.allclose(sa, sb, rtol=1e-5) and abs(ga - gb) < 1e-5 * max(1.0, ga)
    for k in a:
        assert np.allclose(a[k], b[k], atol=1e-6), k


def test_nonfinite_step_keeps_weights_and_optimizer_state():
    x, mask, labels = _batch()
    model, opt = _setup()
    step = make_step(model, opt, _loss, grad_clip=0.0)
    mx.eval(step(x, mask, labels, {"scale": mx.ones((4,))}), model.parameters(), opt.state)
    before = _flat(model, opt)
    bad = mx.array([1.0, 1.0, float("nan"), 1.0])
    stats, gnorm, ok = step(x, mask, labels, {"scale": bad})
    mx.eval(stats, model.parameters(), opt.state)
    assert not ok.item() and not np.isfinite(np.array(stats)[LOSS])
    after = _flat(model, opt)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # step counter too
    stats, gnorm, ok = step(x, mask, labels, {"scale": mx.ones((4,))})
    mx.eval(model.parameters(), opt.state)
    assert ok.item() and np.isfinite(gnorm.item())
    moved = _flat(model, opt)
    assert any(not np.array_equal(after[k], moved[k]) for k in after)


def test_loop_memory_reuses_freed_buffers_and_resets_the_peak():
    """During the training loop a step's [B, L, V]-sized temporaries are reused, not handed
    back to malloc: at 8 x 256 x 4096 float32 (32 MiB) malloc maps them from the kernel and
    unmaps them on free, so every step would fault in and zero fresh pages for each. The
    peak starts from what is live when the loop starts."""
    import resource

    from mlxdistill.step import loop_memory

    shape = (8, 256, 4096)
    pages = int(np.prod(shape)) * 4 // resource.getpagesize()
    x = mx.ones(shape)
    mx.eval(x)
    spike = mx.zeros((1 << 24,))  # a setup-time allocation the loop's peak must not count
    mx.eval(spike)
    del spike

    def two_temporaries():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = x * 2.0
        z = x * 3.0
        mx.eval(y + z)  # y, z and their sum live at once; all freed on return
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    restore = loop_memory()
    try:
        assert mx.get_peak_memory() < mx.get_active_memory() + (1 << 22)
        faults = [two_temporaries() for _ in range(4)]
    finally:
        restore()
    assert max(faults[1:]) < pages // 4, (faults, pages)
    assert mx.get_cache_memory() == 0  # handed back when the loop ends
