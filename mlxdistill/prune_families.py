"""What `mlxdistill prune` knows of each family it cuts, as mlx_lm builds it: which index set
cuts each axis of each weight, which norms read the residual stream, where the sizes live in
config.json, and the two fixes a width or depth cut needs beyond slicing (Gemma's embedding
scale, Gemma-3's sliding-window pattern)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx

from . import models

# Which index set each axis of a weight is cut by: "d" the embedding channels, "q" / "kv"
# the rows of the kept query / kv heads, "m" the MLP channels, "qkv" and "gu" phi3's fused
# rows ([q | k | v] and [gate | up]), None left whole.
_ATTN = {
    "self_attn.q_proj.weight": ("q", "d"), "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "d"), "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "d"), "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("d", "q"), "self_attn.o_proj.bias": ("d",),
    # per-head norms (qwen3, gemma3) act within a head (head_dim wide): kept heads keep them
    "self_attn.q_norm.weight": (None,), "self_attn.k_norm.weight": (None,),
}
_MLP = {
    "mlp.gate_proj.weight": ("m", "d"), "mlp.gate_proj.bias": ("m",),
    "mlp.up_proj.weight": ("m", "d"), "mlp.up_proj.bias": ("m",),
    "mlp.down_proj.weight": ("d", "m"), "mlp.down_proj.bias": ("d",),
}
_LLAMA = {"input_layernorm.weight": ("d",), "post_attention_layernorm.weight": ("d",),
          **_ATTN, **_MLP}
# Gemma normalises each sublayer's output too (post_attention_layernorm acts on o_proj's
# output, not on the residual stream), so all four norms are hidden_size wide.
_GEMMA = {**_LLAMA, "pre_feedforward_layernorm.weight": ("d",),
          "post_feedforward_layernorm.weight": ("d",)}
_PHI3 = {"input_layernorm.weight": ("d",), "post_attention_layernorm.weight": ("d",),
         "self_attn.qkv_proj.weight": ("qkv", "d"), "self_attn.o_proj.weight": ("d", "q"),
         "mlp.gate_up_proj.weight": ("gu", "d"), "mlp.down_proj.weight": ("d", "m")}
TOP_AXES = {"model.embed_tokens.weight": (None, "d"), "model.norm.weight": ("d",),
            "lm_head.weight": (None, "d")}


def _bf16_sqrt(d: int) -> float:
    """Gemma-3's embedding factor exactly as its forward computes it (rounded to bfloat16)."""
    return mx.array(d ** 0.5, mx.bfloat16).astype(mx.float32).item()


@dataclass(frozen=True)
class Family:
    block_axes: dict
    # norms whose output is the residual stream as a block reads it (embedding importance)
    reading_norms: tuple = ("input_layernorm", "post_attention_layernorm")
    prefix: str = ""  # of every weight name: the text model inside a multimodal wrapper
    nested: Optional[str] = None  # the config.json key holding the text model's config
    text_module: Optional[str] = None  # mlx_lm module whose ModelArgs read `nested`
    # the factor the forward multiplies the embedding by, of hidden_size
    embed_scale: Optional[Callable[[int], float]] = None
    sliding_pattern: bool = False  # blocks alternate by sliding_window_pattern
    tied_by_weights: bool = False  # mlx_lm ties the head when the checkpoint has none


_GEMMA_READS = ("input_layernorm", "pre_feedforward_layernorm")
FAMILIES = {
    "llama": Family(_LLAMA), "mistral": Family(_LLAMA), "qwen2": Family(_LLAMA),
    "qwen3": Family(_LLAMA), "phi3": Family(_PHI3),
    "gemma2": Family(_GEMMA, _GEMMA_READS, embed_scale=lambda d: d ** 0.5),
    "gemma3_text": Family(_GEMMA, _GEMMA_READS, embed_scale=_bf16_sqrt, sliding_pattern=True,
                          tied_by_weights=True),
    # mlx_lm loads a Gemma-3 VLM checkpoint as its text model alone, under language_model.
    "gemma3": Family(_GEMMA, _GEMMA_READS, prefix="language_model.", nested="text_config",
                     text_module="gemma3_text", embed_scale=_bf16_sqrt, sliding_pattern=True,
                     tied_by_weights=True),
}
SUPPORTED = tuple(FAMILIES)
_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")


def family(cfg: dict) -> Family:
    return FAMILIES[cfg["model_type"]]


