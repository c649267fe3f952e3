"""Load teacher and student through mlx_lm and check they can be distilled: vocabularies
that agree, chat templates, context length, and content fingerprints of the weights.
Changing a loaded model for training is surgery.py's job; writing one, saving.py's."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from . import data as data_mod
from . import align, files, remote
from .config import ConfigError
from .errors import Error


class ModelError(Error):
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


def gpu_backend() -> Optional[str]:
    """"metal" or "cuda" when MLX computes on a GPU here, None on the CPU."""
    if mx.metal.is_available():
        return "metal"
    # mx.cuda exists from mlx 0.27 on; it reports True only with mlx[cuda] and an NVIDIA GPU.
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else None


def compute_dtype() -> Optional[mx.Dtype]:
    """float32 on the CPU only: mlx[cpu] has no fast bf16/fp16 matmul. On a GPU (Metal or
    CUDA), where bf16/fp16 are the fast path, keep the model's own (None)."""
    return mx.float32 if gpu_backend() is None else None


def is_model_folder(path: str) -> bool:
    """A local mlx_lm model folder: config.json and at least one *.safetensors file."""
    return os.path.isfile(os.path.join(path, "config.json")) and bool(
        glob.glob(os.path.join(path, "*.safetensors")))


def load(path: str, what: str, adapter_path: Optional[str] = None, lazy: bool = False,
         trust_remote_code: bool = False):
    """(model, tokenizer, config) for a local mlx_lm folder or a hub id (on a Mac). A folder
    whose config asks to run its own Python (`model_file`) is refused unless
    `trust_remote_code` (the config's teacher/student.trust_remote_code) is set."""
    from mlx_lm.utils import load as mlx_load

    if remote.is_url(path):  # every command but generate comes here for its models
        raise ModelError(f"{what}.model={remote.redact(path)} is an HTTP endpoint; only "
                         f"`mlxdistill generate` asks one (its teacher; `cache` and `train` "
                         f"read the log-probabilities it kept); here the {what} must be a "
                         "local mlx_lm model folder or a hub id"
                         + (" (`mlxdistill eval RUN --teacher PATH` compares with a local "
                            "copy)" if what == "teacher" else ""))
    if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") != 1:
        if not os.path.isdir(path):
            raise ModelError(f"{what} model folder {path} not found; set {what}.model to an "
                             "mlx_lm model folder or a hub id")
        if not is_model_folder(path):
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
    """load() of the config's teacher or student with its trust_remote_code setting, its
    tokenizer carrying data.chat_template when that is set."""
    section = getattr(cfg, role)
    model, tok, config = load(section.model, role, trust_remote_code=section.trust_remote_code,
                              **kw)
    return model, use_chat_template(tok, cfg), config


def load_meta_role(cfg, role: str):
    """load_meta() of the config's teacher or student, with data.chat_template applied."""
    config, tok = load_meta(getattr(cfg, role).model, role)
    return config, use_chat_template(tok, cfg)


def use_chat_template(tok, cfg):
    """`tok` rendering chats with data.chat_template (when set) instead of its own: every
    load for a command goes through here, so the teacher pass, generate, training and eval
    render a record alike."""
    template = data_mod.chat_template_text(cfg.data.chat_template)
    if template is None:
        return tok
    tok.chat_template = template  # mlx_lm's wrapper passes this on to the HF tokenizer
    if hasattr(tok, "has_chat_template"):
        tok.has_chat_template = True
    if getattr(tok, "_chat_template", None) is not None:
        # mlx_lm's wrapper renders with a template module (chat_template_type) before the
        # tokenizer's own template; the user's template must win over both.
        tok._chat_template = None
    return tok


def load_meta(path: str, what: str):
    """(config, tokenizer) without the weights: enough for the vocabulary and context checks
    that must pass before any compute."""
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
            "ids or are missing); distil across tokenizers from a cache (teacher.mode: cache; "
            f"loss.xtok: {XTOK_HINT}), or pick a student of the teacher's family (e.g. "
            "Qwen2.5-0.5B for a Qwen2.5 teacher, Llama-3.2-1B for Llama-3.1)")
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
# which cross-tokenizer loss to pick, for the refusals of a pair that shares no vocabulary
XTOK_HINT = ("mapped (the default: KL on the tokens both vocabularies spell alike), hybrid, "
             "uld, or chunk")
_SAMPLE_CHAT = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]


def _template(tok) -> Optional[str]:
    t = getattr(tok, "chat_template", None)
    return json.dumps(t, sort_keys=True) if isinstance(t, dict) else t


