"""Will this run fit? Peak memory of the teacher pass and of training, cache size on disk and
(optionally) time, estimated from the models' config.json files before anything is loaded.

Weights are counted exactly: the model's mlx_lm class is built lazily from its config (MLX
arrays are lazy, so no weight memory is allocated) and its parameter shapes are read, with
quantized layers at their packed size. Activations follow from what MLX keeps for the
backward pass of a pre-norm transformer block, per token and layer, and from the float32
logits [batch, seq_len, vocab] whose log-softmax and gradient dominate small students with
large vocabularies. `--probe` measures both passes on this machine for the time estimate and
to check the memory model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import data as data_mod
from . import models
from . import prune_families as fams
from . import xtok as xtok_mod
from .config import Config
from .hubmeta import hub_config
from .models import ModelError
from .probe import add_measured  # the measured side of --probe
from .shards import id_dtype

GB = 1 << 30


# ---------------------------------------------------------------- model configs

def read_config(path: str, what: str) -> dict:
    """config.json alone; config_and_note also says where it came from."""
    return config_and_note(path, what)[0]


def config_and_note(path: str, what: str) -> tuple[dict, Optional[str]]:
    """config.json of a local model folder, or of a hub id (hubmeta: the file alone is
    fetched, or read from the local Hugging Face cache, or the copy shipped with mlxdistill
    is used, with a note saying why)."""
    if os.path.isdir(path):
        cpath = os.path.join(path, "config.json")
        if not os.path.isfile(cpath):
            raise ModelError(f"{what} model folder {path} has no config.json")
        with open(cpath) as f:
            return json.load(f), None
    if path.startswith((".", "/")) or path.count("/") != 1:
        raise ModelError(f"{what} model folder {path} not found; set {what}.model to an "
                         "mlx_lm model folder or a hub id")
    return hub_config(path, what)


def pruned_student(cfg: Config, tconf: dict) -> Optional[tuple[dict, dict]]:
    """(config.json, shape) of the student `mlxdistill prune` would cut by cfg.prune, the same
    shape from the teacher's config.json alone; None when prune.* sets no size and no
    target_params. Which blocks are kept is measured: the first ones stand in (same widths)."""
    from . import prune as pr  # here, not above: prune.count_params imports this module

    p = cfg.prune
    if p.target_params is None and all(getattr(p, k) is None for k in pr.SHAPE_KEYS):
        return None
    pr.check_teacher(tconf, f"teacher {cfg.teacher.model}")
    # a Gemma-3 checkpoint without a head is tied by mlx_lm: only a local folder says so
    tied = (fams.tied_by_weights(tconf, cfg.teacher.model)
            if os.path.isdir(cfg.teacher.model) else None)
    shape = pr.target_shape(tconf, p, tied)
    return pr.student_config(tconf, shape, list(range(shape["num_hidden_layers"]))), shape


def lazy_model(config: dict, what: str):
    """The model built from its config without evaluating any weight."""
    model_cls, args_cls = models.model_classes(config, what)
    # a copy: some mlx_lm classes (Gemma-3's text model) fill in their config dicts
    return model_cls(args_cls.from_dict(copy.deepcopy(config)))


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs from a config: counts and widths, no weights."""
    model_type: str
    params: int
    weight_bytes: int  # as loaded here (packed where quantized)
    layers: int
    hidden: int
    ffn: int
    heads: int
    q_dim: int
    kv_dim: int
    vocab: int
    bits: Optional[int]  # quantization bits, None for full precision
    float_bytes: int  # bytes per float weight and activation as loaded
    fused: int  # outputs of fused projections per layer (Phi-3 qkv_proj, gate_up_proj)
    extra_norms: int  # norm outputs per layer beyond a Llama block's two (Gemma, q/k norms)
    attn_copies: int  # [heads, L] score arrays per token a block keeps for its backward pass
    metal: bool  # planned for a Mac GPU (else the CPU backend)
    lora_per_rank_layer: float  # LoRA parameters per unit of rank, per transformer block


