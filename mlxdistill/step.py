"""One optimizer step, built once and used by the trainer, `plan`'s probe and the benchmarks:
a batch as the step's arrays, the compiled step (its loss from objective.py), and the loop's
memory setup.

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

import gc
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map, tree_reduce

from . import data as data_mod

# Columns of StepOut.stats: token-weighted sums over the step's micro-batches.
NTOK, LOSS, KD, CE, HIDDEN = range(5)


def to_arrays(batch: data_mod.Batch) -> tuple:
    """(input ids, loss mask, hard labels, teacher targets) of a batch, as MLX arrays."""
    labels = data_mod.hard_targets(batch.input_ids, batch.next_ids)
    targets = {k: mx.array(v) for k, v in batch.targets.items()}
    return mx.array(batch.input_ids), mx.array(batch.loss_mask), mx.array(labels), targets


def _norm_and_clip(grads, max_norm: float):
    # A sum follows memory order, and the backward pass leaves some gradients column-major
    # while an all-reduce returns them row-major: flattening first (a copy only for the
    # former) makes the norm, and so the clipped step, independent of layout.
    sq = tree_reduce(lambda acc, g: acc + g.astype(mx.float32).reshape(-1).square().sum(),
                     grads, 0.0)
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


def loop_memory() -> Callable[[], None]:
    """Set up memory for the training loop, once the setup before it is done; returns the
    function that undoes it (call it when the loop ends, however it ends).

    The peak is reset here, so `peak_mem_gb` is the loop's own: the same on a first run,
    where the teacher was loaded once for the validation targets, as on a resumed one.

    Freed buffers are kept for reuse while the loop runs. MLX's CPU allocator keeps only
    32 MB of them by default and passes the rest to malloc, which maps blocks of 32 MiB and
    more straight from the kernel and unmaps them when freed. [B, L, V] float32 logits and
    their gradients are such blocks (8 x 256 x 4096 is exactly 32 MiB), so without this
    every step faults in and zeroes fresh pages for each of them, a large share of a small
    model's step on a CPU. With the memory limit as the cache limit, which is what MLX uses
    on Metal anyway, a step reuses the previous step's buffers. Cached buffers are not
    counted in the peak."""
    gc.collect()  # what the setup dropped (a teacher loaded once) is freed before the reset
    previous = mx.set_cache_limit(max(mx.get_memory_limit(), 1))
    mx.reset_peak_memory()

    def restore() -> None:
        mx.set_cache_limit(previous)
        mx.clear_cache()  # what comes next (saving, evaluation) allocates other shapes

    return restore


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
