"""Load teacher and student through mlx_lm, check their vocabularies agree, and set the
student up for full, LoRA or DoRA training (mlx_lm's own layers, so adapters load back in
`mlx_lm.generate --adapter-path`)."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import files
from .config import ConfigError


class ModelError(ValueError):
    """A user error about a model folder; the message is one line."""


_log = logging.getLogger(__name__)
SUPPORTED_HINT = "llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, starcoder2, ..."


def model_classes(config: dict, what: str):
    """mlx_lm's (Model, ModelArgs) for a config; an architecture mlx_lm does not know is a
    user error naming its model_type (mlx_lm's own message names only a module)."""
    from mlx_lm.utils import _get_classes

    mt = config.get("model_type")
    if not mt:
        raise ModelError(f"{what}: config.json has no model_type; it is not an mlx_lm model")
    try:
        return _get_classes(config)
    except ValueError:
        raise ModelError(f"{what} has model_type {mt!r}, an architecture mlx_lm does not "
                         f"support; use a model of a supported family ({SUPPORTED_HINT}) or "
                         "upgrade mlx-lm") from None


def compute_dtype() -> Optional[mx.Dtype]:
    """float32 on CPU: mlx[cpu] has no fast bf16/fp16 matmul. On Metal keep the model's own."""
    return mx.float32 if not mx.metal.is_available() else None


def _model_files_present(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and bool(
        glob.glob(os.path.join(path, "*.safetensors")))


def load(path: str, what: str, adapter_path: Optional[str] = None, lazy: bool = False,
         trust_remote_code: bool = False):
    """(model, tokenizer, config) for a local mlx_lm folder or a hub id (on a Mac). A folder
    whose config asks to run its own Python (`model_file`) is refused unless
    `trust_remote_code` (the config's teacher/student.trust_remote_code) is set."""
    from mlx_lm.utils import load as mlx_load

    if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") != 1:
        if not os.path.isdir(path):
            raise ModelError(f"{what} model folder {path} not found; set {what}.model to an "
                             "mlx_lm model folder or a hub id")
        if not _model_files_present(path):
            raise ModelError(f"{what} model folder {path} has no config.json + *.safetensors; "
                             "convert it with `mlx_lm.convert` first")
        try:
            with open(os.path.join(path, "config.json")) as f:
                model_classes(json.load(f), f"{what} model {path}")
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}/config.json is not valid JSON ({e.msg})") from None
    try:
        model, tokenizer, config = mlx_load(path, adapter_path=adapter_path, lazy=lazy,
                                            return_config=True,
                                            trust_remote_code=trust_remote_code)
    except Exception as e:  # mlx_lm raises many kinds; the user needs the path and the cause
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not os.path.exists(path):
            raise ModelError(f"{what} model {path} is not a local folder and fetching it from "
                             f"the Hugging Face hub failed ({msg})") from None
        raise ModelError(f"cannot load {what} model {path}: {msg}") from None
    dtype = compute_dtype()
    if dtype is not None:
        model.set_dtype(dtype)
    return model, tokenizer, config


def load_role(cfg, role: str, **kw):
    """load() of the config's teacher or student with its trust_remote_code setting."""
    section = getattr(cfg, role)
    return load(section.model, role, trust_remote_code=section.trust_remote_code, **kw)


def load_meta(path: str, what: str):
    """(config, tokenizer) without the weights: enough for the vocabulary and context checks
    that must pass before any compute."""
    from pathlib import Path

    from mlx_lm.utils import load_config, load_tokenizer

    if not os.path.isdir(path):
        _, tok, cfg = load(path, what, lazy=True)
        return cfg, tok
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"{what} model folder {path} has no config.json")
    try:
        return load_config(Path(path)), load_tokenizer(Path(path))
    except Exception as e:
        raise ModelError(f"cannot load the {what} tokenizer from {path}: {e}") from None


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of the token -> id map: two tokenizers with the same fingerprint split text into
    the same ids, which is what distilling over logits needs."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def logits_size(config: dict) -> int:
    return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))


@dataclass(frozen=True)
class VocabMatch:
    fingerprint: str
    vocab_size: int  # logits columns both models share (padding rows sliced off)