def dtype_bytes(config: dict, metal: Optional[bool] = None) -> int:
    """Bytes per float weight as `models.load` leaves them: float32 on CPU (mlx[cpu] has no
    fast half-precision matmul), the checkpoint's own dtype on Metal. `metal` plans for the
    other kind of machine than this one."""
    if not _on_metal(metal):
        return 4
    dt = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return 4 if "32" in dt else 2


def _on_metal(metal: Optional[bool]) -> bool:
    """Plan for a Mac GPU? `metal` when given, else whether this machine is one."""
    return models.compute_dtype() is None if metal is None else metal


def model_shape(config: dict, what: str, quantize: Optional[tuple[int, int]] = None,
                metal: Optional[bool] = None) -> ModelShape:
    """Exact parameter count and loaded size of a model from its config alone. `quantize`
    (bits, group) sizes it as if converted to that precision."""
    model = lazy_model(config, what)
    q = config.get("quantization") or config.get("quantization_config") or {}
    bits, group = (quantize or (q.get("bits"), q.get("group_size") or 64))
    fbytes = dtype_bytes(config, metal)
    params = wbytes = fused = 0
    lora: dict = {}
    seen = set()
    layer_ids = {id(m) for layer in model.layers for _, m in layer.named_modules()}
    for _, m in model.named_modules():
        for k, v in m.items():
            if not isinstance(v, mx.array) or id(v) in seen:
                continue
            seen.add(id(v))
            params += v.size
            packable = (k == "weight" and hasattr(m, "to_quantized") and v.ndim == 2
                        and bits and v.shape[-1] % group == 0)
            # packed: bits per weight, plus a scale and a bias per group in the float dtype
            wbytes += (v.size * bits // 8 + 2 * (v.size // group) * fbytes if packable
                       else v.size * fbytes)
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and id(m) in layer_ids:
            out_d, in_d = m.weight.shape
            lora[id(m)] = in_d + out_d  # LoRA adds A [in, r] and B [r, out]
    heads = int(config.get("num_attention_heads") or 1)
    hidden = int(config.get("hidden_size") or 0)
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv = int(config.get("num_key_value_heads") or heads)
    norms = 0
    for name, m in model.layers[0].named_modules():
        # A fused projection's output is one more array beside the q/k/v or gate/up it is
        # split into.
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and ("qkv" in name or "gate_up" in name):
            fused += int(m.weight.shape[0])
        # Every norm keeps its output for the backward pass: Gemma's four per block and the
        # per-head q/k norms of Qwen3 and Gemma-3 add to a Llama block's two.
        elif "norm" in type(m).__name__.lower():
            last = name.rsplit(".", 1)[-1]
            norms += heads * head_dim if last == "q_norm" else kv * head_dim \
                if last == "k_norm" else hidden
    return ModelShape(
        model_type=config["model_type"], params=int(params), weight_bytes=int(wbytes),
        layers=len(model.layers), hidden=hidden,
        ffn=int(config.get("intermediate_size") or 4 * hidden), heads=heads,
        q_dim=heads * head_dim, kv_dim=kv * head_dim, vocab=models.logits_size(config),
        bits=int(bits) if bits else None, float_bytes=fbytes, fused=fused,
        extra_norms=max(0, norms - 2 * hidden),
        # Gemma-2's attention soft-cap (scores / cap, tanh, * cap) keeps 4 more score-sized
        # arrays per block than a plain softmax, measured on the family matrix's Gemma-2.
        attn_copies=1 + 4 * bool(config.get("attn_logit_softcapping")),
        metal=_on_metal(metal),
        lora_per_rank_layer=sum(lora.values()) / max(1, len(model.layers)))


