"""A float16 GGUF file of a Llama-family student (llama, mistral, mixtral) that llama.cpp
loads and tokenizes as training did.

llama.cpp's "llama" (SentencePiece) tokenizer splits text into characters and merges the
adjacent pair whose result has the highest score, so the scores must order the merges as
the tokenizer does: SentencePiece's own scores from tokenizer.model, or, for a tokenizer.json
BPE alone, minus the rank of the first merge that builds each token. A byte-level BPE
(Llama 3, GPT-2 style) goes to llama.cpp's BPE tokenizer with its merges, when its
pre-tokenizer is one llama.cpp reproduces. The file also says whether to add BOS/EOS
(training adds neither: data.py encodes without special tokens) and whether a space is
prefixed. Token types are INT32 as llama.cpp requires.

Weights are written in llama.cpp's layout: Q and K rows permuted from the Hugging Face
rotate-half RoPE order to llama.cpp's interleaved one (K over its own, possibly fewer,
key-value heads), norms in float32, a Mixtral's stacked experts as `ffn_*_exps`.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ConfigError

ARCHS = ("llama", "mistral", "mixtral")
NAME = "ggml-model-f16.gguf"
# llama.cpp's token types: the numbers SentencePiece uses for its piece types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space
ROPE_SCALINGS = (None, "default", "linear", "llama3")
# Training encodes without special tokens (data.py, generate.py): no BOS, no EOS.
ADD_BOS, ADD_EOS = False, False
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Llama 3's pre-tokenizer regex as tokenizer.json spells it (llama.cpp's "llama-bpe")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_NAMES = [  # mlx_lm parameter name -> GGUF tensor name
    ("model.embed_tokens.", "token_embd."), ("model.norm.", "output_norm."),
    ("lm_head.", "output."), ("model.layers.", "blk."),
    ("self_attn.q_proj.", "attn_q."), ("self_attn.k_proj.", "attn_k."),
    ("self_attn.v_proj.", "attn_v."), ("self_attn.o_proj.", "attn_output."),
    ("input_layernorm.", "attn_norm."), ("post_attention_layernorm.", "ffn_norm."),
    ("block_sparse_moe.gate.", "ffn_gate_inp."),  # the experts before mlp.*: a substring
    ("block_sparse_moe.switch_mlp.gate_proj.", "ffn_gate_exps."),
    ("block_sparse_moe.switch_mlp.up_proj.", "ffn_up_exps."),
    ("block_sparse_moe.switch_mlp.down_proj.", "ffn_down_exps."),
    ("mlp.gate_proj.", "ffn_gate."), ("mlp.up_proj.", "ffn_up."), ("mlp.down_proj.", "ffn_down."),
]


def _rope_type(config: dict) -> Optional[str]:
    rs = config.get("rope_scaling") or {}
    return rs.get("rope_type", rs.get("type"))


def _tokenizer_json(folder: str) -> Optional[dict]:
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--gguf: cannot read {path} ({e})") from None


def _sp_model(folder: str):
    path = os.path.join(folder, "tokenizer.model")
    if not os.path.isfile(path):
        return None
    # sentencepiece's protobuf module: only for tokenizers that ship a tokenizer.model
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    try:
        with open(path, "rb") as f:
            m.ParseFromString(f.read())
    except Exception as e:  # protobuf's DecodeError and friends
        raise ConfigError(f"--gguf: {path} is not a SentencePiece model ({e})") from None
    return m


def _sp_matches(sp, tj: Optional[dict]) -> bool:
    """Whether tokenizer.model gives every token the id tokenizer.json (what training
    encoded with) gives it; otherwise tokenizer.json is the one to describe."""
    if sp is None or sp.trainer_spec.model_type != 2:  # 2: BPE; unigram merges differently
        return False
    vocab = (tj or {}).get("model", {}).get("vocab")
    if not isinstance(vocab, dict):
        return tj is None
    return all(vocab.get(p.piece) == i for i, p in enumerate(sp.pieces))


def _spm_style(tj: dict) -> bool:
    """A tokenizer.json BPE over SentencePiece pieces (spaces as U+2581, byte fallback), which
    llama.cpp's SentencePiece tokenizer reproduces; byte-level BPE (GPT-2 style) it does not."""
    m = tj.get("model") or {}
    around = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")], ensure_ascii=False)
    return m.get("type") == "BPE" and SPACE in around and "ByteLevel" not in around


