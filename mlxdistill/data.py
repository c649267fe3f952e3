"""Datasets in mlx_lm's JSONL formats (and plain .txt) -> packed token rows with loss masks.

Formats, detected per line in mlx_lm's order (prompt/completion, then messages, then text):
  {"prompt": ..., "completion": ...}          completion only (with data.mask_prompt)
  {"messages": [{"role", "content"}, ...]}    the last message only (with data.mask_prompt)
  {"text": ...}                               every token is trained on
A `.txt` file is split into documents at blank lines. With a chat template, chat and
prompt/completion records are rendered exactly as mlx_lm.tuner.datasets renders them
(`record_segments`); without one, prompt/completion records are the prompt's tokens then the
completion's, and chat records are an error.

Documents are tokenized, joined with EOS and cut into rows of `seq_len` tokens. Position t of
a row predicts token t+1, so `loss_mask[t]` says whether the *next* token is trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .config import ConfigError
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
    # Where each record's tokens begin in the flattened rows, and how many it kept: what
    # ties a position back to its record (api_cache.py).
    spans: tuple = ()

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
    if os.path.isdir(path):
        raise DataError(f"{what} {path} is a folder, not a JSONL file; for a folder of "
                        f"train.jsonl/valid.jsonl/test.jsonl as mlx_lm takes it, set "
                        f"data.dir={path} instead")
    if not os.path.isfile(path):
        raise DataError(f"{what} {path} not found; check the paths in your config")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not records and line.lstrip().startswith("["):
                # A JSON array parses (one line) or fails (pretty-printed) with a message
                # about the first record; the fix is the file's layout.
                raise DataError(f"{path}:{lineno}: the file holds a JSON array; write one "
                                "JSON object per line (JSON Lines), without the brackets")
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


def chat_template_text(value: Optional[str]) -> Optional[str]:
    """data.chat_template as a Jinja string: the file it names, or the value itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{%" in value or "{{" in value:
        return value
    raise ConfigError(f"data.chat_template={value!r} is neither a file nor a Jinja template; "
                      "give the path of a file holding the template, or the template itself")


def chat_template_sha256(value: Optional[str]) -> Optional[str]:
    """What a cache records of data.chat_template: its text's sha256 (None when unset)."""
    text = chat_template_text(value)
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def has_chat_template(tokenizer) -> bool:
    # mlx_lm's wrapper also counts a template module (chat_template_type) as a template
    return bool(getattr(tokenizer, "has_chat_template", False)) or \
        getattr(tokenizer, "chat_template", None) is not None


NO_TEMPLATE = ("a chat record ('messages') needs a chat template and the tokenizer has none; "
               "set data.chat_template to a Jinja template (or the path of a file holding one)")


def _render(tokenizer, messages: list, tools, **kw) -> list[int]:
    # The call mlx_lm.tuner.datasets makes, so that the ids are the ones mlx_lm.lora trains on.
    try:
        return list(tokenizer.apply_chat_template(messages, tools=tools, return_dict=False,
                                                  **kw))
    except Exception as e:  # jinja raises many kinds (e.g. roles that must alternate)
        why = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"the chat template cannot render this record ({why})") from None


def prompt_ids(tokenizer, messages: list, tools=None) -> list[int]:
    """The tokens after which a model writes the next assistant turn: for a record that ends
    with that turn, exactly the part mlx_lm's mask_prompt leaves untrained."""
    if not has_chat_template(tokenizer):
        raise DataError(NO_TEMPLATE)
    return _render(tokenizer, messages, tools, add_generation_prompt=True)


def record_kind(rec: dict) -> str:
    """"completion", "chat" or "text", in the order mlx_lm's create_dataset tries them."""
    if "prompt" in rec and "completion" in rec:
        return "completion"
    if "messages" in rec:
        return "chat"
    return "completion" if "completion" in rec else "text"


def record_segments(tokenizer, rec: dict, mask_prompt: bool) -> list[tuple[list[int], bool]]:
    """(token ids, trained?) spans of one record.

    With a chat template, chat and prompt/completion records are mlx_lm.tuner.datasets'
    ChatDataset and CompletionsDataset: the template's ids for all messages (a prompt/
    completion record is a user turn then an assistant turn), and with `mask_prompt` the
    tokens before mlx_lm's offset untrained: the rendering of all messages but the last,
    with the generation prompt when the last is the assistant's. So only the last message
    is trained on. Text records, and prompt/completion records without a template, are
    their text encoded without special tokens (the prompt's, then the completion's)."""
    kind = record_kind(rec)
    if kind == "text":
        return [(_encode(tokenizer, rec["text"]), True)]
    if kind == "completion" and not has_chat_template(tokenizer):
        return [(_encode(tokenizer, rec.get("prompt", "")), not mask_prompt),
                (_encode(tokenizer, rec["completion"]), True)]
    if kind == "chat":
        if not has_chat_template(tokenizer):
            raise DataError(NO_TEMPLATE)
        messages = rec["messages"]
        if not (isinstance(messages, list) and messages
                and all(isinstance(m, dict) for m in messages)):
            raise DataError("'messages' must be a non-empty list of {\"role\", \"content\"} "
                            "objects")
        if mask_prompt and len(messages) == 1:
            # mlx_lm would render an empty conversation for the offset and fail
            raise DataError("a chat record with one message has no prompt to mask; give "
                            "the turns before it, or set data.mask_prompt=false")
        generation_prompt = messages[-1].get("role") == "assistant"
    else:
        messages = [{"role": "user", "content": rec.get("prompt", "")},
                    {"role": "assistant", "content": rec["completion"]}]
        generation_prompt = True
    tools = rec.get("tools")
    ids = _render(tokenizer, messages, tools)
    if not mask_prompt:
        return [(ids, True)]
    offset = len(_render(tokenizer, messages[:-1], tools,
                         add_generation_prompt=generation_prompt))
    return [(ids[:offset], False), (ids[offset:], True)]


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
         packing: str = "auto", early_stop: bool = False,
         max_records: int | None = None) -> Packed:
    """Tokenize `path` and pack it into rows of `seq_len` tokens. Records run on into the
    next row, except those `keeps_whole` keeps in one (when they fit in a row at all); with
    long_lines="truncate" a record longer than a row keeps its first `seq_len` tokens
    instead of being split. Either way the count is in the result. `early_stop` stops
    reading once `max_rows` rows and the token after them are packed (a preview of a large
    file): the rows are the same, the record counts only cover what was read.
    `max_records` packs only the file's first records (the evaluation's data.test_records)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    trained: list[bool] = []
    real: list[bool] = []  # False on the padding that ends a row early
    records = long = 0
    spans: list[tuple[int, int]] = []
    for i, rec in enumerate(read_records(path)[:max_records]):
        if early_stop and max_rows is not None and len(ids) > max_rows * seq_len:
            break
        r_ids: list[int] = []
        r_trained: list[bool] = []
        try:
            segs = record_segments(tokenizer, rec, mask_prompt)
        except DataError as e:
            raise DataError(f"{path}: record {i + 1}: {e}") from None
        for seg, t in segs:
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
        spans.append((len(ids), len(r_ids)))
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
                  long, tuple(spans))


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


UNTRAINED = ("[[", "]]")  # plain text: `mlxdistill data` output is often piped


def marked_text(tokenizer, ids, mask) -> str:
    """A packed row as text, with the tokens no loss is computed on (prompts, padding, the
    row's first token) inside [[ ]]. Token t is trained when mask[t - 1] is 1."""
    ids = [int(i) for i in ids]
    trained = [False] + [bool(m) for m in mask[:-1]]
    out, done, start = [], "", 0
    for end in range(1, len(ids) + 1):
        if end < len(ids) and trained[end] == trained[start]:
            continue
        # Decoding the row up to each boundary, not each span alone, keeps the spaces a
        # tokenizer attaches to a word's first piece where they were.
        text = tokenizer.decode(ids[:end])
        piece = text[len(done):] if text.startswith(done) else tokenizer.decode(ids[start:end])
        done = text
        out.append(piece if trained[start] else UNTRAINED[0] + piece + UNTRAINED[1])
        start = end
    return "".join(out)