# Floats kept per token by one training step, measured on MLX's CPU backend by varying one
# dimension at a time of a Llama block (tests/test_plan.py re-checks the sum on every family):
#  - logits: the [B, L, V] float32 logits, and in the backward pass the softmax (the
#    logsumexp's gradient) and the scatter of the gathered ids' gradient: 3.1 copies live at
#    the peak. A teacher pass holds the logits in MLX (1 copy at T = 1, measured); on a GPU
#    the sampler's exp and its shifted input stay on the device too (3, counted), on the CPU
#    backend they are numpy arrays (targets.sample_targets).
#  - per layer, saved for the backward pass: the residual input and the two normed inputs,
#    q/k/v before and after RoPE and the attention output (4 d + 3 q + 3 kv), the MLP's gate,
#    up, sigmoid, SiLU and product (5 ffn), the attention probabilities (heads x L), and
#    whatever the architecture adds: fused projections' outputs, norms beyond two.
#  - once, at the peak (the last layer's backward): 2 ffn, 2 heads x L, and the head's
#    d-sized buffers (22 d when the embedding is trained, 8 d when it is frozen).
TRAIN_LOGIT_COPIES = 3.1
TEACHER_LOGIT_COPIES = {"cpu": 1, "metal": 3}
# Gemma-2's soft-capping (tanh over the logits) measured no extra copy in either pass.
TRAIN_FULL_COPIES = 3  # weights + AdamW's two moments (gradients are freed as they apply)


# train.loss_chunk computes the loss over chunks of positions, one chunk after another, each
# chunk's logits recomputed in the backward pass. Measured on the CPU backend (embedded
# student, seq_len 256 and 512, chunks of 1/16 to 1/2 of the sequence): nothing of the
# whole-sequence logits remains, and about 5 copies of one chunk's share are live at the
# peak, never more than the unchunked step's copies.
CHUNKED_LOGIT_COPIES = (0.0, 5.0)
# A student of another tokenizer (xtok.py): extra [B, L, V] float32 copies of each
# cross-tokenizer loss at the peak, beyond TRAIN_LOGIT_COPIES; measured with `plan --probe`
# on the embedded pair (CPU, 8 x 256 x 4096): the logits with the mapped ids removed
# (mapped), the student's sorted top and conditional (uld, hybrid), the next-token
# log-probabilities' copy (chunk).
XTOK_LOGIT_COPIES = {"mapped": 2.0, "hybrid": 6.0, "uld": 5.0, "chunk": 3.0}
def train_logit_copies(cfg: Config, xtok: str = "") -> float:
    chunk, L = cfg.train.loss_chunk, cfg.data.seq_len
    if xtok:  # the cross-tokenizer losses take the whole sequence (train.loss_chunk aside)
        return TRAIN_LOGIT_COPIES + XTOK_LOGIT_COPIES[xtok]
    if chunk and chunk < L:
        return min(TRAIN_LOGIT_COPIES,
                   CHUNKED_LOGIT_COPIES[0] + CHUNKED_LOGIT_COPIES[1] * chunk / L)
    return TRAIN_LOGIT_COPIES


def train_activation_floats(s: ModelShape, seq_len: int, full: bool,
                            checkpoint: bool = False) -> float:
    """Floats per token a training step keeps at its peak, besides the logits. With
    train.grad_checkpoint a block keeps only its input, and one block's activations exist at
    a time, while its backward pass recomputes them."""
    attn = s.heads * seq_len
    per_layer = (4 * s.hidden + 3 * s.q_dim + 3 * s.kv_dim + 5 * s.ffn + s.attn_copies * attn
                 + s.fused + s.extra_norms)
    once = 2 * s.ffn + 2 * attn + (22 if full else 8) * s.hidden
    if checkpoint:
        return s.layers * s.hidden + per_layer + once
    return s.layers * per_layer + once


def teacher_activation_floats(s: ModelShape, seq_len: int) -> float:
    """Floats per token of a forward pass without gradients: one layer's transients."""
    return 9.3 * s.hidden + 4 * s.ffn + 1.2 * s.heads * seq_len + s.fused


def target_floats(cfg: Config) -> float:
    """The loss's per-position work on the sparse targets (gathered log-probs, weights)."""
    return 6 * (cfg.cache.n if cfg.cache.mode == "sample" else cfg.cache.k + 1)


