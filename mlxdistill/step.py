"""One optimizer step, built once and used by the trainer and by `plan`'s probe.

The common case (one process, no gradient accumulation) is a single compiled function:
forward, loss, backward, gradient clipping, the non-finite guard and the AdamW update, with
no host round-trip inside — the same shape as mlx_lm's own step, which is what makes
distilling from a cache cost what plain fine-tuning costs. With accumulation or several
ranks, a compiled micro-step returns token-weighted gradient sums and a compiled update
applies their mean (the all-reduce in between needs the host, for the rank watchdog).

A step whose loss or gradient norm is not finite keeps the weights and optimizer state it
had (an elementwise select folded into the update, so no second copy of the state is made);
its `ok` flag says so, and the caller decides whether to skip on or stop.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map, tree_reduce

# Columns of StepOut.stats: token-weighted sums over the step's micro-batches.
NTOK, LOSS, KD, CE, HIDDEN = range(5)


def _norm_and_clip(grads, max_norm: float):
    sq = tree_reduce(lambda acc, g: acc + g.astype(mx.float32).square().sum(), grads, 0.0)
    gnorm = mx.sqrt(sq)
    if max_norm > 0:
        scale = mx.minimum(max_norm / (gnorm + 1e-6), 1.0)
        grads = tree_map(lambda g: (g * scale).astype(g.dtype), grads)
    return grads, gnorm


def _assign(dst, src) -> None:
    """Write src's leaves into dst's containers in place: compile tracks the optimizer's
    state by the containers it was given, so replacing them would lose the update."""
    for k in (range(len(src)) if isinstance(src, list) else src):
        if isinstance(src[k], (dict, list)):
            _assign(dst[k], src[k])
        else:
            dst[k] = src[k]


def make_step(model: nn.Module, opt, loss_fn: Callable, grad_clip: float = 0.0,
              micro_batches: int = 1, world=None):
    """step(x, mask, labels, targets, what="") -> (stats [5], grad norm, ok), lazy arrays;
    `what` names the step in a distributed timeout.

    loss_fn(model, x, mask, labels, targets) -> (loss, (ntok, kd, ce, hidden)), each a mean
    over the micro-batch's trained tokens. The batch is split into `micro_batches` along
    its rows; micro-batches and ranks are weighted by their trained tokens, so the result
    equals one big batch's mean."""
    grad_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state, mx.random.state]
    distributed = world is not None and world.size > 1

    def grads_and_stats(x, mask, labels, targets):
        (loss, (ntok, kd, ce, hid)), grads = grad_fn(model, x, mask, labels, targets)
        return grads, mx.stack([ntok, loss * ntok, kd * ntok, ce * ntok, hid * ntok])

    def update(grads, stats):
        grads, gnorm = _norm_and_clip(grads, grad_clip)
        ok = mx.isfinite(stats[LOSS]) & mx.isfinite(gnorm)
        params = model.trainable_parameters()
        old_state = tree_map(lambda a: a, opt.state)  # the structure is updated in place
        opt.update(model, grads)
        # The old trees lead: a restored optimizer state gains empty containers on update.
        keep = lambda old, new: mx.where(ok, new, old)  # noqa: E731
        model.update(tree_map(keep, params, model.trainable_parameters()))
        _assign(opt.state, tree_map(keep, old_state, opt.state))
        return stats, gnorm, ok

    if micro_batches == 1 and not distributed:
        @partial(mx.compile, inputs=state, outputs=state)
        def fused(x, mask, labels, targets):
            return update(*grads_and_stats(x, mask, labels, targets))

        return lambda x, mask, labels, targets, what="": fused(x, mask, labels, targets)

    @partial(mx.compile, inputs=state, outputs=state)
    def micro_step(x, mask, labels, targets):
        grads, stats = grads_and_stats(x, mask, labels, targets)
        return tree_map(lambda g: g * stats[NTOK], grads), stats

    @partial(mx.compile, inputs=state, outputs=state)
    def apply(grad_sums, stats):
        return update(tree_map(lambda g: g / mx.maximum(stats[NTOK], 1.0), grad_sums), stats)

    def step(x, mask, labels, targets, what=""):
        rows = x.shape[0] // micro_batches
        acc, stats = None, None
        for m0 in range(0, x.shape[0], rows):
            sl = slice(m0, m0 + rows)
            g, s = micro_step(x[sl], mask[sl], labels[sl], {k: v[sl] for k, v in targets.items()})
            acc = g if acc is None else tree_map(mx.add, acc, g)
            stats = s if stats is None else stats + s
        if distributed:
            # Rank-local work is evaluated before the collectives, under the watchdog there.
            stats = mx.array(world.sum(np.array(stats), what or "a step"))
            acc = tree_map(lambda g: g * world.size, world.average_gradients(
                acc, f"the gradient all-reduce of {what or 'a step'}"))
        return apply(acc, stats)

    return step

