"""What one cache shard must hold, and the checks that refuse one that does not: its
safetensors header against its own bytes and the manifest (before anything is allocated),
and its values (ids in range, finite probabilities, draw counts, next-token log-probs) for
`inspect`."""

from __future__ import annotations

import json
import os

import numpy as np

from . import files
from .errors import Error


class CacheError(Error):
    """A cache that is missing, corrupt or built from something else; one-line message."""


def id_dtype(vocab_size: int):
    # Bytes per token matter: uint16 ids halve a top-k or sampled cache for vocabularies
    # up to 65536 tokens.
    return np.uint16 if vocab_size <= 65536 else np.int32


def expected_tensors(m: dict, rows: int) -> dict[str, tuple[tuple, str]]:
    """Every tensor a shard of `rows` rows must hold: name -> (shape, numpy dtype name)."""
    L, width = m["seq_len"], m.get("n") if m["mode"] == "sample" else m.get("k")
    want = {"input_ids": ((rows, L), "int32"), "loss_mask": ((rows, L), "uint8"),
            "next_ids": ((rows,), "int32"),
            "ids": ((rows, L, width), np.dtype(id_dtype(m["vocab_size"])).name)}
    want.update({"counts": ((rows, L, width), "uint8")} if m["mode"] == "sample"
                else {"logprobs": ((rows, L, width), "float16"),
                      "tail_logprob": ((rows, L), "float32")})
    if m.get("next_logprob"):  # absent from the manifest of a cache built without it
        want["next_logprob"] = ((rows, L), "float32")
    for layer in m.get("hidden_resolved") or []:
        want[f"hidden.{layer}"] = ((rows, L, m["hidden_size"]), "float16")
    return want


def estimate_bytes(m: dict, rows: int) -> int:
    """Bytes on disk of `rows` cached rows (headers aside): what `cache` checks against the
    free space before it starts."""
    return sum(int(np.prod(shape)) * np.dtype(dt).itemsize
               for shape, dt in expected_tensors(m, rows).values())


def check_free_space(cache_dir: str, m: dict, rows: int) -> None:
    need = estimate_bytes(m, rows) + (64 << 20)  # margin: headers, manifest, other writers
    free = files.free_bytes(cache_dir)
    if need > free:
        raise CacheError(f"cache {cache_dir} needs about {files.human(need)} for {rows} rows "
                         f"but only {files.human(free)} is free there; free space, lower "
                         "data.max_rows or point cache.dir at a bigger disk")


_ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F16": 2, "BF16": 2, "U16": 2, "I16": 2, "F32": 4,
              "U32": 4, "I32": 4, "F64": 8, "I64": 8, "U64": 8}
_NP_TO_ST = {"int32": "I32", "uint8": "U8", "uint16": "U16", "float16": "F16",
             "float32": "F32"}