def cache_bytes_per_token(cfg: Config, vocab: int, hidden: int) -> float:
    """Bytes per cached token on disk, as cache.py writes shards: input_ids int32, loss_mask
    uint8, then n ids + uint8 counts (sample) or k ids + float16 log-probs + the float32
    tail log-mass (top-k), plus float16 hidden states per cached layer."""
    c = cfg.cache
    idb = np.dtype(id_dtype(vocab)).itemsize
    per = c.n * (idb + 1) if c.mode == "sample" else c.k * (idb + 2) + 4
    return 4 + 1 + per + 4 * c.next_logprob + 2 * hidden * len(c.hidden_layers)


def estimate_training(cfg: Config, s: ModelShape, xtok: str = "") -> dict:
    """Peak bytes of one training step of the student `s`, by part."""
    t = cfg.train
    full = t.mode == "full"
    micro = t.batch_size // t.grad_accum
    tokens = micro * cfg.data.seq_len
    if full:
        trainable = s.params
        # AdamW's moments take the weights' dtype; accumulating micro-batches keeps one more
        # gradient-sized sum.
        state = trainable * s.float_bytes * (TRAIN_FULL_COPIES - 1 + (t.grad_accum > 1))
    else:
        n = s.layers if t.lora_layers == -1 else min(t.lora_layers, s.layers)
        trainable = int(s.lora_per_rank_layer * t.lora_rank * n)
        # LoRA weights, their gradients and AdamW's two moments, all float32
        state = trainable * 4 * 4
    parts = {
        "weights": s.weight_bytes, "trainable_state": int(state),
        "activations": int(tokens * s.float_bytes * train_activation_floats(
            s, cfg.data.seq_len, full, t.grad_checkpoint)),
        "logits": int(tokens * s.vocab * 4 * train_logit_copies(cfg, xtok)),
        "targets": int(tokens * target_floats(cfg) * 4),
    }
    return {"trainable_params": int(trainable), "micro_batch": micro, "parts": parts,
            "peak_bytes": sum(parts.values())}


def estimate_teacher(cfg: Config, s: ModelShape, vocab: Optional[int] = None) -> dict:
    """Peak bytes of one teacher-pass batch (cache.batch_size rows), by part. vocab: the
    vocabulary shared with the student (the teacher's own when None): the forward's logits
    have the teacher's width, every later copy only the shared one."""
    tokens = cfg.cache.batch_size * cfg.data.seq_len
    copies = TEACHER_LOGIT_COPIES["metal" if s.metal else "cpu"]
    act = tokens * teacher_activation_floats(s, cfg.data.seq_len) * s.float_bytes
    parts = {"weights": s.weight_bytes, "activations": int(act),
             "logits": int(tokens * 4 * (s.vocab + (copies - 1) * (vocab or s.vocab)))}
    return {"parts": parts, "peak_bytes": sum(parts.values())}


def machine_memory() -> tuple[int, str]:
    """Bytes this machine can give MLX: Metal's recommended working set on a Mac, physical
    RAM elsewhere."""
    if mx.metal.is_available():
        info = mx.metal.device_info()
        return int(info["max_recommended_working_set_size"]), "Metal working set"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"


def dataset_rows(cfg: Config) -> tuple[Optional[int], str]:
    """Packed training rows: counted with the teacher's tokenizer when it is local (records
    are tokenized only until data.max_rows is reached), else estimated at 4 bytes of text
    per token."""
    path, L, cap = cfg.data.train, cfg.data.seq_len, cfg.data.max_rows
    if not os.path.isfile(path):
        return cap, "data.max_rows" if cap else "unknown (data.train not found)"
    if os.path.isdir(cfg.teacher.model):
        try:
            _, tok = models.load_meta_role(cfg, "teacher")
            eos = tok.eos_token_id is not None
            tokens = 0
            for rec in data_mod.read_records(path):
                segs = data_mod.record_segments(tok, rec, cfg.data.mask_prompt)
                n = sum(len(ids) for ids, _ in segs) + eos
                tokens += n + data_mod.row_padding(
                    tokens, n, L, data_mod.keeps_whole(rec, cfg.data.packing))
                if cap and tokens >= cap * L:
                    break
            rows = -(-tokens // L)
            return (min(rows, cap) if cap else rows), "tokenized"
        except Exception:  # the estimate below still says something useful
            pass
    rows = max(1, os.path.getsize(path) // (4 * L))
    return (min(rows, cap) if cap else rows), "estimated from the file size"


def _with(cfg: Config, section: str, **changes) -> Config:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section),
                                                                    **changes)})