def chat_template_note(teacher_tok, student_tok) -> Optional[str]:
    """Why the pair's chat templates disagree, or None. Chat and prompt/completion data are
    rendered once, with the teacher's template, and the student learns from those tokens: a
    student whose own template renders turns differently meets another format at inference.
    (data.chat_template, set on both tokenizers, makes them agree.)"""
    t, s = _template(teacher_tok), _template(student_tok)
    if t == s:
        return None
    head = "teacher and student chat templates differ: "
    tail = ("; chat and prompt/completion data are rendered with the teacher's template for "
            "both, so the student learns the teacher's turn format (data.chat_template sets "
            "one template for both)")
    if t is None:
        return (head + "the student's tokenizer has one, the teacher's none; data is rendered "
                "without a template (chat records need data.chat_template), so the student "
                "learns none of its own turn format")
    if s is None:
        return head + "the teacher's tokenizer has one, the student's none" + tail
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


def check_pair(teacher_tok, teacher_cfg: dict, student_tok, student_cfg: dict,
               seq_len: int) -> VocabMatch:
    """Everything a teacher and a student must agree on before any compute: one vocabulary
    (check_vocab) and a context that holds data.seq_len on both sides."""
    match = check_vocab(teacher_tok, teacher_cfg, student_tok, student_cfg)
    check_seq_len(seq_len, teacher_cfg, "teacher")
    check_seq_len(seq_len, student_cfg, "student")
    return match


def check_alignable(teacher_tok, student_tok) -> None:
    """Refuse, before any compute, a pair of different tokenizers that cannot be aligned
    over bytes (cross-tokenizer distillation needs both tokenizers' tokens as bytes)."""
    try:
        align.vocab(teacher_tok), align.vocab(student_tok)
    except align.AlignError as e:
        ft, fs = vocab_fingerprint(teacher_tok), vocab_fingerprint(student_tok)
        raise ModelError(f"teacher and student tokenizers differ (vocabulary fingerprints: "
                         f"teacher {ft[:12]}, student {fs[:12]}) and cannot be aligned over "
                         f"bytes: {e}; pick a student of the teacher's family") from None


def check_cache_pair(teacher_tok, teacher_cfg: dict, student_tok, student_cfg: dict,
                     seq_len: int) -> VocabMatch:
    """check_pair for a teacher pass: a cache is in the teacher's tokens, so a student of
    another tokenizer is fine as long as both tokenizers can be aligned over bytes
    (align.vocab names the one that cannot); the vocabulary is then the teacher's."""
    if vocab_fingerprint(teacher_tok) == vocab_fingerprint(student_tok):
        return check_pair(teacher_tok, teacher_cfg, student_tok, student_cfg, seq_len)
    check_alignable(teacher_tok, student_tok)
    check_seq_len(seq_len, teacher_cfg, "teacher")
    check_seq_len(seq_len, student_cfg, "student")
    return VocabMatch(vocab_fingerprint(teacher_tok), own_logits_size(teacher_tok, teacher_cfg,
                                                                      "teacher"))


def own_logits_size(tok, config: dict, what: str) -> int:
    """A model's logits columns when it is read with its own tokenizer (a pair of two
    tokenizers shares no vocabulary), refused when fewer than the tokenizer's ids."""
    size, ntok = logits_size(config), len(tok.get_vocab())
    if size < ntok:
        raise ModelError(f"{what} model vocab_size {size} is smaller than its tokenizer's "
                         f"{ntok} tokens")
    return size


def check_student(student_tok, student_cfg: dict, fingerprint: str, vocab: int, seq_len: int,
                  teacher: str, student: str) -> None:
    """check_pair for a teacher known only by what a cache recorded of it: its vocabulary
    fingerprint and size."""
    check_seq_len(seq_len, student_cfg, "student")
    fs = vocab_fingerprint(student_tok)
    if fs != fingerprint:
        raise ConfigError(f"student {student} has another tokenizer than the teacher {teacher} "
                          f"(vocabulary fingerprints: teacher {fingerprint[:12]}, student "
                          f"{fs[:12]}); distil across tokenizers with loss.xtok: {XTOK_HINT}, "
                          "or use a student of the teacher's family")
    if logits_size(student_cfg) < vocab:
        raise ConfigError(f"student vocab_size {logits_size(student_cfg)} is below the "
                          f"teacher's {vocab}")


class Lazy:
    """The config's teacher or student, loaded on first use and kept until released, so the
    stages of one command (cache pass, validation targets, evaluation) share one load."""

    def __init__(self, cfg, role: str):
        self.cfg, self.role, self._loaded = cfg, role, None

    def get(self):
        """(model, tokenizer, config), as load_role returns them."""
        if self._loaded is None:
            self._loaded = load_role(self.cfg, self.role)
        return self._loaded

    def release(self) -> None:
        self._loaded = None


def logits_fn(model, vocab_size: int):
    """The model's logits sliced to the shared vocabulary."""

    def f(x):
        out = model(x)
        return out[..., :vocab_size] if out.shape[-1] != vocab_size else out

    return f
