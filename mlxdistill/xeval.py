"""Tokenizer-free pieces of the evaluation: next-byte distributions, and a student of another
tokenizer scored on its own tokens of the teacher's held-out rows.

Next-byte agreement. Where a teacher and a student predict the next token from the same text
(one tokenizer: every scored position; two: the shared byte boundaries `align.align` pairs),
each model's next-token distribution is summed by the first byte of every token: 257 buckets,
the 256 byte values and one for special and empty tokens. Per position this is the model's
distribution over the next byte of the text, whatever its tokens are. `byte_agree` is the
fraction of those positions where both models' most likely next byte is the same, `byte_kl`
the mean KL(teacher bytes ‖ student bytes); a bucket where either side has probability 0 adds
nothing (the losses' convention).

A SentencePiece tokenizer (prefix_space) spells the first token after a special token with a
dummy space the text lacks, and `align.retokenize` drops it from that token's span: where the
predicted token lost such a space, its distribution is bucketed by the byte after the space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from . import align
from . import data as data_mod

BUCKETS = 257
OTHER = 256  # the bucket of special tokens, empty pieces and logits rows past the tokenizer


def piece_lengths(pieces: Sequence[bytes], size: int) -> np.ndarray:
    """int64 [max(size, len(pieces))]: the UTF-8 bytes of every token id (0 for special
    tokens and logits rows past the tokenizer)."""
    lens = np.zeros(max(size, len(pieces)), dtype=np.int64)
    lens[:len(pieces)] = [len(p) for p in pieces]
    return lens


def first_byte_matrix(pieces: Sequence[bytes], size: int, strip_space: bool = False
                      ) -> np.ndarray:
    """float32 [size, 257] one-hot: row i marks the first byte of token i (OTHER for special
    and empty tokens and rows past the tokenizer). `strip_space` buckets a piece starting with
    a space by its next byte (a dummy-prefix position)."""
    col = np.full(size, OTHER, dtype=np.int64)
    for i, p in enumerate(pieces[:size]):
        if strip_space and p[:1] == b" ":
            p = p[1:]
        if p:
            col[i] = p[0]
    out = np.zeros((size, BUCKETS), dtype=np.float32)
    out[np.arange(size), col] = 1.0
    return out


@dataclass(frozen=True)
class Buckets:
    """A tokenizer's first-byte matrices (mx, [V, 257]); `fresh` only for a tokenizer with a
    dummy prefix."""

    plain: mx.array
    fresh: Optional[mx.array]


def buckets(v: align.Vocab, size: int) -> Buckets:
    fresh = mx.array(first_byte_matrix(v.pieces, size, True)) if v.prefix_space else None
    return Buckets(mx.array(first_byte_matrix(v.pieces, size)), fresh)


def byte_probs(lp: mx.array, idx: np.ndarray, b: Buckets,
               fresh: Optional[np.ndarray] = None) -> mx.array:
    """[P, 257]: the next-byte distributions at flat positions `idx` of log-probs `lp`
    [..., V]; rows where `fresh` is True are bucketed past a dummy-prefix space."""
    if not len(idx):
        return mx.zeros((0, BUCKETS))
    p = mx.exp(lp.reshape(-1, lp.shape[-1])[mx.array(idx.astype(np.int32))])
    out = p @ b.plain
    if b.fresh is not None and fresh is not None and fresh.any():
        out = mx.where(mx.array(fresh)[:, None], p @ b.fresh, out)
    return out


def byte_terms(pt: mx.array, ps: mx.array) -> tuple[mx.array, mx.array]:
    """Summed over the positions of two [P, 257] next-byte distributions: how many argmax
    buckets agree, and KL(pt ‖ ps)."""
    agree = (mx.argmax(pt, -1) == mx.argmax(ps, -1)).sum()
    both = (pt > 0) & (ps > 0)
    # where inside the logs too: log 0 = -inf would make 0 x inf = NaN in the product
    kl = mx.where(both, pt * (mx.log(mx.where(both, pt, 1.0)) -
                              mx.log(mx.where(both, ps, 1.0))), 0.0)
    return agree, kl.sum()


@dataclass(frozen=True)
class CrossRow:
    """One teacher row as the student reads it. `labels[j]` is the next student id (-1 at the
    last position, which predicts past the row); `scored[j]` whether position j is scored.
    `t_pos`/`s_pos`: paired positions (shared boundary, scored on both sides); `t_fresh` /
    `s_fresh`: whether the token predicted there lost a dummy-prefix space."""

    ids: np.ndarray  # int32 [Ls]
    labels: np.ndarray  # int32 [Ls]
    scored: np.ndarray  # bool [Ls]
    t_pos: np.ndarray  # int64 [P]
    s_pos: np.ndarray  # int64 [P]
    t_fresh: np.ndarray  # bool [P]
    s_fresh: np.ndarray  # bool [P]


def _lost_space(spans: np.ndarray, ids: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Whether each token's span is shorter than its piece: its dummy space was dropped."""
    return (spans[:, 1] - spans[:, 0]) < lens[ids]


def cross_rows(packed: data_mod.Packed, t: align.Vocab, s: align.Vocab) -> list[CrossRow]:
    """Every packed teacher row re-tokenized for the student, as training re-tokenizes a
    cached row (align.retokenize with special_map, align.student_mask)."""
    specials = align.special_map(t, s)
    t_labels = data_mod.hard_targets(packed.input_ids, packed.next_ids)
    t_lens, s_lens = piece_lengths(t.pieces, 0), piece_lengths(s.pieces, 0)
    out = []
    for i in range(packed.rows):
        row = packed.input_ids[i]
        r = align.retokenize(row, t, s, specials)
        labels = np.append(r.ids[1:], -1).astype(np.int32)
        scored = align.student_mask(packed.loss_mask[i], r).astype(bool) & (labels >= 0)
        a = align.align(r.t_spans, r.s_spans)
        t_scored = packed.loss_mask[i].astype(bool) & (t_labels[i] >= 0)
        keep = t_scored[a.t_pos] & scored[a.s_pos]
        tp, sp = a.t_pos[keep].astype(np.int64), a.s_pos[keep].astype(np.int64)
        out.append(CrossRow(r.ids, labels, scored, tp, sp,
                            _lost_space(r.t_spans[tp + 1], row[tp + 1], t_lens),
                            _lost_space(r.s_spans[sp + 1], r.ids[sp + 1], s_lens)))
    return out


def pad_rows(rows: Sequence[CrossRow]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, scored) [B, max Ls]: padded with id 0, label -1, not scored."""
    width = max(len(r.ids) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int32)
    labels = np.full((len(rows), width), -1, dtype=np.int32)
    scored = np.zeros((len(rows), width), dtype=bool)
    for j, r in enumerate(rows):
        n = len(r.ids)
        ids[j, :n], labels[j, :n], scored[j, :n] = r.ids, r.labels, r.scored
    return ids, labels, scored


def pair_index(rows: Sequence[CrossRow], t_width: int, s_width: int):
    """Flat positions of the batch's pairs in [B, t_width] and [B, s_width] arrays, and the
    fresh flags: (t_idx, s_idx, t_fresh, s_fresh)."""
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
    t_idx = cat([j * t_width + r.t_pos for j, r in enumerate(rows)])
    s_idx = cat([j * s_width + r.s_pos for j, r in enumerate(rows)])
    return (t_idx, s_idx, cat([r.t_fresh for r in rows]).astype(bool),
            cat([r.s_fresh for r in rows]).astype(bool))