def training_total(cfg: Config, s: ModelShape, bpt: float, xtok: str = "") -> dict:
    est = estimate_training(cfg, s, xtok)
    L = cfg.data.seq_len
    # across tokenizers validation keeps the student's rows only (no teacher distributions)
    ev = cfg.train.eval_rows * L * s.vocab * 2 if cfg.data.valid and not xtok else 0
    # The reader holds the shard being read and the one prefetched behind it (and their
    # aligned shards).
    host = 2 * cfg.cache.shard_rows * L * (bpt + xtok_mod.aligned_bytes_per_token(xtok)) \
        if cfg.teacher.mode == "cache" else 0
    est["parts"]["eval_targets"] = int(ev)
    return _add_host(est, host)


def teacher_total(cfg: Config, s: ModelShape, bpt: float, rows: Optional[int],
                  vocab: Optional[int] = None) -> dict:
    est = estimate_teacher(cfg, s, vocab)
    L, B = cfg.data.seq_len, cfg.cache.batch_size
    # One shard accumulates on the host, with the packed dataset (int32 ids + uint8 mask)
    # and the draws; on the CPU backend the sampler's logits and exp are numpy copies too.
    cdf = ((0 if s.metal else 2) * B * L * (vocab or s.vocab) * 4 + B * L * cfg.cache.n * 8
           if cfg.cache.mode == "sample" else 0)
    return _add_host(est, cfg.cache.shard_rows * L * bpt + cdf + (rows or 0) * L * 5)


def _add_host(est: dict, host: float) -> dict:
    est["mlx_bytes"] = sum(est["parts"].values())  # what mx.get_peak_memory counts
    est["parts"]["shard_buffers"] = int(host)  # numpy, outside MLX
    est["peak_bytes"] = sum(est["parts"].values())
    return est


