"""Cross-tokenizer alignment: a teacher row cached in the teacher's tokens, re-tokenized for a
student of another tokenizer over the same bytes, and the two sequences aligned.

Both sides are reduced to bytes (`vocab`): SentencePiece pieces with U+2581 for a space and
`<0xNN>` byte-fallback pieces, or byte-level BPE (GPT-2's printable stand-ins for bytes).
Special tokens (BOS, EOS, chat-template markers) have no bytes: in a row they separate
stretches of text, each encoded by the student on its own, as data.py encodes each record.

The alignment follows ALM (Minixhofer et al. 2025) and TRL's GOLD: a byte offset where a
token starts on both sides is a shared boundary, and there both models predict the next
token from the same text (`t_pos`, `s_pos`); the bytes between consecutive shared
boundaries are a chunk, whose likelihood each side spells with its own tokens (`t_chunk`,
`s_chunk`). `string_map` pairs the ids whose bytes are equal (exact-string mapping).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from .errors import Error

SPACE = "\u2581"  # SentencePiece's visible space
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Pre-tokenizers that drop characters (spaces), so the tokens no longer spell the text.
_DROP_PRE = ("Whitespace", "WhitespaceSplit", "BertPreTokenizer")


class AlignError(Error):
    """A tokenizer whose tokens cannot be mapped to the bytes of the text they encode."""


def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable character standing for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in bs]  # unprintable: 256, 257, ... in order
    return {chr(c): b for b, c in zip(bs + rest, bs + list(range(256, 256 + len(rest))))}


_BYTE_DECODER = _byte_decoder()


@dataclass(frozen=True, eq=False)
class Vocab:
    """A tokenizer seen as bytes. `pieces[id]` is the token's bytes, b"" for a special token
    (`special[id]`) and for an id no text encodes to; `prefix_space`: its encode() puts a space
    before a text that does not start with one (SentencePiece's dummy prefix); `lookup`: the
    id the tokenizer gives a byte string that is one token (an added token before a normal
    piece before a byte-fallback piece, as the tokenizer picks them)."""

    name: str
    pieces: tuple[bytes, ...]
    special: np.ndarray  # bool [V]
    content: dict  # special id -> its text (what the student spells, if it meets it in text)
    roles: dict  # "bos" / "eos" / "pad" / "unk" -> id
    prefix_space: bool
    lookup: dict
    backend: object  # the tokenizers.Tokenizer that encodes


def _flat(x) -> list[dict]:
    """A tokenizer.json component and every component a Sequence of it holds."""
    if not isinstance(x, dict):
        return []
    out = [x]
    for key in ("normalizers", "pretokenizers", "decoders"):
        for y in x.get(key) or []:
            out += _flat(y)
    return out


def _keeps_text(n: dict) -> bool:
    """Whether a normalizer leaves the text as the tokens spell it: NFC (Qwen's) is the
    identity on NFC text; Prepend and Replace of U+2581 are how older SentencePiece files
    (Llama 2, Gemma) write spaces and the dummy prefix."""
    kind = n.get("type")
    if kind == "Prepend":
        return n.get("prepend") == SPACE
    if kind == "Replace":
        return (n.get("pattern") or {}).get("String") == " " and n.get("content") == SPACE
    return kind in ("Sequence", "NFC")


def _prepends(p: dict) -> bool:
    """Whether a pre-tokenizer puts a space before a text (SentencePiece's dummy prefix)."""
    if p.get("type") == "Metaspace":  # older files say add_prefix_space, newer prepend_scheme
        scheme = p.get("prepend_scheme") or ("always" if p.get("add_prefix_space") else "never")
        return scheme in ("first", "always")
    return p.get("type") == "ByteLevel" and bool(p.get("add_prefix_space"))


def _backend_and_name(tokenizer):
    """The tokenizers.Tokenizer under mlx_lm's wrapper / a transformers fast tokenizer, and
    the tokenizer's name for messages."""
    from tokenizers import Tokenizer

    t, name, roles = tokenizer, "", {}
    for _ in range(4):  # wrapper -> transformers -> tokenizers
        name = name or str(getattr(t, "name_or_path", "") or "")
        for role in ("bos", "eos", "pad", "unk"):
            tid = getattr(t, f"{role}_token_id", None)
            if isinstance(tid, int) and role not in roles:
                roles[role] = tid
        if isinstance(t, Tokenizer):
            return t, name or "(unnamed)", roles
        t = getattr(t, "backend_tokenizer", None) or getattr(t, "_tokenizer", None)
    raise AlignError(f"the tokenizer {name or type(tokenizer).__name__} has no tokenizer.json "
                     "(a fast tokenizer), so its tokens' bytes are unknown")


def vocab(tokenizer) -> Vocab:
    """Every token of `tokenizer` (mlx_lm's TokenizerWrapper, a transformers fast tokenizer
    or a tokenizers.Tokenizer) as bytes; an AlignError naming it when they cannot be known.

    The kind is read from tokenizer.json's decoder, the one place that says how a token's
    string becomes text: ByteLevel (GPT-2, Llama 3, Qwen) or a Replace of U+2581 / Metaspace
    (SentencePiece, Llama 2, Gemma, Mistral). gguf.py's detectors decide something stricter
    (whether llama.cpp re-splits text identically) from the encoding side, and are private."""
    backend, name, roles = _backend_and_name(tokenizer)
    tj = json.loads(backend.to_str())
    model = tj.get("model") or {}
    decoders = _flat(tj.get("decoder"))
    kinds = [d.get("type") for d in decoders]
    if model.get("type") not in ("BPE", "Unigram"):
        raise AlignError(f"the tokenizer {name} is a {model.get('type')} model; cross-tokenizer "
                         "distillation needs a BPE or Unigram one (SentencePiece or byte-level)")
    if "ByteLevel" in kinds:
        byte_level = True
    elif "Metaspace" in kinds or any(d.get("type") == "Replace" and
                                     (d.get("pattern") or {}).get("String") == SPACE
                                     for d in decoders):
        byte_level = False
    else:
        raise AlignError(f"the tokenizer {name} has decoder {kinds or None}, neither byte-level "
                         "nor SentencePiece, so its tokens' bytes are unknown")
    norms, pres = _flat(tj.get("normalizer")), _flat(tj.get("pre_tokenizer"))
    for n in norms:
        if not _keeps_text(n):
            raise AlignError(f"the tokenizer {name} has a {n.get('type')} normalizer, which "
                             "changes the text, so its tokens do not spell the text's bytes")
    for p in pres:
        if p.get("type") in _DROP_PRE or (p.get("type"), p.get("behavior")) == ("Split",
                                                                                 "Removed"):
            raise AlignError(f"the tokenizer {name} has a {p.get('type')} pre-tokenizer, which "
                             "drops characters, so its tokens do not spell the text's bytes")
    prefix = any(n.get("type") == "Prepend" for n in norms) or any(map(_prepends, pres))

    base = backend.get_vocab(with_added_tokens=False)
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    size = max([*base.values(), *added, -1]) + 1
    pieces = [b""] * size
    rank = [3] * size  # which of several ids with the same bytes the tokenizer produces
    fallback = model.get("byte_fallback", False)
    keys = set(_BYTE_DECODER)
    for tok, i in base.items():
        if byte_level:
            # a piece with a character outside the byte table is never produced by encoding
            if set(tok) <= keys:
                pieces[i], rank[i] = bytes(_BYTE_DECODER[c] for c in tok), 1
        elif fallback and _BYTE_PIECE.fullmatch(tok):
            pieces[i], rank[i] = bytes([int(tok[3:5], 16)]), 2
        else:
            pieces[i], rank[i] = tok.replace(SPACE, " ").encode("utf-8"), 1
    content = {}
    for i, t in added.items():
        if t.get("special"):
            pieces[i], rank[i], content[i] = b"", 3, t["content"]
        else:  # an added token that is text (Llama's "\n", Qwen's "<think>") is matched first
            pieces[i], rank[i] = t["content"].encode("utf-8"), 0
    special = np.array([not p for p in pieces], dtype=bool)
    lookup: dict[bytes, int] = {}
    for i in sorted(range(size), key=lambda i: (rank[i], i), reverse=True):
        if pieces[i]:
            lookup[pieces[i]] = i  # the best (lowest rank, then lowest id) is written last
    return Vocab(name, tuple(pieces), special, content, roles, prefix, lookup, backend)


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes of every token id; b"" for special tokens (which align to nothing)."""
    return list(vocab(tokenizer).pieces)


def string_map(teacher: Union[Vocab, Sequence[bytes]], student: Union[Vocab, Sequence[bytes]],
               size: Optional[int] = None) -> np.ndarray:
    """int32 [max(Vt, size)]: for each teacher id, the student id with exactly its bytes, or
    -1 (special tokens, ids beyond the teacher's tokenizer: `size` pads to the teacher
    model's rows). Several teacher ids can map to one student id (a byte-fallback `<0x61>`
    and `a`): scatter-add, not gather, when moving probability mass across."""
    t = teacher.pieces if isinstance(teacher, Vocab) else teacher
    if isinstance(student, Vocab):
        lookup = student.lookup
    else:
        lookup = {}
        for i in range(len(student) - 1, -1, -1):  # the lowest id wins
            if student[i]:
                lookup[student[i]] = i
    out = np.full(max(len(t), size or 0), -1, dtype=np.int32)
    out[:len(t)] = [lookup.get(p, -1) if p else -1 for p in t]
    return out


def special_map(teacher: Vocab, student: Vocab) -> dict[int, int]:
    """Teacher special id -> the student's counterpart: the same role (BOS, EOS, pad, unk),
    else the same text. `retokenize` puts these where the teacher's are and drops the rest."""
    out: dict[int, int] = {}
    by_text = {c: i for i, c in student.content.items()}
    for i, c in teacher.content.items():
        if c in by_text:
            out[i] = by_text[c]
    for role, i in teacher.roles.items():
        if role in student.roles and 0 <= i < len(teacher.special) and teacher.special[i]:
            out[i] = student.roles[role]
    return out


@dataclass(frozen=True)
class Retokenized:
    """A teacher row re-tokenized for the student. Spans are (start, end) byte offsets in
    `text`, empty for a special token; `s_origin[j]` is the teacher token holding student
    token j's first byte (for a special put in by `specials`, the teacher's special)."""

    ids: np.ndarray  # int32 [Ls]
    t_spans: np.ndarray  # int32 [Lt, 2]
    s_spans: np.ndarray  # int32 [Ls, 2]
    s_origin: np.ndarray  # int32 [Ls]
    text: bytes


def _runs(b: bytes):
    """(start, end, valid) runs of `b`: valid UTF-8, and the bytes that are not (a character
    cut where the row was cut)."""
    i = 0
    while i < len(b):
        try:
            b[i:].decode("utf-8")
            yield i, len(b), True
            return
        except UnicodeDecodeError as e:
            if e.start:
                yield i, i + e.start, True
            yield i + e.start, i + e.end, False
            i += e.end


def _encode(student: Vocab, seg: bytes, at: int, ids: list, spans: list) -> None:
    """Append the student's tokens of one stretch of text (starting at byte `at`)."""
    for a, b, valid in _runs(seg):
        if not valid:
            # No str holds a cut character, so each stray byte becomes the student's
            # one-byte token (every byte-level and byte-fallback vocabulary has them), or
            # stays uncovered, its chunk unmatched.
            for k in range(a, b):
                i = student.lookup.get(seg[k:k + 1])
                if i is not None:
                    ids.append(i)
                    spans.append((at + k, at + k + 1))
            continue
        run = seg[a:b]
        got = student.backend.encode(run.decode("utf-8"), add_special_tokens=False).ids
        ps = [student.pieces[i] or student.content.get(i, "").encode("utf-8") for i in got]
        spelled = b"".join(ps)
        if spelled != run:
            # the student's dummy prefix: a space before the first token that the text lacks
            if not (student.prefix_space and spelled == b" " + run):
                raise AlignError(f"the tokenizer {student.name} does not spell "
                                 f"{run[:40].decode('utf-8', 'replace')!r} back byte for "
                                 "byte (an unknown token or a normalizer changed it)")
            ps[0] = ps[0][1:]
        pos = at + a
        for i, p in zip(got, ps):
            ids.append(i)
            spans.append((pos, pos + len(p)))
            pos += len(p)


def retokenize(teacher_ids, teacher: Vocab, student: Vocab,
               specials: Optional[Mapping[int, int]] = None) -> Retokenized:
    """The student's tokens of a cached teacher row's text, with both sides' byte spans.

    The text is the teacher tokens' bytes. Where the teacher puts a dummy space before a text
    (prefix_space) the first text token of the row and of each stretch after a special token
    has its leading space dropped from the text, as the teacher's decode() drops it: that is
    what data.py encoded there. Each stretch between special tokens is encoded by the student
    on its own; a teacher special found in `specials` (e.g. `special_map`) becomes that
    student id, others are dropped."""
    t_ids = np.asarray(teacher_ids).reshape(-1).astype(np.int64)
    if t_ids.size and (t_ids.min() < 0 or t_ids.max() >= len(teacher.pieces)):
        raise AlignError(f"a teacher id is outside the tokenizer {teacher.name}'s "
                         f"{len(teacher.pieces)} ids")
    specials = specials or {}
    text = bytearray()
    t_spans = np.zeros((len(t_ids), 2), dtype=np.int32)
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    origin: list[int] = []  # -1: found below from the bytes
    start, fresh = 0, True  # the current stretch's first byte; whether no text came yet
    for k, tid in enumerate(t_ids):
        if not teacher.special[tid]:
            p = teacher.pieces[tid]
            if fresh and teacher.prefix_space and p[:1] == b" ":
                p = p[1:]
            fresh = False
            t_spans[k] = (len(text), len(text) + len(p))
            text += p
            continue
        t_spans[k] = len(text)
        n = len(ids)
        _encode(student, bytes(text[start:]), start, ids, spans)
        origin += [-1] * (len(ids) - n)
        if tid in specials:
            ids.append(int(specials[tid]))
            spans.append((len(text), len(text)))
            origin.append(k)
        start, fresh = len(text), True
    n = len(ids)
    _encode(student, bytes(text[start:]), start, ids, spans)
    origin += [-1] * (len(ids) - n)
    s_spans = np.array(spans, dtype=np.int32).reshape(-1, 2)
    s_origin = np.array(origin, dtype=np.int32)
    todo = np.nonzero(s_origin < 0)[0]
    has = np.nonzero(t_spans[:, 1] > t_spans[:, 0])[0]
    if len(todo) and len(has):  # the teacher token whose bytes hold each one's first byte
        at = np.searchsorted(t_spans[has, 0], s_spans[todo, 0], side="right") - 1
        s_origin[todo] = has[np.clip(at, 0, len(has) - 1)]
    return Retokenized(np.array(ids, dtype=np.int32), t_spans, s_spans, s_origin, bytes(text))


def student_mask(t_mask, r: Retokenized) -> np.ndarray:
    """uint8 [Ls]: the cached `loss_mask` carried to the student's positions. A student
    position is trained when the teacher position predicting the teacher token that holds
    the student's next token's first byte is; the last position predicts past the row."""
    t_mask = np.asarray(t_mask).reshape(-1)
    out = np.zeros(len(r.ids), dtype=np.uint8)
    src = r.s_origin[1:].astype(np.int64) - 1  # the teacher position predicting that token
    ok = src >= 0
    out[:-1][ok] = t_mask[src[ok]] != 0
    return out


@dataclass(frozen=True)
class Alignment:
    """Where a teacher row and its re-tokenization meet.

    `t_pos[i]`, `s_pos[i]`: positions predicting the tokens that start at the i-th shared
    boundary (both models predict from the same text there); `one_to_one[i]`: those two
    tokens have the same bytes (exact-string mapping applies). `t_chunk[p]` / `s_chunk[p]`:
    the chunk (0 .. n_chunks-1) holding the token position p predicts, -1 when that token is
    special, past the row, or in a chunk one side cannot score (summing each side's
    log-probs of its actual next tokens per chunk gives ALM's chunk likelihoods)."""

    t_pos: np.ndarray  # int32 [P]
    s_pos: np.ndarray  # int32 [P]
    one_to_one: np.ndarray  # bool [P]
    t_chunk: np.ndarray  # int32 [Lt]
    s_chunk: np.ndarray  # int32 [Ls]
    n_chunks: int


def _spans(x, side: str) -> tuple[np.ndarray, np.ndarray]:
    """int64 spans [L, 2] and the indices of the non-empty ones, checked in byte order."""
    x = np.asarray(x, dtype=np.int64).reshape(-1, 2)
    has = np.nonzero(x[:, 1] > x[:, 0])[0]
    if np.any(x[:, 1] < x[:, 0]) or np.any(x[has[1:], 0] < x[has[:-1], 1]):
        raise AlignError(f"the {side} spans overlap or are out of byte order")
    return x, has


def align(t_spans, s_spans) -> Alignment:
    """Align two token sequences over the same bytes (spans as `retokenize` gives them)."""
    t, t_has = _spans(t_spans, "teacher")
    s, s_has = _spans(s_spans, "student")
    _, ti, si = np.intersect1d(t[t_has, 0], s[s_has, 0], assume_unique=True,
                               return_indices=True)
    it, js = t_has[ti], s_has[si]
    keep = (it >= 1) & (js >= 1)  # no position predicts a row's first token
    it, js = it[keep], js[keep]
    one = t[it, 1] == s[js, 1]
    # Chunk edges: offsets where a token starts or ends on both sides (the starts, plus the
    # end of text; ends also fence off bytes one side leaves uncovered at a cut character).
    edges = np.intersect1d(np.union1d(t[t_has, 0], t[t_has, 1]),
                           np.union1d(s[s_has, 0], s[s_has, 1]))
    width = np.append(np.diff(edges), 0)  # the last edge starts no chunk

    def chunk_of(x, has):
        c = np.full(len(x), -1, dtype=np.int64)
        c[has] = np.searchsorted(edges, x[has, 0], side="right") - 1
        return c

    tc, sc = chunk_of(t, t_has), chunk_of(s, s_has)
    n = len(edges)

    def covered(x, c, has):
        inside = has[c[has] >= 0]
        return np.bincount(c[inside], weights=x[inside, 1] - x[inside, 0], minlength=n)

    good = (width > 0) & (covered(t, tc, t_has) == width) & (covered(s, sc, s_has) == width)
    # a chunk holding a row's first token lacks that token's log-prob on that side
    for c in (tc, sc):
        if len(c) and c[0] >= 0:
            good[c[0]] = False
    new_id = np.append(np.where(good, np.cumsum(good) - 1, -1), -1)  # [-1]: no chunks

    def per_position(c):
        out = np.full(len(c), -1, dtype=np.int32)
        nxt = c[1:]
        out[:-1] = np.where(nxt >= 0, new_id[np.maximum(nxt, 0)], -1)
        return out

    return Alignment(it.astype(np.int32) - 1, js.astype(np.int32) - 1, one,
                     per_position(tc), per_position(sc), int(good.sum()))