def check_vocab(teacher_tok, teacher_cfg: dict, student_tok, student_cfg: dict) -> VocabMatch:
    """Refuse a pair whose tokenizers differ, before any compute.

    Models of one family often pad the embedding to different sizes (Qwen2.5-7B: 152064
    rows, 0.5B: 151936) while sharing one tokenizer; rows past the tokenizer are never real
    tokens, so logits are compared over the smaller size."""
    ft, fs = vocab_fingerprint(teacher_tok), vocab_fingerprint(student_tok)
    if ft != fs:
        tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
        differ = sum(1 for t, i in tv.items() if sv.get(t) != i)
        raise ModelError(
            f"teacher and student tokenizers differ (vocabulary fingerprints: teacher "
            f"{ft[:12]}, student {fs[:12]}; {differ} of {len(tv)} teacher tokens map to other "
            "ids or are missing); logit distillation needs one vocabulary: pick a student of "
            "the teacher's family (e.g. Qwen2.5-0.5B for a Qwen2.5 teacher, Llama-3.2-1B for "
            "Llama-3.1)")
    note = chat_template_note(teacher_tok, student_tok)
    if note and (ft, note) not in _warned:
        _warned.add((ft, note))
        _log.warning(note)
    size = min(logits_size(teacher_cfg), logits_size(student_cfg))
    ntok = len(teacher_tok.get_vocab())
    if size < ntok:
        raise ModelError(f"model vocab_size {size} is smaller than the tokenizer's {ntok} tokens")
    return VocabMatch(ft, size)


_warned: set = set()
_SAMPLE_CHAT = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]


def _template(tok) -> Optional[str]:
    t = getattr(tok, "chat_template", None)
    return json.dumps(t, sort_keys=True) if isinstance(t, dict) else t


def chat_template_note(teacher_tok, student_tok) -> Optional[str]:
    """Why the pair's chat templates disagree, or None. Chat data is rendered once, with the
    teacher's template, and the student learns from those tokens: a student whose own
    template renders turns differently meets another format at inference."""
    t, s = _template(teacher_tok), _template(student_tok)
    if t == s:
        return None
    head = "teacher and student chat templates differ: "
    tail = ("; chat data is rendered with the teacher's template for both, so the student "
            "learns the teacher's turn format")
    if t is None or s is None:
        has, lacks = ("student", "teacher") if t is None else ("teacher", "student")
        return (head + f"the {has}'s tokenizer has one, the {lacks}'s none" + tail
                + ("" if t else " (plain 'role: content' lines, no template)"))
    try:
        rt = teacher_tok.apply_chat_template(_SAMPLE_CHAT, tokenize=False)
        rs = student_tok.apply_chat_template(_SAMPLE_CHAT, tokenize=False)
    except Exception as e:  # a template that cannot render is itself the reason
        return head + f"rendering a sample chat failed ({type(e).__name__}: {e})" + tail
    if rt == rs:
        return None  # different source, same rendering: nothing the student would notice
    return (head + f"a sample chat renders as {rt[:60]!r} with the teacher's and "
            f"{rs[:60]!r} with the student's" + tail)


WEIGHT_FILES = "*.safetensors*"  # shards and their index
FINGERPRINT_KIND = "content-sha256"  # what a manifest's teacher fingerprint covers


def weight_files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, WEIGHT_FILES))) if os.path.isdir(path) else []


def model_fingerprint(path: str) -> str:
    """sha256 over config.json and every weight file's name and content: a model retrained
    in place, same shapes and sizes, is another model. Each file's hash is remembered per
    user by (path, size, mtime, inode) (files.remembered_sha256), so a 15 GB teacher is read
    once, not on every run. A hub id is its own fingerprint."""
    h = hashlib.sha256()
    if not os.path.isdir(path):
        h.update(path.encode())
        return h.hexdigest()
    with open(os.path.join(path, "config.json"), "rb") as f:
        h.update(f.read())
    names = weight_files(path)
    for p, digest in zip(names, files.remembered_sha256(names)):
        h.update(os.path.basename(p).encode())
        h.update(digest.encode())
    return h.hexdigest()


config_fingerprint = model_fingerprint  # the name scripts import


def max_context(config: dict) -> Optional[int]:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def check_seq_len(seq_len: int, config: dict, what: str) -> None:
    ctx = max_context(config)
    if ctx is not None and seq_len > ctx:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the {what} model's context of "
                          f"{ctx} tokens; lower data.seq_len")


def num_layers(model) -> int:
    return len(model.layers)


