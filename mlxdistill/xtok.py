"""A student whose tokenizer differs from the teacher's, trained from the teacher's cache.

The cache stays as the teacher pass wrote it, in the teacher's tokens. Once per (cache,
student tokenizer) every cached row is re-tokenized for the student and aligned (align.py),
and the result is kept beside the cache in `xtok-<student tokenizer fingerprint>/`: per
cache shard, one aligned shard holding the student's ids and loss mask, the teacher
position paired with each student position (-1: none), whether the two next tokens there
are the same string, the chunk each position predicts into and, when the cache holds the
teacher's next-token log-probabilities, the teacher's log-likelihood of each chunk. The
aligned shards follow the cache's contract: written under a temp name and renamed, listed
with their sha256 in a manifest rewritten after each one (a killed pass resumes), verified
before use. Training reads the two side by side (`AlignedReader`): batches in the student's
tokens, with the teacher's cached draws or top-k gathered at the paired positions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from safetensors.numpy import load_file, save_file

from . import align, cache, files, models
from .data import Batch
from .progress import Progress
from .sections import XTOK
from .shards import CacheError
from .targets import top1_weights

FORMAT = 1
MANIFEST = "manifest.json"
# loss.xtok values; "auto" picks RECOMMENDED and, when loss.alpha is 0, AUTO_ALPHA: the
# best of the cross-tokenizer table (results/xtok.json: half the student's own CE helped the
# byte-level student, where one tokenizer's ablation found it hurt the shared-vocabulary one)
LOSSES = XTOK[1:]
RECOMMENDED = "mapped"
AUTO_ALPHA = 0.5
NEEDS = {"chunk": "next_logprob"}  # cache tensors a loss needs beyond the draws or top-k
PAD = {"input_ids": 0, "loss_mask": 0, "t_pos": -1, "one": 0, "s_chunk": -1,
       "chunk_lp": 0.0, "chunk_mask": 0}


def pick(cfg) -> str:
    return RECOMMENDED if cfg.loss.xtok == "auto" else cfg.loss.xtok


def alpha(cfg) -> float:
    """The CE weight a cross-tokenizer run uses: loss.alpha, or AUTO_ALPHA under
    loss.xtok=auto when loss.alpha is 0 (an explicit loss.xtok keeps loss.alpha as set)."""
    if cfg.loss.xtok == "auto" and cfg.loss.alpha == 0.0:
        return AUTO_ALPHA
    return cfg.loss.alpha


# Bytes per cached token of the aligned shards kept beside the cache: the student's int32
# id, uint8 mask, int32 paired position, uint8 one-to-one flag, int32 chunk; with chunk
# likelihood one float32 log-likelihood and a uint8 mask per chunk (at most one per token).
ALIGNED_BYTES = 14
ALIGNED_CHUNK_BYTES = 5


def cross_tokenizer(cfg) -> str:
    """The cross-tokenizer loss training will use (xtok.pick), or "" when the student shares
    the teacher's tokenizer, or when either model is not a folder here (a hub id's
    tokenizer is not read offline: planned as a same-tokenizer pair)."""
    if not (models.is_model_folder(cfg.teacher.model)
            and models.is_model_folder(cfg.student.model)):
        return ""
    _, ttok = models.load_meta(cfg.teacher.model, "teacher")
    _, stok = models.load_meta(cfg.student.model, "student")
    same = models.vocab_fingerprint(ttok) == models.vocab_fingerprint(stok)
    return "" if same else pick(cfg)


def aligned_bytes_per_token(kind: str) -> int:
    return (ALIGNED_BYTES + ALIGNED_CHUNK_BYTES * (kind == "chunk")) if kind else 0


def side_dir(cache_dir: str, student_fingerprint: str) -> str:
    return os.path.join(cache_dir, f"xtok-{student_fingerprint[:16]}")


def aligned_row(t_ids, t_mask, tv: align.Vocab, sv: align.Vocab, specials: dict,
                next_lp: Optional[np.ndarray] = None) -> dict:
    """One cached teacher row in the student's tokens: the arrays of an aligned shard's row
    (unpadded). A student position is trained where student_mask says; `t_pos` pairs it with
    the teacher position predicting from the same text (a shared token boundary)."""
    r = align.retokenize(t_ids, tv, sv, specials)
    a = align.align(r.t_spans, r.s_spans)
    n = len(r.ids)
    t_pos = np.full(n, -1, dtype=np.int32)
    t_pos[a.s_pos] = a.t_pos
    one = np.zeros(n, dtype=np.uint8)
    one[a.s_pos] = a.one_to_one
    out = {"input_ids": r.ids.astype(np.int32), "loss_mask": align.student_mask(t_mask, r),
           "t_pos": t_pos, "one": one, "s_chunk": a.s_chunk.astype(np.int32)}
    if next_lp is not None:
        tc = a.t_chunk
        has = tc >= 0
        trained = has & (np.asarray(t_mask).reshape(-1) != 0)
        k = a.n_chunks
        out["chunk_lp"] = np.bincount(tc[has], weights=np.asarray(next_lp, np.float64)[has],
                                      minlength=k).astype(np.float32)
        # a chunk is trained when every teacher token in it is (a prompt's last chunk is not)
        n_all = np.bincount(tc[has], minlength=k)
        out["chunk_mask"] = ((n_all > 0) & (np.bincount(tc[trained], minlength=k) == n_all)
                             ).astype(np.uint8)
    return out


def _pad(rows: list[dict], key: str, width: int) -> np.ndarray:
    first = rows[0][key]
    out = np.full((len(rows), width), PAD[key], dtype=first.dtype)
    for i, r in enumerate(rows):
        out[i, :len(r[key])] = r[key]
    return out


def _identity(manifest: dict, student_fp: str) -> dict:
    # what the aligned shards depend on besides the cache shards' content (sha256, per shard)
    return {"format": FORMAT, "teacher_tokenizer": manifest["tokenizer_fingerprint"],
            "student_tokenizer": student_fp, "next_logprob": bool(manifest.get("next_logprob"))}


@dataclass(frozen=True)
class Aligned:
    """What training needs of a (cache, student tokenizer) pair once aligned."""
    dir: str
    shards: dict  # cache shard file -> its aligned shard's record
    id_map: np.ndarray  # int32 [teacher vocab]: teacher id -> student id of the same bytes
    one_to_one: float  # share of trained student positions whose next token maps 1:1
    aligned: float  # share of trained student positions paired with a teacher position


def ensure(reader: cache.ShardReader, teacher_tok, student_tok, student: str, quiet: bool,
           log, build: bool = True) -> Aligned:
    """The aligned shards for every cache shard `reader` serves, built where missing (or
    built from another version of a cache shard), then verified. `build=False` (the other
    ranks, once rank 0 has built them) only reads and verifies, without the cache's lock."""
    m = reader.manifest
    ft = models.vocab_fingerprint(teacher_tok)
    if ft != m["tokenizer_fingerprint"]:
        raise CacheError(f"the teacher tokenizer of {m.get('teacher')} is not the one cache "
                         f"{reader.dir} was built with (fingerprints {ft[:12]} vs "
                         f"{m['tokenizer_fingerprint'][:12]}); rebuild the cache")
    tv, sv = align.vocab(teacher_tok), align.vocab(student_tok)
    sfp = models.vocab_fingerprint(student_tok)
    out = side_dir(reader.dir, sfp)
    mpath = os.path.join(out, MANIFEST)
    ident = _identity(m, sfp)
    def todo(side):
        return [s for s in reader.shards
                if side["shards"].get(s["file"], {}).get("cache_sha256") != s["sha256"]]

    if build:
        with cache.lock(reader.dir):
            files.ensure_dir(out, "the aligned shards' folder")
            side = _read(mpath)
            if side.get("identity") != ident:  # another format or cache: start over
                side = {"identity": ident, "student": student, "shards": {}}
            if todo(side):
                _build(reader, todo(side), tv, sv, out, side, mpath, quiet, log)
    else:
        side = _read(mpath)
        if side.get("identity") != ident or todo(side):
            raise CacheError(f"the aligned shards in {out} are missing or from another cache; "
                             "rerun (rank 0 builds them)")
    recs = {s["file"]: side["shards"][s["file"]] for s in reader.shards}
    _verify(out, recs)
    n = np.array([[r["trained"], r["aligned"], r["one_to_one"]] for r in recs.values()],
                 dtype=np.float64).sum(0)
    return Aligned(out, recs, align.string_map(tv, sv, m["vocab_size"]),
                   float(n[2] / max(n[0], 1)), float(n[1] / max(n[0], 1)))


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _build(reader: cache.ShardReader, todo: list, tv, sv, out: str, side: dict, mpath: str,
           quiet: bool, log) -> None:
    specials = align.special_map(tv, sv)
    full = {s["file"]: i for i, s in enumerate(reader.manifest["shards"])}
    rows = sum(s.get("stored_rows", s["rows"]) for s in todo)
    log(f"aligning {rows} cached rows to the student's tokenizer {sv.name} (once; kept in "
        f"{out})")
    whole = cache.ShardReader(reader.dir, verify=False)  # every stored row of a shard
    bar = Progress(rows, "align", "row", quiet)
    for s in todo:
        t = whole.load_shard(full[s["file"]])
        lp = t.get("next_logprob")
        rows = [aligned_row(t["input_ids"][i], t["loss_mask"][i], tv, sv, specials,
                            None if lp is None else lp[i])
                for i in range(len(t["input_ids"]))]
        width = max(len(r["input_ids"]) for r in rows)
        tensors = {k: _pad(rows, k, width) for k in ("input_ids", "loss_mask", "t_pos", "one",
                                                     "s_chunk")}
        chunks = 0
        if lp is not None:
            chunks = max(1, max(len(r["chunk_lp"]) for r in rows))
            tensors.update({k: _pad(rows, k, chunks) for k in ("chunk_lp", "chunk_mask")})
        name = "aligned-" + s["file"]
        path = os.path.join(out, name)
        with files.atomic_path(path) as tmp:
            save_file(tensors, tmp)
        trained = tensors["loss_mask"].astype(bool)
        side["shards"][s["file"]] = {
            "file": name, "cache_sha256": s["sha256"], "sha256": files.sha256_file(path),
            "rows": len(rows), "width": width, "chunks": chunks,
            "trained": int(trained.sum()), "aligned": int((trained & (tensors["t_pos"] >= 0))
                                                          .sum()),
            "one_to_one": int((trained & (tensors["one"] != 0)).sum())}
        files.atomic_json(mpath, side)  # after each shard: a killed pass resumes here
        bar.update(len(rows))
    bar.close()