def text_config(cfg: dict) -> dict:
    """The dict of config.json that holds the text model's sizes."""
    fam = family(cfg)
    return (cfg.get(fam.nested) or {}) if fam.nested else cfg


def text_args(cfg: dict):
    """The text model's ModelArgs as mlx_lm builds them: sizes a config leaves out take
    mlx_lm's defaults, as they do when it loads."""
    fam = family(cfg)
    args_cls = models.model_classes(cfg, "the teacher")[1]
    args = args_cls.from_dict(json.loads(json.dumps(cfg)))  # it edits text_config in place
    if fam.nested:
        mod = importlib.import_module(f"mlx_lm.models.{fam.text_module}")
        args = mod.ModelArgs.from_dict(getattr(args, fam.nested))
    return args


def derives_head_dim(args) -> bool:
    """True where mlx_lm takes head_dim from hidden_size / num_attention_heads (qwen2, phi3):
    its ModelArgs has no head_dim to set."""
    return "head_dim" not in {f.name for f in dataclasses.fields(args)}


def split_name(cfg: dict, name: str) -> tuple:
    """(block index or None, the weight's axes or None when unknown, its name in a block or
    at the top) of a flat mlx weight name."""
    fam = family(cfg)
    if not name.startswith(fam.prefix):
        return None, None, name
    rest = name[len(fam.prefix):]
    m = _BLOCK.fullmatch(rest)
    if m:
        return int(m.group(1)), fam.block_axes.get(m.group(2)), m.group(2)
    return None, TOP_AXES.get(rest), rest


def block_name(cfg: dict, j: int, inner: str) -> str:
    return f"{family(cfg).prefix}model.layers.{j}.{inner}"


def text_model(model):
    """The module holding embed_tokens, layers and norm of a loaded model."""
    return getattr(model, "language_model", model).model


def window_pattern(cfg: dict, n: int) -> Optional[int]:
    """Gemma-3's sliding_window_pattern for `n` blocks: block i is global when
    (i + 1) % pattern == 0, the rest slide, each with its own RoPE base. mlx_lm's forward
    indexes block pattern - 1, so a student of fewer blocks than the teacher's pattern gets
    pattern n: its last block global, the others sliding. None for a family without one."""
    if not family(cfg).sliding_pattern:
        return None
    return min(int(text_args(cfg).sliding_window_pattern), n)


def attention_kinds(cfg: dict, n_teacher: int, n_student: int) -> Optional[tuple]:
    """("global" / "sliding" per block of the teacher, of the student), or None where every
    block attends alike."""
    if window_pattern(cfg, n_teacher) is None:
        return None
    return tuple(["global" if (i + 1) % window_pattern(cfg, n) == 0 else "sliding"
                  for i in range(n)] for n in (n_teacher, n_student))


def keep_kinds(scores, kinds: list, want: list) -> Optional[list]:
    """The blocks b_0 < b_1 < ... with kinds[b_j] == want[j] whose scores sum highest (ties:
    the earlier), so every kept block keeps its kind of attention at its new index; None
    when no such blocks exist."""
    n, k, none = len(scores), len(want), float("-inf")
    best = [[none] * k + [0.0] for _ in range(n + 1)]  # best[i][j]: want[j:] from blocks i:
    for i in range(n - 1, -1, -1):
        for j in range(k - 1, -1, -1):
            take = float(scores[i]) + best[i + 1][j + 1] if kinds[i] == want[j] else none
            best[i][j] = max(take, best[i + 1][j])
    if best[0][0] == none:
        return None
    out = []
    for i in range(n):
        j = len(out)
        if j < k and kinds[i] == want[j] and \
                float(scores[i]) + best[i + 1][j + 1] >= best[i + 1][j]:
            out.append(i)
    return out


def tied_by_weights(cfg: dict, folder: str) -> bool:
    """True for a family whose mlx_lm class ties the head when the checkpoint has none
    (Gemma-3), and a checkpoint without one; read from the safetensors headers alone."""
    if not family(cfg).tied_by_weights:
        return False
    for path in models.weight_files(folder):
        if path.endswith(".safetensors"):
            with open(path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            if any(k.endswith("lm_head.weight") for k in header):
                return False
    return True


def embed_factor(cfg: dict, d_teacher: int, d_student: int) -> float:
    """What the cut embedding is multiplied by so that the student's scaled embedding equals
    the teacher's on the kept channels (1.0 for a family without the scale)."""
    scale = family(cfg).embed_scale
    return 1.0 if scale is None or d_teacher == d_student else \
        scale(d_teacher) / scale(d_student)