def _fit_knobs(cfg: Config, est_fn, budget: int, what: str) -> list[str]:
    """Settings that bring the estimate under `budget`, each on its own: per setting, the
    first of its values (mildest first) that fits."""
    knobs = []

    def first(section: str, key: str, values, label=None) -> None:
        for v in values:
            if est_fn(_with(cfg, section, **{key: v})) <= budget:
                knobs.append(label(v) if label else f"{section}.{key}={v}")
                return

    def halves(start: int, least: int) -> list[int]:  # start, start // 2, ... down to least
        return [start >> i for i in range(start.bit_length()) if start >> i >= least]

    t = cfg.train
    if what == "train":
        first("train", "grad_accum", [k for k in (2, 4, 8, 16, 32)
                                      if k > t.grad_accum and t.batch_size % k == 0],
              lambda k: f"train.grad_accum={k} (micro-batch {t.batch_size // k}, same "
                        "global batch)")
        first("train", "mode", ["lora"] if t.mode == "full" else [])
        first("train", "grad_checkpoint", [] if t.grad_checkpoint else [True],
              lambda _: "train.grad_checkpoint=true")
        first("train", "loss_chunk", [] if t.loss_chunk else halves(cfg.data.seq_len // 2, 32))
    else:
        first("cache", "batch_size", [b for b in (4, 2, 1) if b < cfg.cache.batch_size])
    first("data", "seq_len", halves(cfg.data.seq_len // 2, 64))
    return knobs


def plan(cfg: Config, probe: bool = False, memory_bytes: Optional[int] = None,
         metal: Optional[bool] = None) -> dict:
    """The whole estimate for a config; `probe` also measures both passes here. `metal`
    plans for a Mac GPU (True) or a CPU (False) instead of this machine."""
    tconf, tnote = config_and_note(cfg.teacher.model, "teacher")
    pruned = pruned_student(cfg, tconf)  # planned when prune.* is set, not student.model
    sconf, snote = (pruned[0], None) if pruned else config_and_note(cfg.student.model, "student")
    ts = model_shape(tconf, f"teacher model {cfg.teacher.model}", metal=metal)
    ss = model_shape(sconf, "the pruned student" if pruned else
                     f"student model {cfg.student.model}", metal=metal)
    # a pruned student keeps the teacher's tokenizer
    xtok = xtok_mod.cross_tokenizer(cfg) if cfg.teacher.mode == "cache" and not pruned else ""
    vocab = ts.vocab if xtok else min(ts.vocab, ss.vocab)  # the cache's: the teacher's own
    bpt = cache_bytes_per_token(cfg, vocab, ts.hidden)
    abpt = xtok_mod.aligned_bytes_per_token(xtok)
    rows, rows_how = dataset_rows(cfg)
    budget, budget_what = (memory_bytes, "given") if memory_bytes else machine_memory()
    train_est = training_total(cfg, ss, bpt, xtok)
    teacher_est = teacher_total(cfg, ts, bpt, rows, vocab) if cfg.teacher.mode == "cache" \
        else None
    if cfg.teacher.mode == "online":  # both models in memory, the teacher's logits per batch
        train_est["parts"]["teacher"] = estimate_teacher(
            _with(cfg, "cache", batch_size=cfg.train.batch_size // cfg.train.grad_accum),
            ts, vocab)["peak_bytes"]
        train_est["peak_bytes"] = sum(train_est["parts"].values())
        train_est["mlx_bytes"] += train_est["parts"]["teacher"]
    def model_entry(path: str, s: ModelShape) -> dict:
        return {"model": path, "model_type": s.model_type, "params": s.params,
                "weight_bytes": s.weight_bytes, "bits": s.bits}

    out = {
        "teacher": model_entry(cfg.teacher.model, ts),
        "student": {**model_entry(None if pruned else cfg.student.model, ss),
                    "mode": cfg.train.mode, "trainable_params": train_est["trainable_params"],
                    "pruned": {"shape": pruned[1], "target_params": cfg.prune.target_params}
                    if pruned else None},
        "vocab_size": vocab,
        "training": train_est,
        "teacher_pass": teacher_est,
        "cache": {"mode": cfg.cache.mode, "bytes_per_token": bpt, "rows": rows,
                  "rows_from": rows_how, "tokens": rows * cfg.data.seq_len if rows else None,
                  "disk_bytes": int(rows * cfg.data.seq_len * (bpt + abpt)) if rows else None,
                  **({"aligned_bytes_per_token": abpt} if xtok else {})},
        "cross_tokenizer": xtok or None,
        "shipped_configs": {w: n for w, n in (("teacher", tnote), ("student", snote)) if n},
        "machine": {"memory_bytes": int(budget), "memory": budget_what,
                    "planned_for": "Mac GPU" if _on_metal(metal) else "CPU"},
    }
    peak_of = {"train": lambda c: training_total(c, ss, bpt, xtok)["peak_bytes"],
               "teacher": lambda c: teacher_total(c, ts, bpt, rows, vocab)["peak_bytes"]}
    for what, est in (("train", train_est), ("teacher", teacher_est)):
        if est is not None:
            est["fits"] = est["peak_bytes"] <= budget
            est["knobs"] = [] if est["fits"] else _fit_knobs(cfg, peak_of[what], budget, what)
    if teacher_est is not None and not teacher_est["fits"] and not ts.bits:
        q4 = model_shape(tconf, f"teacher model {cfg.teacher.model}", quantize=(4, 64),
                         metal=metal)
        if teacher_total(cfg, q4, bpt, rows, vocab)["peak_bytes"] <= budget:
            teacher_est["knobs"].append(
                "a 4-bit teacher (mlx_lm.convert --quantize --q-bits 4, or an mlx-community "
                f"4-bit repo): weights {q4.weight_bytes / GB:.1f} GB")
    if probe:
        add_measured(cfg, teacher_est, train_est, rows, tconf, xtok, sconf if pruned else None)
    return out


def _gb(b: Optional[float]) -> str:
    return "?" if b is None else f"{b / GB:.2f} GB" if b >= GB / 4 else f"{b / (1 << 20):.1f} MB"


def _parts(est: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {_gb(v)}" for k, v in est["parts"].items() if v)


def format_plan(p: dict) -> str:
    t, s, c, m = p["teacher"], p["student"], p["cache"], p["machine"]

    def model_line(d, note=""):
        prec = f"{d['bits']}-bit" if d["bits"] else "full precision"
        return (f"{d['model']} ({d['model_type']}, {d['params'] / 1e6:,.2f} M params, {prec}, "
                f"{_gb(d['weight_bytes'])}{note})")

    pr = s.get("pruned")
    if pr:  # not written yet: named by its shape, in prune's words
        from .prune import _shape_text

        by = "*" if pr["target_params"] is None else f"target_params={pr['target_params']:.0f}"
        s = {**s, "model": f"pruned from {t['model']} by prune.{by}: {_shape_text(pr['shape'])}"}
    lines = [f"teacher:  {model_line(t)}",
             f"student:  {model_line(s, '; run `mlxdistill prune` first' if pr else '')}; "
             f"{s['mode']}: {s['trainable_params'] / 1e6:,.2f} M trainable",
             f"machine:  {_gb(m['memory_bytes'])} ({m['memory']}); planned for a "
             f"{m['planned_for']}"]
    shipped = p.get("shipped_configs", {})
    for why in dict.fromkeys(shipped.values()):
        whom = " and ".join(w for w, n in shipped.items() if n == why)
        lines.insert(-1, f"config:   {whom} config.json shipped with mlxdistill ({why})")
    for name, est in (("teacher pass", p["teacher_pass"]), ("training", p["training"])):
        if est is None:
            continue
        verdict = "fits" if est["fits"] else "does NOT fit"
        line = f"{name + ':':<14}peak {_gb(est['peak_bytes'])} -> {verdict}  [{_parts(est)}]"
        if "measured_peak_bytes" in est:
            line += (f"; MLX arrays estimated {_gb(est['mlx_bytes'])}, measured here "
                     f"{_gb(est['measured_peak_bytes'])}")
        lines.append(line)
        lines += [f"    to fit: {k}" for k in est.get("knobs") or []]
        if not est["fits"] and not est.get("knobs"):
            lines.append("    no single setting makes it fit; use a smaller model or a larger "
                         "machine")
    rows = "?" if c["rows"] is None else f"{c['rows']:,}"
    if p["teacher_pass"] is not None:  # online teachers write no cache
        aligned = (f" + {c['aligned_bytes_per_token']} B/token aligned to the student's "
                   "tokenizer" if p.get("cross_tokenizer") else "")
        lines.append(f"cache:    {c['mode']}, {c['bytes_per_token']:.0f} B/token{aligned} x "
                     f"{rows} rows ({c['rows_from']}) -> {_gb(c['disk_bytes'])} on disk")
    if p.get("cross_tokenizer"):
        lines.append(f"tokens:   the student has another tokenizer than the teacher: "
                     f"cross-tokenizer loss {p['cross_tokenizer']} (loss.xtok), its logits' "
                     f"extra copies counted above")
    tp, tr = p["teacher_pass"] or {}, p["training"]
    if "seconds" in tr or "seconds" in tp:
        lines.append(f"time:     teacher pass {tp.get('seconds', '?')} s "
                     f"({tp.get('tok_per_s', '?')} tok/s), training {tr.get('seconds', '?')} s "
                     f"({tr.get('step_s', '?')} s/step), measured here")
    else:
        lines.append("time:     run with --probe to measure on this machine")
    return "\n".join(lines)