def _verify(out: str, recs: dict) -> None:
    paths = [os.path.join(out, r["file"]) for r in recs.values()]
    for p in paths:
        if not os.path.isfile(p):
            raise CacheError(f"aligned shard {p} is missing; delete {out} and rerun")
    for p, got, r in zip(paths, files.remembered_sha256(paths), recs.values()):
        if got != r["sha256"]:
            raise CacheError(f"aligned shard {p} does not match its sha256 in {out}/{MANIFEST} "
                             f"(corrupt or altered); delete {out} and rerun")


class AlignedReader(cache.ShardReader):
    """The cache's batches in the student's tokens: the same order as the cache reader's
    (a function of seed and step: exact resume holds), each row's aligned shard beside its
    cache shard, the teacher's targets gathered at the paired positions. Targets also hold
    `t_pos`/`one` as masks ("aligned", "one"), and for chunk likelihood `s_chunk`,
    `chunk_lp`, `chunk_mask`."""

    def __init__(self, base: cache.ShardReader, aligned: Aligned, chunks: bool):
        self.__dict__.update(base.__dict__)
        self.aligned, self.chunks = aligned, chunks
        recs = [aligned.shards[s["file"]] for s in self.shards]
        self.width = max(r["width"] for r in recs)
        self.n_chunks = max(r["chunks"] for r in recs)

    def load_shard(self, i: int) -> dict:
        t = super().load_shard(i)
        rec = self.aligned.shards[self.shards[i]["file"]]
        path = os.path.join(self.aligned.dir, rec["file"])
        try:
            a = load_file(path)
        except Exception as e:
            raise CacheError(f"cannot read aligned shard {path}: {e}") from None
        return {"teacher": t, "student": {k: v[:len(t["input_ids"])] for k, v in a.items()}}

    def assemble(self, want, loaded) -> Batch:
        def take(key, width):
            rows = [loaded[si]["student"][key][r] for si, r in want]
            return _pad([{key: x} for x in rows], key, width)

        t_pos = take("t_pos", self.width)
        idx = np.maximum(t_pos, 0)
        targets = {}
        for k in cache.TARGET_KEYS[self.mode]:
            targets[k] = np.stack([loaded[si]["teacher"][k][r][idx[j]]
                                   for j, (si, r) in enumerate(want)])
        if self.manifest.get("keep_top1"):
            targets["counts"] = top1_weights(targets["counts"])
        targets["aligned"] = (t_pos >= 0).astype(np.uint8)
        targets["one"] = take("one", self.width)
        if self.chunks:
            targets["s_chunk"] = take("s_chunk", self.width)
            targets["chunk_lp"] = take("chunk_lp", self.n_chunks)
            targets["chunk_mask"] = take("chunk_mask", self.n_chunks)
        ids = take("input_ids", self.width)
        return Batch(ids, take("loss_mask", self.width), np.full(len(want), -1, np.int32),
                     targets)