def check_header(path: str, name: str, want: dict) -> None:
    """Refuse a shard whose safetensors header disagrees with its own bytes or with the
    manifest, before any tensor is allocated: a lying header must not make the reader
    allocate gigabytes or read past the end of the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, 100 << 20):
            raise CacheError(f"shard {name}: header length {n} does not fit its {size} bytes "
                             "(truncated or corrupt); delete it and rerun `mlxdistill cache`")
        try:
            header = json.loads(f.read(n))
            spans = sorted((int(t["data_offsets"][0]), int(t["data_offsets"][1]), k)
                           for k, t in header.items() if k != "__metadata__")
            nbytes = {k: int(np.prod(t["shape"], dtype=np.int64)) * _ST_DTYPES[t["dtype"]]
                      for k, t in header.items() if k != "__metadata__"}
        except (ValueError, KeyError, TypeError, IndexError):
            raise CacheError(f"shard {name}: unreadable safetensors header; delete it and "
                             "rerun `mlxdistill cache`") from None
    pos = 0
    for lo, hi, key in spans:
        if lo != pos or hi - lo != nbytes[key]:
            raise CacheError(f"shard {name}: tensor {key} declares {nbytes[key]} bytes at "
                             f"[{lo}, {hi}) which its data does not match; refusing it")
        pos = hi
    if pos != size - 8 - n:
        raise CacheError(f"shard {name}: tensors declare {pos} bytes but the file holds "
                         f"{size - 8 - n} (truncated or padded); delete it and rerun "
                         "`mlxdistill cache`")
    for key, (shape, dtype) in want.items():
        t = header.get(key)
        if t is None:
            raise CacheError(f"shard {name} lacks tensor {key!r}")
        if list(t["shape"]) != list(shape) or t["dtype"] != _NP_TO_ST[dtype]:
            raise CacheError(f"shard {name}: {key} is declared {t['dtype']}{t['shape']}, "
                             f"expected {_NP_TO_ST[dtype]}{list(shape)} from the manifest")


def check_contents(t: dict, m: dict, rows: int, name: str) -> None:
    """Shapes, dtypes and values of one shard against its manifest: what sha256 cannot say
    when the producer itself was wrong."""
    V = m["vocab_size"]
    for key, (shape, dtype) in expected_tensors(m, rows).items():
        if key not in t:
            raise CacheError(f"shard {name} lacks tensor {key!r}")
        if t[key].shape != shape or str(t[key].dtype) != dtype:
            raise CacheError(f"shard {name}: {key} is {t[key].dtype}{list(t[key].shape)}, "
                             f"expected {dtype}{list(shape)}")
    if t["ids"].max(initial=0) >= V or t["input_ids"].min(initial=0) < 0 or \
            t["input_ids"].max(initial=0) >= V:
        raise CacheError(f"shard {name} holds token ids outside the vocabulary of {V}")
    if m["mode"] == "sample":
        drawn = t["counts"].astype(np.int64)[..., 1:] if m.get("keep_top1") else \
            t["counts"].astype(np.int64)
        want_n = m["n"] - 1 if m.get("keep_top1") else m["n"]
        if (drawn.sum(-1) != want_n).any():
            raise CacheError(f"shard {name}: draws per position do not sum to n={want_n}")
    else:
        lp = t["logprobs"].astype(np.float32)
        # -inf marks an empty slot (a list shorter than k: api_cache.py), never slot 0
        if np.isnan(lp).any() or (lp > 0).any() or np.isneginf(lp[..., 0]).any() \
                or (np.exp(lp).sum(-1) > 1.0 + 1e-2).any():
            raise CacheError(f"shard {name}: log-probabilities not finite or summing above 1")
        tail = t["tail_logprob"].astype(np.float64)
        total = np.exp(lp.astype(np.float64)).sum(-1) + np.exp(tail)
        if np.isnan(tail).any() or (tail > 0).any() or (np.abs(total - 1.0) > 1e-2).any():
            raise CacheError(f"shard {name}: top-k and tail probabilities do not sum to 1")
    if m.get("next_logprob"):
        # logit - logsumexp is <= 0: the logsumexp is max + log(sum) with the max's own term
        # 1, so mlx's float32 value never exceeds 0. The margin leaves room for another
        # backend's rounding (an ulp of a logsumexp in the hundreds is 3e-5), far below what
        # the log-prob of the wrong thing (a raw logit, an unnormalised score) would show.
        nlp = t["next_logprob"]
        if not np.isfinite(nlp).all() or (nlp > 1e-4).any():
            raise CacheError(f"shard {name}: next_logprob holds values that are not finite "
                             "log-probabilities (<= 0)")
        if (nlp[t["next_ids"] < 0, -1] != 0).any():
            raise CacheError(f"shard {name}: next_logprob is not 0 where a row has no next "
                             "token (next_ids < 0)")
    for key in t:
        if key.startswith("hidden.") and not np.isfinite(t[key].astype(np.float32)).all():
            raise CacheError(f"shard {name}: {key} holds non-finite values")