def _space_prefix(tj: dict) -> bool:
    around = [tj.get("normalizer"), tj.get("pre_tokenizer")]
    stack = [x for x in around if x]
    while stack:
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, dict):
            if x.get("type") == "Metaspace" and (
                    x.get("prepend_scheme") in ("first", "always") or x.get("add_prefix_space")):
                return True
            if x.get("type") == "Prepend" and x.get("prepend") == SPACE:
                return True
            stack.extend(v for v in x.values() if isinstance(v, (list, dict)))
    return False


def _byte_level_pre(tj: dict) -> Optional[str]:
    """llama.cpp's pre-tokenizer name for a byte-level BPE whose text splitting it
    reproduces exactly: Llama 3's regex ("llama-bpe") or GPT-2's ("gpt-2"); else None."""
    m, pre = tj.get("model") or {}, tj.get("pre_tokenizer") or {}
    if m.get("type") != "BPE" or m.get("byte_fallback") or tj.get("normalizer"):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) \
            and not pre.get("add_prefix_space") and not m.get("ignore_merges"):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(parts) == 2 and m.get("ignore_merges") \
            and parts[0].get("type") == "Split" and parts[0].get("behavior") == "Isolated" \
            and (parts[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT \
            and not parts[0].get("invert") and parts[1].get("type") == "ByteLevel" \
            and not parts[1].get("use_regex", True) and not parts[1].get("add_prefix_space"):
        return "llama-bpe"
    return None


def tokenizer_kind(folder: str) -> str:
    """Where the GGUF vocabulary comes from: "tokenizer.model", "tokenizer.json" (a
    SentencePiece-style BPE) or "tokenizer.json byte-level"; a ConfigError when llama.cpp
    would not split text as the tokenizer does."""
    tj = _tokenizer_json(folder)
    if _sp_matches(_sp_model(folder), tj):
        return "tokenizer.model"
    if tj is not None and _spm_style(tj):
        return "tokenizer.json"
    if tj is not None and _byte_level_pre(tj):
        return "tokenizer.json byte-level"
    kind = (tj or {}).get("model", {}).get("type", "no tokenizer.json")
    raise ConfigError(f"--gguf: the student's tokenizer in {folder} ({kind}) is neither a "
                      "SentencePiece BPE nor a byte-level BPE with Llama 3's or GPT-2's "
                      "pre-tokenizer, so llama.cpp would not split text as in training; export "
                      "without --gguf")


def check(config: dict, bits: int, tok_folder: str) -> None:
    """Everything --gguf needs, before any compute."""
    arch = config.get("model_type")
    if arch not in ARCHS:
        raise ConfigError(f"--gguf writes model_type {', '.join(ARCHS)}, not {arch!r}; "
                          "export without --gguf")
    if bits != 16:
        raise ConfigError(f"--gguf writes float16 only; use --bits 16, not {bits}, or drop --gguf")
    if _rope_type(config) not in ROPE_SCALINGS:
        raise ConfigError(f"--gguf: rope_scaling type {_rope_type(config)!r} in config.json is "
                          f"not written to GGUF (only {', '.join(map(str, ROPE_SCALINGS[1:]))}); "
                          "export without --gguf")
    tokenizer_kind(tok_folder)


def vocab_metadata(folder: str, tokenizer, n_vocab: int) -> dict:
    """The tokenizer.ggml.* keys for the tokenizer files in `folder`, padded with unused
    tokens to the embedding's `n_vocab` rows (llama.cpp requires one token per row)."""
    kind = tokenizer_kind(folder)
    tj = _tokenizer_json(folder)
    added = {t["id"]: t for t in (tj or {}).get("added_tokens", [])}
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default"}
    if kind == "tokenizer.model":
        sp = _sp_model(folder)
        tokens = [p.piece for p in sp.pieces]
        scores = [float(p.score) for p in sp.pieces]
        types = [int(p.type) for p in sp.pieces]
        prefix = bool(sp.normalizer_spec.add_dummy_prefix)
        always = False
    else:
        m = tj["model"]
        inv = {i: t for t, i in m["vocab"].items()}
        tokens = [inv.get(i, f"[PAD{i}]") for i in range(max(inv) + 1)]
        merges = [tuple(mg.split(" ", 1)) if isinstance(mg, str) else tuple(mg)
                  for mg in m.get("merges", [])]
        types = [UNUSED if i not in inv else BYTE if kind == "tokenizer.json" and
                 _BYTE_PIECE.fullmatch(t) else UNKNOWN if t == m.get("unk_token") else NORMAL
                 for i, t in enumerate(tokens)]
        for i, t in added.items():
            if i < len(types) and types[i] != UNKNOWN:
                types[i] = CONTROL if t.get("special") else USER_DEFINED
        rank: dict[str, int] = {}
        for r, (a, b) in enumerate(merges):
            rank.setdefault(a + b, r)
        # A token no merge builds is never produced by the BPE: score it below every merge.
        last = -float(len(rank) + 1)
        scores = [0.0 if ty != NORMAL or len(t) == 1 else -float(rank.get(t, -last))
                  for t, ty in zip(tokens, types)]
        prefix = _space_prefix(tj)
        always = '"always"' in json.dumps(tj.get("pre_tokenizer"))
        if kind != "tokenizer.json":  # byte-level: llama.cpp's BPE applies the merges
            meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _byte_level_pre(tj),
                    "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges]}
    for i, t in added.items():  # added tokens beyond the base vocabulary
        while len(tokens) <= i:
            tokens.append(f"[PAD{len(tokens)}]"), scores.append(0.0), types.append(UNUSED)
        if types[i] == UNUSED:
            tokens[i], scores[i] = t["content"], 0.0
            types[i] = CONTROL if t.get("special") else USER_DEFINED
    if meta["tokenizer.ggml.model"] == "llama":
        _user_defined_chars(tokens, types, prefix and not always)
    if len(tokens) > n_vocab:
        raise ConfigError(f"--gguf: the tokenizer in {folder} has {len(tokens)} tokens but the "
                          f"model's embedding only {n_vocab} rows")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]"), scores.append(0.0), types.append(UNUSED)
    meta.update({"tokenizer.ggml.tokens": tokens,
                 "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
                 "tokenizer.ggml.add_bos_token": mx.array(ADD_BOS),
                 "tokenizer.ggml.add_eos_token": mx.array(ADD_EOS)})
    if meta["tokenizer.ggml.model"] == "llama":
        meta["tokenizer.ggml.scores"] = mx.array(scores, dtype=mx.float32)
        meta["tokenizer.ggml.add_space_prefix"] = mx.array(prefix)
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unknown", "unk_token_id"), ("padding", "pad_token_id")):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            meta[f"tokenizer.ggml.{key}_token_id"] = mx.array(tid, dtype=mx.uint32)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        meta["tokenizer.chat_template"] = template
    return meta


def _user_defined_chars(tokens: list, types: list, prefix_once: bool) -> None:
    """llama.cpp splits user-defined tokens out of the text and prefixes a space to the text
    after each, where SentencePiece (and a tokenizer.json whose Metaspace prefixes only the
    first piece) prefixes once: a newline token would make every line start with a space.
    A one-character user-defined token that no other token contains is split out by the
    merges anyway, so as a normal token it tokenizes exactly as in training."""
    if not prefix_once:
        return
    for i, t in enumerate(tokens):
        if types[i] == USER_DEFINED and len(t) == 1 and not any(
                t in o for j, o in enumerate(tokens) if j != i and types[j] != UNUSED):
            types[i] = NORMAL


def _permute(w: mx.array, n_head: int) -> mx.array:
    """Hugging Face's rotate-half rows of each head -> llama.cpp's interleaved pairs."""
    s = w.shape
    return w.reshape(n_head, 2, s[0] // n_head // 2, *s[1:]).swapaxes(1, 2).reshape(s)


def tensor_name(name: str) -> Optional[str]:
    """The GGUF name of an mlx_lm parameter of a Llama-family model; None if it has none."""
    out = name
    for a, b in _NAMES:
        out = out.replace(a, b)
    return out if not re.search(r"(^model\.)|(\.(self_attn|mlp|block_sparse_moe)\.)", out) \
        and out != name else None


def hparams(config: dict) -> dict:
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    u32 = lambda v: mx.array(int(v), dtype=mx.uint32)  # noqa: E731
    name = str(config.get("_name_or_path") or "student").rstrip("/").split("/")[-1]
    meta = {"general.architecture": "llama", "general.file_type": u32(1),  # 1: mostly F16
            "general.quantization_version": u32(2), "general.name": name,
            "llama.context_length": u32(config.get("max_position_embeddings") or 2048),
            "llama.embedding_length": u32(config["hidden_size"]),
            "llama.block_count": u32(config["num_hidden_layers"]),
            "llama.feed_forward_length": u32(config["intermediate_size"]),
            "llama.attention.head_count": u32(n_head),
            "llama.attention.head_count_kv": u32(config.get("num_key_value_heads") or n_head),
            "llama.attention.key_length": u32(head_dim),
            "llama.attention.value_length": u32(head_dim),
            "llama.rope.dimension_count": u32(head_dim),
            "llama.attention.layer_norm_rms_epsilon": mx.array(
                float(config.get("rms_norm_eps", 1e-5)), dtype=mx.float32),
            "llama.rope.freq_base": mx.array(float(config.get("rope_theta", 10000.0)),
                                             dtype=mx.float32),
            "llama.vocab_size": u32(config["vocab_size"])}
    if config.get("num_local_experts"):
        meta["llama.expert_count"] = u32(config["num_local_experts"])
        meta["llama.expert_used_count"] = u32(config["num_experts_per_tok"])
    if _rope_type(config) == "linear":
        meta["llama.rope.scaling.type"] = "linear"
        meta["llama.rope.scaling.factor"] = mx.array(float(config["rope_scaling"]["factor"]),
                                                     dtype=mx.float32)
    return meta


def _llama3_rope_factors(config: dict) -> mx.array:
    """Llama 3's frequency-dependent RoPE scaling, as the rope_freqs tensor llama.cpp reads
    (the same formula as mlx_lm's Llama3RoPE and llama.cpp's converter)."""
    rs = config["rope_scaling"]
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    base = float(config.get("rope_theta", 10000.0))
    factor = rs.get("factor", 8.0)
    low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old = rs.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return mx.array(out, dtype=mx.float32)


def tensors(weights: dict, config: dict) -> dict:
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    permute = not config.get("rope_traditional", False)  # traditional RoPE is interleaved
    out = {}
    for k, v in weights.items():
        name = tensor_name(k)
        if name is None:
            raise ConfigError(f"--gguf: parameter {k} has no GGUF name; export without --gguf")
        if permute and ".attn_q." in name:
            v = _permute(v, n_head)
        elif permute and ".attn_k." in name:
            v = _permute(v, n_kv)
        if "norm" in name or v.ndim == 1:
            v = v.astype(mx.float32)
        elif v.dtype != mx.float16:
            v = v.astype(mx.float32).astype(mx.float16)
        out[name] = v
    if _rope_type(config) == "llama3":
        out["rope_freqs.weight"] = _llama3_rope_factors(config)
    return out


def write(model, config: dict, tokenizer, folder: str) -> dict:
    """Write `folder`/NAME from `model` and the tokenizer files in `folder`; check that
    every weight is in it under its GGUF name."""
    weights = dict(tree_flatten(model.parameters()))
    emb = weights["model.embed_tokens.weight"]
    meta = {**hparams(config), **vocab_metadata(folder, tokenizer, emb.shape[0])}
    path = os.path.join(folder, NAME)
    mx.save_gguf(path, tensors(weights, config), meta)
    loaded = mx.load(path)
    missing = sorted({tensor_name(k) for k in weights} - set(loaded))
    if missing:
        raise ConfigError(f"GGUF file {path} lacks {missing[:3]}; export without --gguf")
    return {"file": NAME, "tensors": len(loaded), "bytes": os.path.getsize(path),
            "architecture": "llama", "tokenizer_from": tokenizer_kind(folder),
            "add_bos_token": ADD_BOS, "add_eos_token": ADD_EOS,
            "tokenizer_model": meta["tokenizer.ggml.model"],
            "tokenizer_pre": meta["tokenizer.ggml.pre"],
            "embedding_identical": bool(mx.array_equal(
                loaded["token_embd.weight"].astype(mx.float32), emb.astype(mx.float32)))}
