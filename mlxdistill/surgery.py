"""Model surgery: change a loaded model's structure for training. Full, LoRA or DoRA
set-up (mlx_lm's own layers, so adapters load back in `mlx_lm.generate --adapter-path`),
blocks that record their outputs or recompute their activations, the projector for
hidden-state distillation, and the split of a model into body and logits head."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ConfigError
from .models import logits_fn


def num_layers(model) -> int:
    return len(model.layers)


def capture_layers(model, indices) -> dict:
    """Record the outputs of transformer blocks `indices` in a dict on every forward pass.

    MLX has no forward hooks, and wrapping a block in another module would rename its
    parameters (breaking checkpoints and mlx_lm loading); so each chosen block's class is
    swapped for a subclass whose __call__ also stores the output. Returns the store."""
    store: dict = {}
    for i in indices:
        layer = model.layers[i]
        cls = layer.__class__

        def call(self, *args, _cls=cls, _i=i, **kwargs):
            out = _cls.__call__(self, *args, **kwargs)
            store[_i] = out[0] if isinstance(out, tuple) else out
            return out

        layer.__class__ = type(f"Captured{cls.__name__}", (cls,), {"__call__": call})
    return store


def resolve_layers(indices, n: int, key: str) -> list[int]:
    """Negative indices count from the end; anything outside the model is a config error."""
    out = []
    for i in indices:
        if not isinstance(i, int) or not -n <= i < n:
            raise ConfigError(f"{key}: layer {i!r} is out of range for a model with {n} "
                              f"layers (use 0..{n - 1} or negative from the end)")
        out.append(i % n)
    return out


def default_layer_map(teacher_layers: list[int], n_teacher: int, n_student: int) -> list[int]:
    """Student block for each teacher block at the same relative depth."""
    return [max(0, round((t + 1) * n_student / n_teacher) - 1) for t in teacher_layers]


class Projector(nn.Module):
    """Learned linear maps from student to teacher hidden width, one per mapped layer."""

    def __init__(self, d_student: int, d_teacher: int, count: int):
        super().__init__()
        self.maps = [nn.Linear(d_student, d_teacher, bias=False) for _ in range(count)]


def setup_training(model, mode: str, rank: int, layers: int, scale: float,
                   dropout: float) -> dict:
    """Freeze/unfreeze for `mode`; returns the adapter_config that mlx_lm reads back."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n = num_layers(model) if layers == -1 else min(layers, num_layers(model))
    params = {"rank": rank, "scale": scale, "dropout": dropout}
    if mode == "full":
        model.unfreeze()
    else:
        model.freeze()
        linear_to_lora_layers(model, n, params, use_dora=(mode == "dora"))
    return {"fine_tune_type": mode, "num_layers": n, "lora_parameters": params}


def trainable_count(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))



def split_head(model, vocab_size: int):
    """(body, head, head_module) with head(head_module.trainable_parameters(), body(x)) ==
    model(x)[..., :vocab], or None when the model's
    structure is not the usual `model.model` + `lm_head` / tied embedding (+ Gemma-2 style
    soft-capping). Checked on a probe input, so an architecture that computes its logits
    some other way falls back to the whole-sequence loss instead of training on wrong ones."""
    inner = getattr(model, "model", None)
    emb = getattr(inner, "embed_tokens", None)
    proj = getattr(model, "lm_head", None)
    args = getattr(model, "args", None)
    # Some families keep an lm_head next to tied embeddings until weights are loaded.
    tied = getattr(model, "tie_word_embeddings", getattr(args, "tie_word_embeddings", None))
    if tied and hasattr(emb, "as_linear"):
        proj = None
    if inner is None or (proj is None and not hasattr(emb, "as_linear")):
        return None
    cap = getattr(args, "final_logit_softcapping", None)

    def head(h):
        out = proj(h) if proj is not None else emb.as_linear(h)
        if cap:
            out = mx.tanh(out / cap) * cap
        return out[..., :vocab_size] if out.shape[-1] != vocab_size else out

    probe = mx.array([[1, 2, 3, 4]])
    training = model.training
    model.eval()  # no dropout in the comparison
    try:
        same = mx.allclose(head(inner(probe)), logits_fn(model, vocab_size)(probe),
                           atol=1e-4, rtol=1e-4).item()
    except Exception:  # an inner module with another signature: use the whole model
        return None
    finally:
        model.train(training)
    module = proj if proj is not None else emb

    def head_with(params, h):
        module.update(params)  # params arrive through mx.checkpoint: gradients flow to them
        return head(h)

    return (inner, head_with, module) if same else None


def grad_checkpoint(model) -> None:
    """Recompute each transformer block's activations in the backward pass instead of
    keeping them. mlx_lm's helper patches the block class for the whole process (every
    later model of that architecture would be checkpointed too); here each block of this
    model gets a subclass of its own, as capture_layers does, so nothing else changes."""
    layers = getattr(getattr(model, "model", model), "layers", None) or getattr(model, "layers")
    for layer in layers:
        cls = layer.__class__
        if getattr(cls, "_checkpointed", False):
            continue

        def call(self, *args, _cls=cls, **kwargs):
            def inner(params, *a, **k):
                self.update(params)
                return _cls.__call__(self, *a, **k)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        layer.__class__ = type(cls.__name__, (cls,), {"__call__": call, "_checkpointed": True})

