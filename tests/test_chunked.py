"""Chunked loss and gradient checkpointing: the same numbers as the plain loss, with the
[B, L, V] logits never held for the whole sequence."""

import json
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import tiny_overrides
from mlx.utils import tree_flatten

from mlxdistill import losses, surgery
from mlxdistill.targets import sample_targets, topk_targets
from mlxdistill.config import load_config


def llama(vocab, dim=32, tied=True, seed=0):
    from mlx_lm.models import llama as arch

    mx.random.seed(seed)
    return arch.Model(arch.ModelArgs.from_dict(dict(
        model_type="llama", hidden_size=dim, num_hidden_layers=2, intermediate_size=2 * dim,
        num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=vocab,
        tie_word_embeddings=tied, rope_theta=10000.0)))


def targets_of(kind, t_logits):
    if kind == "dense":
        return {"logprobs": losses.log_softmax(t_logits)}
    if kind == "topk":
        ids, lp = topk_targets(losses.log_softmax(t_logits), 8)
        return {"ids": mx.array(ids), "logprobs": mx.array(lp)}
    ids, counts = sample_targets(t_logits, 16, np.random.default_rng(0))
    return {"ids": mx.array(ids), "counts": mx.array(counts)}


@pytest.mark.parametrize("kind,tied,name", [("sample", True, "forward_kl"),
                                            ("topk", False, "jsd"), ("dense", True, "tvd")])
def test_chunked_equals_whole_sequence(kind, tied, name):
    V, B, L = 64, 2, 24
    model = llama(V, tied=tied)
    x = mx.random.randint(0, V, (B, L), key=mx.random.key(1))
    t = targets_of(kind, mx.random.normal((B, L, V), key=mx.random.key(2)) * 3)
    labels = mx.concatenate([x[:, 1:], mx.full((B, 1), -1)], axis=1)
    mask = (mx.random.uniform(shape=(B, L), key=mx.random.key(3)) > 0.3).astype(mx.uint8)
    body, head, head_module = surgery.split_head(model, V)

    def whole(m):
        return losses.distill_loss(m(x), t, labels, mask, losses.KD(name, alpha=0.5))[0]

    def chunked(m):
        return losses.chunked_distill_loss(body(x), head, head_module.trainable_parameters(),
                                           t, labels, mask, 5, losses.KD(name, alpha=0.5))[0]

    la, ga = nn.value_and_grad(model, whole)(model)
    lb, gb = nn.value_and_grad(model, chunked)(model)
    assert abs(la.item() - lb.item()) < 1e-5
    fa, fb = dict(tree_flatten(ga)), dict(tree_flatten(gb))
    assert fa.keys() == fb.keys()
    for k in fa:  # the head's gradient included: it flows through the checkpoint
        assert np.allclose(np.array(fa[k]), np.array(fb[k]), atol=1e-5), k


def test_chunking_bounds_peak_memory_for_a_big_vocabulary():
    """Vocabulary 16000, 256 positions: the plain loss holds several [L, V] float32 arrays
    (the logits, the softmax and the gathered ids' scatter in the backward pass: measured
    3.3 copies); chunks of 8 positions, evaluated one after another, need a fraction of that
    (measured ~5x less), less than one copy of the logits."""
    V, L = 16000, 256
    model = llama(V, dim=32)
    x = mx.random.randint(0, V, (1, L), key=mx.random.key(1))
    ids, counts = sample_targets(mx.random.normal((1, L, 64)), 16, np.random.default_rng(0))
    t = {"ids": mx.array(ids), "counts": mx.array(counts)}
    labels, mask = x, mx.ones((1, L), dtype=mx.uint8)
    body, head, hm = surgery.split_head(model, V)
    peaks = {}
    for label, fn in {
        "whole": lambda m: losses.distill_loss(m(x), t, labels, mask)[0],
        "chunked": lambda m: losses.chunked_distill_loss(
            body(x), head, hm.trainable_parameters(), t, labels, mask, 8)[0],
    }.items():
        grad = nn.value_and_grad(model, fn)
        mx.eval(grad(model))  # warm-up: allocations of the first call settle
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(grad(model))
        peaks[label] = mx.get_peak_memory()
    logits_bytes = L * V * 4
    assert peaks["whole"] > 2 * logits_bytes, peaks
    assert peaks["chunked"] < peaks["whole"] / 4, peaks
    assert peaks["chunked"] < logits_bytes, peaks  # less than one copy of the full logits


def test_training_with_chunks_and_checkpointing_matches(tiny, tmp_path):
    from mlxdistill import trainer

    def final(sub, **extra):
        cfg = load_config(None, tiny_overrides(tiny, tmp_path / sub, **{
            "cache.dir": str(tmp_path / "cache"), "train.iters": 6, **extra}))
        trainer.fit(cfg, quiet=True, log=lambda m: None)
        recs = [json.loads(x) for x in open(os.path.join(cfg.run.dir, "metrics.jsonl"))]
        return mx.load(os.path.join(cfg.run.dir, "model", "model.safetensors")), recs

    wa, ra = final("plain")
    wb, rb = final("chunked", **{"train.loss_chunk": 8, "train.grad_checkpoint": True})
    for k in wa:
        assert np.allclose(np.array(wa[k]), np.array(wb[k]), atol=1e-4), k
    assert abs(ra[-1]["val_kl"] - rb[-1]["val_kl"]) < 1e-3