def capture_layers(model, indices) -> tuple[dict, callable]:
    """Record the outputs of transformer blocks `indices` in a dict on every forward pass.

    MLX has no forward hooks, and wrapping a block in another module would rename its
    parameters (breaking checkpoints and mlx_lm loading); so each chosen block's class is
    swapped for a subclass whose __call__ also stores the output. Returns (store, undo)."""
    store: dict = {}
    undo = []
    for i in indices:
        layer = model.layers[i]
        cls = layer.__class__

        def call(self, *args, _cls=cls, _i=i, **kwargs):
            out = _cls.__call__(self, *args, **kwargs)
            store[_i] = out[0] if isinstance(out, tuple) else out
            return out

        layer.__class__ = type(f"Captured{cls.__name__}", (cls,), {"__call__": call})
        undo.append((layer, cls))

    def restore():
        for layer, c in undo:
            layer.__class__ = c

    return store, restore


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


def adapter_base(base_model: str) -> str:
    """The base model as adapter_config.json records it: a local folder as an absolute path,
    valid from any directory (a relative one holds only where the run started); a hub id
    as itself."""
    return os.path.abspath(base_model) if os.path.isdir(base_model) else base_model


def save_adapters(model, adapter_config: dict, base_model: str, out_dir: str) -> None:
    """adapters.safetensors + adapter_config.json, as `mlx_lm.lora` writes them."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    with files.atomic_path(os.path.join(out_dir, "adapters.safetensors")) as tmp:
        mx.save_safetensors(tmp, weights)
    cfg = {**adapter_config, "model": adapter_base(base_model)}
    files.atomic_json(os.path.join(out_dir, "adapter_config.json"), cfg)


TOKENIZER_FILES = ("tokenizer*", "*.model", "special_tokens_map.json", "added_tokens.json",
                   "chat_template*", "vocab.json", "merges.txt")


def local_folder(path: str) -> Optional[str]:
    """A model folder on disk: `path` itself, or a hub id's cached snapshot (no network)."""
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:  # not cached, not a hub id, or no huggingface_hub
        return None


def copy_tokenizer(tokenizer, src_path: str, dst: str) -> None:
    """The source model's tokenizer files into `dst`, byte for byte. Saving through the
    installed transformers would rewrite tokenizer_config.json (transformers 5 writes
    tokenizer_class "TokenizersBackend" and drops add_bos_token), which transformers 4 and
    swift-transformers, MLX Swift's loader, refuse; transformers writes only the
    tokenizer.json / tokenizer_config.json that the source lacks."""
    src = local_folder(src_path)
    for pattern in TOKENIZER_FILES if src else ():
        for f in glob.glob(os.path.join(src, pattern)):
            if os.path.isfile(f):
                shutil.copyfile(f, os.path.join(dst, os.path.basename(f)))
    if all(os.path.isfile(os.path.join(dst, f)) for f in ("tokenizer.json",
                                                           "tokenizer_config.json")):
        return
    import tempfile

    with tempfile.TemporaryDirectory(dir=dst) as scratch:
        tokenizer.save_pretrained(scratch)
        for name in os.listdir(scratch):
            if not os.path.exists(os.path.join(dst, name)):
                shutil.copyfile(os.path.join(scratch, name), os.path.join(dst, name))


def save_full_model(model, tokenizer, config: dict, src_path: str, out_dir: str) -> None:
    """An mlx_lm-loadable folder (weights, config.json, tokenizer), written under a temp name
    and renamed so a half-written model/ never exists."""
    from mlx_lm.utils import save_config, save_model

    with files.atomic_dir(out_dir) as tmp:
        save_model(tmp, model)
        save_config(dict(config), os.path.join(tmp, "config.json"))
        copy_tokenizer(tokenizer, src_path, tmp)



def quantize(model, config: dict, group_size: int, bits: int):
    """mlx_lm's affine quantization, without its print to stdout (which would corrupt
    `--json` output)."""
    import contextlib
    import io

    from mlx_lm.utils import quantize_model

    with contextlib.redirect_stdout(io.StringIO()):
        return quantize_model(model, config, group_size, bits)


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


def logits_fn(model, vocab_size: int):
    """The model's logits sliced to the shared vocabulary."""

    def f(x):
        out = model(x)
        return out[..., :vocab_size] if out.shape[-1] != vocab_size else out

    return f
