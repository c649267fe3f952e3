"""Datasets in mlx_lm's JSONL formats (and plain .txt) -> packed token rows with loss masks.

Formats, detected per line as mlx_lm does:
  {"text": ...}                               every token is trained on
  {"prompt": ..., "completion": ...}          completion only (with data.mask_prompt)
  {"messages": [{"role", "content"}, ...]}    assistant turns only (with data.mask_prompt)
A `.txt` file is split into documents at blank lines.

Documents are tokenized, joined with EOS and cut into rows of `seq_len` tokens. Position t of
a row predicts token t+1, so `loss_mask[t]` says whether the *next* token is trained on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import Error


class DataError(Error):
    """A user error in a dataset file; the message is one line."""


@dataclass(frozen=True)
class Packed:
    input_ids: np.ndarray  # int32 [rows, L]
    loss_mask: np.ndarray  # uint8 [rows, L]
    # The token after each row's last position (-1 at the end of the stream): lets hard-label
    # CE train the last position without storing L+1 tokens per row.
    next_ids: np.ndarray  # int32 [rows]
    records: int = 0
    long_records: int = 0  # records longer than seq_len: split across rows or truncated

    def long_report(self, seq_len: int, how: str, path: str) -> Optional[str]:
        """The line every pass over a dataset prints when records did not fit a row."""
        if not self.long_records:
            return None
        verb = "split across rows" if how == "split" else f"truncated to {seq_len} tokens"
        return (f"{path}: {self.long_records} of {self.records} records are longer than "
                f"data.seq_len={seq_len} tokens and were {verb} (data.long_lines={how})")

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


def read_jsonl(path: str, valid, expected: str, what: str = "dataset") -> list[dict]:
    """JSON objects, one per non-blank line; `valid(rec)` must hold for each. Errors name the
    file and line number."""
    if not os.path.isfile(path):
        raise DataError(f"{what} {path} not found; check the paths in your config")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must "
                                "be one JSON object") from None
            if not isinstance(rec, dict) or not valid(rec):
                raise DataError(f"{path}:{lineno}: expected {expected}")
            records.append(rec)
    if not records:
        raise DataError(f"{what} {path} is empty; it needs at least one record")
    return records


def read_records(path: str) -> list[dict]:
    if path.endswith(".txt") and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            docs = [d.strip() for d in f.read().split("\n\n")]
        if not any(docs):
            raise DataError(f"dataset {path} is empty; it needs at least one record")
        return [{"text": d} for d in docs if d]
    return read_jsonl(path, lambda r: "text" in r or "messages" in r or "completion" in r,
                      "a 'text', 'prompt'/'completion' or 'messages' record")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _chat_segments(tokenizer, messages: list[dict]) -> list[tuple[list[int], bool]]:
    """(token ids, trained?) per message; assistant turns are trained."""
    segs = []
    has_template = getattr(tokenizer, "chat_template", None) is not None
    prev: list[int] = []
    for i in range(len(messages)):
        if has_template:
            full = list(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True))
            # Templates render a prefix of the conversation as a prefix of the tokens, so the
            # message's own tokens are the difference.
            ids = full[len(prev):] if full[: len(prev)] == prev else full
            prev = full
        else:
            m = messages[i]
            ids = _encode(tokenizer, f"{m.get('role', 'user')}: {m.get('content', '')}\n")
        segs.append((ids, messages[i].get("role") == "assistant"))
    return segs


def record_segments(tokenizer, rec: dict, mask_prompt: bool) -> list[tuple[list[int], bool]]:
    if "messages" in rec:
        segs = _chat_segments(tokenizer, rec["messages"])
    elif "completion" in rec:
        segs = [(_encode(tokenizer, rec.get("prompt", "")), False),
                (_encode(tokenizer, rec["completion"]), True)]
    else:
        segs = [(_encode(tokenizer, rec["text"]), True)]
    if not mask_prompt:
        segs = [(ids, True) for ids, _ in segs]
    return segs


def keeps_whole(rec: dict, packing: str) -> bool:
    """Whether `rec` must start a fresh row when it does not fit what is left of one. Rows
    do not see each other, so a completion whose prompt ended up in the row before would be
    trained on with no prompt at all: under "auto" prompt/completion and chat records are
    kept whole (the rest of the row is padding, not trained on); plain text runs on."""
    return packing == "whole" or (packing == "auto" and "text" not in rec)


def row_padding(filled: int, n: int, seq_len: int, whole: bool) -> int:
    """Padding tokens that go before a record of `n` tokens when `filled` tokens are packed:
    what is left of the row, if the record is kept whole, fits a row, but not that rest."""
    room = -filled % seq_len
    return room if whole and n <= seq_len and 0 < room < n else 0


def pack(path: str, tokenizer, seq_len: int, mask_prompt: bool = True,
         max_rows: int | None = None, long_lines: str = "split",
         packing: str = "auto") -> Packed:
    """Tokenize `path` and pack it into rows of `seq_len` tokens. Records run on into the
    next row, except those `keeps_whole` keeps in one (when they fit in a row at all); with
    long_lines="truncate" a record longer than a row keeps its first `seq_len` tokens
    instead of being split. Either way the count is in the result."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    trained: list[bool] = []
    real: list[bool] = []  # False on the padding that ends a row early
    records = long = 0
    for rec in read_records(path):
        r_ids: list[int] = []
        r_trained: list[bool] = []
        for seg, t in record_segments(tokenizer, rec, mask_prompt):
            r_ids.extend(seg)
            r_trained.extend([t] * len(seg))
        if eos is not None:
            r_ids.append(eos)
            r_trained.append(True)  # learning where a document ends is part of the task
        records += 1
        if len(r_ids) > seq_len:
            long += 1
            if long_lines == "truncate":
                r_ids, r_trained = r_ids[:seq_len], r_trained[:seq_len]
        room = row_padding(len(ids), len(r_ids), seq_len, keeps_whole(rec, packing))
        if room:
            ids.extend([eos if eos is not None else 0] * room)
            trained.extend([False] * room)
            real.extend([False] * room)
        ids.extend(r_ids)
        trained.extend(r_trained)
        real.extend([True] * len(r_ids))
    if len(ids) < 2:
        raise DataError(f"dataset {path} has fewer than 2 tokens; nothing to train on")
    stream = np.asarray(ids, dtype=np.int32)
    tmask = np.asarray(trained, dtype=np.uint8)
    rows = -(-len(stream) // seq_len)
    if max_rows is not None:
        rows = min(rows, max_rows)
    total = rows * seq_len
    inp = np.zeros(total, dtype=np.int32)
    n = min(total, len(stream))
    inp[:n] = stream[:n]
    # mask[t] = next token exists and is trained on
    mask = np.zeros(total, dtype=np.uint8)
    m = min(total, len(stream) - 1)
    mask[:m] = tmask[1:m + 1] & np.asarray(real[:m], dtype=np.uint8)
    next_ids = np.full(rows, -1, dtype=np.int32)
    ends = np.arange(1, rows + 1) * seq_len
    ok = ends < len(stream)
    next_ids[ok] = stream[ends[ok]]
    return Packed(inp.reshape(rows, seq_len), mask.reshape(rows, seq_len), next_ids, records,
                  long)


@dataclass
class Batch:
    input_ids: np.ndarray
    loss_mask: np.ndarray
    next_ids: np.ndarray
    targets: dict  # cached teacher targets (ids + counts | ids + logprobs); {} when online


class PackedRows:
    """Batches straight from packed rows (online teacher): the same contract as the cache
    reader's `batches`, an endless stream whose order is a function of (seed, step)."""

    def __init__(self, packed: Packed):
        self.packed = packed
        self.rows = packed.rows

    def batches(self, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                size: int = 1):
        per_epoch = self.rows // batch_size
        if per_epoch == 0:
            raise DataError(f"the training data packs into {self.rows} rows, fewer than "
                            f"train.batch_size={batch_size}; lower the batch size or add data")
        epoch, b = divmod(start_step, per_epoch)
        p = self.packed
        while True:
            perm = np.random.default_rng([seed, epoch]).permutation(self.rows)
            for i in range(b, per_epoch):
                share = batch_size // size
                lo = i * batch_size + rank * share
                idx = np.sort(perm[lo:lo + share])
                yield Batch(p.input_ids[idx], p.loss_mask[idx], p.next_ids[idx], {})
            epoch, b = epoch + 1, 0


def hard_targets(input_ids: np.ndarray, next_ids: np.ndarray) -> np.ndarray:
    """Next-token labels for each position (-1 where the stream ends)."""
    return np.concatenate([input_ids[:, 1:], next_ids[:, None]], axis=1)
