"""Teacher pass -> cache shards, and the verified reader that streams them to training.

Layout (binding, see DESIGN.md): `manifest.json` + `shard-NNNNN.safetensors`. Each shard is
written under a temp name and renamed; the manifest is rewritten atomically after every
shard, so a killed pass resumes at the next shard and never trusts a partial file.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from typing import Iterator, Optional

import mlx.core as mx
import numpy as np
from safetensors.numpy import load_file, save_file

from . import data as data_mod
from . import files, models
from .config import Config, ConfigError
from .distributed import World
from .progress import Progress

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VERIFIED = ".verified.json"
TARGET_KEYS = {"topk": ("ids", "logprobs"), "sample": ("ids", "counts")}


def target_keys(manifest: dict) -> list[str]:
    """Per-position teacher tensors of a cache: its distribution, then any hidden states."""
    return list(TARGET_KEYS[manifest["mode"]]) + [
        f"hidden.{layer}" for layer in manifest.get("hidden_resolved") or []]


class CacheError(ValueError):
    """A cache that is missing, corrupt or built from something else; one-line message."""


def id_dtype(vocab_size: int):
    # Bytes per token matter: uint16 ids halve a top-k or sampled cache for vocabularies
    # up to 65536 tokens.
    return np.uint16 if vocab_size <= 65536 else np.int32


_atomic_json = files.atomic_json


def shard_sha256(path: str) -> str:
    return data_mod.file_sha256(path)


# ---------------------------------------------------------------- teacher -> targets

def sample_targets(logits: mx.array, n: int, rng: np.random.Generator, keep_top1: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """n draws per position from softmax(logits), as unique ids + counts (padded with count 0).

    The empirical distribution counts/n is an unbiased estimate of the teacher distribution,
    so the student's cross-entropy against it has the forward-KL gradient in expectation
    (Sparse Logit Sampling, Anshumann et al. 2025). Drawn by inverse CDF: one cumulative sum
    per position and a binary search per draw. mx.random.categorical with num_samples makes
    n Gumbel noises per vocabulary entry, which measured 13x slower for n=16, V=4096.

    keep_top1: slot 0 holds the teacher's most likely id with its probability p1 in 1/255
    units (stochastically rounded, so unbiased), and the other n-1 draws come from the
    distribution without it, each standing for (1 - p1)/(n-1) of the mass: the same bytes,
    no sampling noise on the token that carries most of the mass (see top1_weights)."""
    vocab = logits.shape[-1]
    probs = mx.softmax(logits.astype(mx.float32), axis=-1).reshape(-1, vocab)
    m = n
    if keep_top1:
        top = np.asarray(mx.argmax(probs, axis=-1))
        p1 = np.asarray(mx.max(probs, axis=-1))
        probs = mx.where(mx.arange(vocab)[None] == mx.array(top)[:, None], 0.0, probs)
        m = n - 1
    cdf = np.asarray(mx.cumsum(probs, axis=-1))
    u = rng.random((cdf.shape[0], m)) * cdf[:, -1:]
    draws = np.empty((cdf.shape[0], m), dtype=np.int64)
    for i in range(cdf.shape[0]):  # a batched searchsorted; ~3 us per row
        draws[i] = np.searchsorted(cdf[i], u[i], side="right")
    np.minimum(draws, vocab - 1, out=draws)
    ids, counts = merge_ids(draws, np.ones(draws.shape, dtype=np.float32))
    if keep_top1:
        scaled = p1 * 255.0
        c0 = np.floor(scaled) + (rng.random(scaled.shape) < scaled - np.floor(scaled))
        ids = np.concatenate([top[:, None].astype(ids.dtype), ids], axis=1)
        counts = np.concatenate([c0[:, None].astype(np.float32), counts], axis=1)
    shape = tuple(logits.shape[:-1]) + (n,)
    return ids.reshape(shape), counts.astype(np.uint8).reshape(shape)


def top1_weights(counts: np.ndarray) -> np.ndarray:
    """Probability weights of a keep_top1 cache's counts: slot 0 is p1 in 1/255 units, the
    n-1 other slots share 1 - p1 in proportion to their draws."""
    c = counts.astype(np.float32)
    w0 = c[..., :1] / 255.0
    rest = c[..., 1:]
    rest = rest / np.maximum(rest.sum(-1, keepdims=True), 1.0) * (1.0 - w0)
    return np.concatenate([w0, rest], axis=-1)


def merge_ids(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the weights of equal ids per position: [..., m] -> unique ids first, their summed
    weights, then padding (id 0, weight 0)."""
    shape = ids.shape
    ids2, w2 = ids.reshape(-1, shape[-1]).astype(np.int64), weights.reshape(-1, shape[-1])
    order = np.argsort(ids2, axis=1, kind="stable")
    s = np.take_along_axis(ids2, order, 1)
    sw = np.take_along_axis(w2, order, 1)
    first = np.ones_like(s, dtype=bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    group = np.cumsum(first, axis=1) - 1
    rows = np.broadcast_to(np.arange(s.shape[0])[:, None], s.shape)
    out_w = np.zeros(s.shape, dtype=np.float32)
    np.add.at(out_w, (rows, group), sw)
    out_ids = np.zeros(s.shape, dtype=ids.dtype)
    out_ids[rows[first], group[first]] = s[first]
    return out_ids.reshape(shape), out_w.reshape(shape)


def topk_targets(logprobs: mx.array, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely ids per position, most likely first, with their log-probabilities."""
    idx = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
    lp = mx.take_along_axis(logprobs, idx, axis=-1)
    order = mx.argsort(-lp, axis=-1)
    idx = mx.take_along_axis(idx, order, axis=-1)
    lp = mx.take_along_axis(lp, order, axis=-1)
    return np.asarray(idx), np.asarray(lp.astype(mx.float16))


# ---------------------------------------------------------------- manifest

IDENTITY_KEYS = ("format_version", "teacher_fingerprint", "tokenizer_fingerprint", "vocab_size",
                 "mode", "n", "k", "temperature", "seq_len", "dataset_sha256", "max_rows",
                 "mask_prompt", "seed", "shard_rows", "hidden_layers", "long_lines",
                 "keep_top1")
# Identity keys added after format 1 shipped: what a manifest without them was built with.
LEGACY = {"long_lines": "split", "keep_top1": False}


def read_manifest(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        raise CacheError(f"{cache_dir} is not a teacher cache (no {MANIFEST}); build one with "
                         "`mlxdistill cache -c CONFIG`")
    try:
        with open(path) as f:
            m = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is not valid JSON ({e}); delete the cache and rebuild it") from None
    for key in ("format_version", "mode", "vocab_size", "seq_len", "shards"):
        if key not in m:
            raise CacheError(f"{path} lacks {key!r}; delete the cache and rebuild it")
    if m["format_version"] != FORMAT_VERSION:
        raise CacheError(f"{path} has format_version {m['format_version']}, this version reads "
                         f"{FORMAT_VERSION}; rebuild the cache")
    return m


def config_identity(cfg: Config) -> dict:
    """What a cache must agree with, as far as the config alone decides it."""
    c = cfg.cache
    return {
        "format_version": FORMAT_VERSION,
        "teacher_fingerprint": models.config_fingerprint(cfg.teacher.model),
        "mode": c.mode, "n": c.n if c.mode == "sample" else None,
        "k": c.k if c.mode == "topk" else None, "temperature": c.temperature,
        "seq_len": cfg.data.seq_len, "dataset_sha256": data_mod.file_sha256(cfg.data.train),
        "max_rows": cfg.data.max_rows, "mask_prompt": cfg.data.mask_prompt, "seed": c.seed,
        "shard_rows": c.shard_rows, "hidden_layers": list(c.hidden_layers),
        "long_lines": cfg.data.long_lines, "keep_top1": c.keep_top1 and c.mode == "sample",
    }


def check_compatible(manifest: dict, want: dict, cache_dir: str) -> None:
    for key in IDENTITY_KEYS:
        if key not in want:
            continue
        if manifest.get(key, LEGACY.get(key)) != want.get(key):
            raise CacheError(
                f"cache {cache_dir} was built with {key}={manifest.get(key)!r} but this config "
                f"needs {want.get(key)!r}; point cache.dir elsewhere or delete the cache")


# ---------------------------------------------------------------- writer

def build(cfg: Config, quiet: bool = False, log=print, world: Optional[World] = None) -> dict:
    """Run the teacher over data.train and write the cache; resumes a killed build.

    Under `mlx.launch` the ranks take the missing shards round-robin and write them into the
    one cache directory (which they must share); rank 0 alone reads and writes the manifest,
    merging every rank's shard records after each round. Shard contents depend only on the
    shard index and the seed, so any number of ranks builds the same cache."""
    world = world or World(cfg.run.dist_timeout)
    if not world.main:
        quiet, log = True, (lambda m: None)  # rank 0 reports for all
    c = cfg.cache
    teacher, ttok, tcfg = models.load_role(cfg, "teacher")
    scfg, stok = models.load_meta(cfg.student.model, "student")
    match = models.check_vocab(ttok, tcfg, stok, scfg)
    models.check_seq_len(cfg.data.seq_len, tcfg, "teacher")
    models.check_seq_len(cfg.data.seq_len, scfg, "student")
    if c.mode == "topk" and c.k > match.vocab_size:
        raise ConfigError(f"cache.k={c.k} exceeds the vocabulary size {match.vocab_size}")
    hidden = models.resolve_layers(c.hidden_layers, models.num_layers(teacher),
                                   "cache.hidden_layers")

    want = {**config_identity(cfg), "tokenizer_fingerprint": match.fingerprint,
            "vocab_size": match.vocab_size}
    os.makedirs(c.dir, exist_ok=True)
    if world.main:  # before any rank writes: the others wait for rank 0's manifest below
        files.remove_stale_tmp(c.dir)  # partial shards of a killed pass: never read, just space
    mpath = os.path.join(c.dir, MANIFEST)
    if world.main and os.path.exists(mpath):
        manifest = read_manifest(c.dir)
        check_compatible(manifest, want, c.dir)
    else:
        manifest = {**want, "teacher": cfg.teacher.model, "dataset": cfg.data.train,
                    "teacher_layers": models.num_layers(teacher), "hidden_resolved": hidden,
                    "hidden_size": int(tcfg.get("hidden_size", 0)) or None,
                    "shards": [], "complete": False}
    # Every rank follows rank 0's view of the cache.
    manifest = world.bcast(manifest, "reading the cache manifest")
    if manifest.get("complete"):
        log(f"cache {c.dir} is complete ({manifest['rows']} rows); nothing to do")
        return manifest

    packed = data_mod.pack(cfg.data.train, ttok, cfg.data.seq_len, cfg.data.mask_prompt,
                           cfg.data.max_rows, cfg.data.long_lines)
    if (note := packed.long_report(cfg.data.seq_len, cfg.data.long_lines, cfg.data.train)):
        log(note)
    nshards = -(-packed.rows // c.shard_rows)
    manifest.update(rows=packed.rows, tokens=int(packed.rows * cfg.data.seq_len),
                    trained_tokens=int(packed.loss_mask.sum()), num_shards=nshards)
    done = set(world.bcast([s["index"] for s in manifest["shards"]
                            if os.path.isfile(os.path.join(c.dir, s["file"]))],
                           "reading the cache manifest"))
    manifest["shards"] = [s for s in manifest["shards"] if s["index"] in done]
    if done:
        log(f"resuming cache {c.dir}: {len(done)}/{nshards} shards already written")
    todo_rows = sum(min(c.shard_rows, packed.rows - i * c.shard_rows)
                    for i in range(nshards) if i not in done)
    _check_free_space(c.dir, manifest, todo_rows)
    what = f"n={c.n} draws" if c.mode == "sample" else f"top-{c.k}"
    log(f"teacher pass: {todo_rows} rows x {cfg.data.seq_len} tokens through "
        f"{cfg.teacher.model} ({c.mode}, {what}, T={c.temperature}) -> {c.dir}")
    todo = [i for i in range(nshards) if i not in done]
    if world.size > 1:
        log(f"teacher pass split over {world.size} ranks: {len(todo)} shards, round-robin")
    bar = Progress(sum(min(c.shard_rows, packed.rows - i * c.shard_rows)
                       for i in todo[world.rank::world.size]),
                   f"teacher pass ({c.mode})", "tok", quiet)
    forward = models.logits_fn(teacher, match.vocab_size)
    captured, _ = models.capture_layers(teacher, hidden)
    idt = id_dtype(match.vocab_size)
    t0 = time.time()
    pending: list[dict] = []  # this rank's shard records not yet in the manifest

    def merge() -> None:
        records = [r for part in world.gather(pending, "merging shard records") for r in part]
        pending.clear()
        if world.main:
            _merge_records(c.dir, mpath, manifest, records, nshards)

    for i in _round_robin(todo, world, merge):
        lo, hi = i * c.shard_rows, min((i + 1) * c.shard_rows, packed.rows)
        tensors = {"input_ids": packed.input_ids[lo:hi], "loss_mask": packed.loss_mask[lo:hi],
                   "next_ids": packed.next_ids[lo:hi]}
        outs: dict[str, list] = {k: [] for k in target_keys(manifest)}
        rng = np.random.default_rng([c.seed, i])  # per shard: a resume redraws identically
        for b in range(lo, hi, c.batch_size):
            x = mx.array(packed.input_ids[b:min(b + c.batch_size, hi)])
            logits = forward(x).astype(mx.float32) / c.temperature
            if c.mode == "topk":
                ids, lp = topk_targets(logits - mx.logsumexp(logits, axis=-1, keepdims=True), c.k)
                outs["ids"].append(ids.astype(idt))
                outs["logprobs"].append(lp)
            else:
                ids, counts = sample_targets(logits, c.n, rng, c.keep_top1)
                outs["ids"].append(ids.astype(idt))
                outs["counts"].append(counts)
            for layer in hidden:
                outs[f"hidden.{layer}"].append(np.asarray(captured[layer].astype(mx.float16)))
            bar.update(x.shape[0], units=x.size)
        tensors.update({k: np.concatenate(v) for k, v in outs.items()})
        name = f"shard-{i:05d}.safetensors"
        with files.atomic_path(os.path.join(c.dir, name)) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp)
            sha = shard_sha256(tmp)
        pending.append({"index": i, "file": name, "rows": hi - lo, "sha256": sha})
    bar.close()
    if todo_rows and world.main:
        dt = time.time() - t0
        manifest["pass_tok_per_s"] = round(todo_rows * cfg.data.seq_len / dt, 1)
        _atomic_json(mpath, manifest)
        log(f"teacher pass done: {manifest['pass_tok_per_s']:,.0f} tok/s, {dt:.0f} s")
    return world.bcast(manifest, "sharing the cache manifest")


def _round_robin(todo: list[int], world: World, after_round) -> Iterator[int]:
    """This rank's items of `todo` (item j goes to rank j % size); `after_round()` runs on
    every rank once per round of `size` items (it holds a collective), so each rank takes
    part in every round even when the last one has nothing left for it."""
    for j in range(0, len(todo), world.size):
        if j + world.rank < len(todo):
            yield todo[j + world.rank]
        after_round()


def _merge_records(cache_dir: str, mpath: str, manifest: dict, records: list[dict],
                   nshards: int) -> None:
    """Rank 0: add a round's shard records to the manifest and rewrite it atomically, so a
    killed pass loses at most the round in flight."""
    for r in records:
        if not os.path.isfile(os.path.join(cache_dir, r["file"])):
            raise CacheError(f"shard {r['file']} written by another rank is not in {cache_dir} "
                             "as rank 0 sees it: cache.dir must be a folder all ranks share "
                             "(a network volume), or build the cache with one process")
    manifest["shards"].extend(records)
    manifest["shards"].sort(key=lambda s: s["index"])
    manifest["complete"] = len(manifest["shards"]) == nshards
    _atomic_json(mpath, manifest)


# ---------------------------------------------------------------- reader

class ShardReader:
    """Verified, streaming access to a cache.

    Shards are verified against the manifest's sha256 once; the result is remembered by
    (size, mtime) in `.verified.json`, so later runs skip re-hashing unchanged files but
    any rewrite is caught."""

    def __init__(self, cache_dir: str, verify: bool = True):
        self.dir = cache_dir
        self.manifest = read_manifest(cache_dir)
        if not self.manifest.get("complete"):
            raise CacheError(f"cache {cache_dir} is incomplete ({len(self.manifest['shards'])}/"
                             f"{self.manifest.get('num_shards', '?')} shards); run "
                             "`mlxdistill cache` with the same config to finish it")
        self.shards = self.manifest["shards"]
        for s in self.shards:
            try:
                files.inside(cache_dir, s["file"], f"the manifest of {cache_dir}")
            except files.PathError as e:
                raise CacheError(str(e)) from None
        self.offsets = np.cumsum([0] + [s["rows"] for s in self.shards])
        self.rows = int(self.offsets[-1])
        if self.rows == 0:
            raise CacheError(f"cache {cache_dir} holds no rows")
        self.mode = self.manifest["mode"]
        if verify:
            self.verify()

    def verify(self) -> None:
        vpath = os.path.join(self.dir, VERIFIED)
        try:
            with open(vpath) as f:
                seen = json.load(f)
        except (OSError, json.JSONDecodeError):
            seen = {}
        changed = False
        for s in self.shards:
            path = os.path.join(self.dir, s["file"])
            if not os.path.isfile(path):
                raise CacheError(f"shard {path} is missing; rebuild with `mlxdistill cache`")
            st = os.stat(path)
            stamp = [st.st_size, st.st_mtime_ns, s["sha256"]]
            if seen.get(s["file"]) == stamp:
                continue
            if shard_sha256(path) != s["sha256"]:
                raise CacheError(f"shard {path} does not match its sha256 in the manifest "
                                 "(corrupt or altered); delete it and rerun `mlxdistill cache`")
            seen[s["file"]] = stamp
            changed = True
        if changed:
            _atomic_json(vpath, seen)

    def load_shard(self, i: int) -> dict:
        sh = self.shards[i]
        path = os.path.join(self.dir, sh["file"])
        check_header(path, sh["file"], expected_tensors(self.manifest, sh["rows"]))
        try:
            return load_file(path)
        except Exception as e:
            raise CacheError(f"cannot read shard {path}: {e}") from None

    def bytes_per_token(self) -> tuple[float, float]:
        """(teacher-target bytes, whole-file bytes) per cached token."""
        t = self.load_shard(0)
        tok = t["input_ids"].size
        target = sum(t[k].nbytes for k in TARGET_KEYS[self.mode]) / tok
        total = sum(os.path.getsize(os.path.join(self.dir, s["file"])) for s in self.shards)
        return target, total / max(1, self.rows * self.manifest["seq_len"])

    def order(self, epoch: int, seed: int) -> list[tuple[int, np.ndarray]]:
        """Epoch order: shards permuted, rows permuted within each shard. Shuffling within
        shards keeps reads sequential (one shard in memory plus one prefetched) while the
        order stays a pure function of (seed, epoch), which is what exact resume needs."""
        rng = np.random.default_rng([seed, epoch])
        out = []
        for i in rng.permutation(len(self.shards)):
            out.append((int(i), rng.permutation(self.shards[i]["rows"])))
        return out

    def batches(self, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                size: int = 1) -> Iterator[data_mod.Batch]:
        """Endless batches; batch `start_step` first (exact resume). A background thread
        loads the next shard while the current one is consumed. With `size` ranks each
        reads only its contiguous share of every global batch."""
        per_epoch = self.rows // batch_size
        if per_epoch == 0:
            raise CacheError(f"cache {self.dir} has {self.rows} rows, fewer than "
                             f"train.batch_size={batch_size}; lower the batch size or add data")
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def producer():
            try:
                epoch, b = divmod(start_step, per_epoch)
                while not stop.is_set():
                    plan = self.order(epoch, seed)
                    sidx = np.concatenate([np.full(len(r), si) for si, r in plan])
                    ridx = np.concatenate([r for _, r in plan])
                    while b < per_epoch and not stop.is_set():
                        share = batch_size // size
                        lo = b * batch_size + rank * share
                        sl = slice(lo, lo + share)
                        want = list(zip(sidx[sl].tolist(), ridx[sl].tolist()))
                        loaded = {si: self._get(si) for si in dict.fromkeys(sidx[sl].tolist())}
                        q.put(self._assemble(want, loaded))
                        b += 1
                    epoch, b = epoch + 1, 0
            except Exception as e:  # surface reader errors in the consumer
                q.put(e)

        self._cache: dict[int, dict] = {}
        t = threading.Thread(target=producer, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stop.set()

    def _get(self, si: int) -> dict:
        # Two shards resident at most: the one being consumed and the next.
        if si not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[si] = self.load_shard(si)
        return self._cache[si]

    def _assemble(self, want, loaded) -> data_mod.Batch:
        def take(key):
            return np.stack([loaded[si][key][r] for si, r in want])

        targets = {k: take(k) for k in target_keys(self.manifest)}
        if self.manifest.get("keep_top1"):
            # float weights in place of counts: the loss normalises whatever "counts" holds
            targets["counts"] = top1_weights(targets["counts"])
        return data_mod.Batch(take("input_ids"), take("loss_mask"), take("next_ids"), targets)


def expected_tensors(m: dict, rows: int) -> dict[str, tuple[tuple, str]]:
    """Every tensor a shard of `rows` rows must hold: name -> (shape, numpy dtype name)."""
    L, width = m["seq_len"], m.get("n") if m["mode"] == "sample" else m.get("k")
    want = {"input_ids": ((rows, L), "int32"), "loss_mask": ((rows, L), "uint8"),
            "next_ids": ((rows,), "int32"),
            "ids": ((rows, L, width), np.dtype(id_dtype(m["vocab_size"])).name)}
    want.update({"counts": ((rows, L, width), "uint8")} if m["mode"] == "sample"
                else {"logprobs": ((rows, L, width), "float16")})
    for layer in m.get("hidden_resolved") or []:
        want[f"hidden.{layer}"] = ((rows, L, m["hidden_size"]), "float16")
    return want


def estimate_bytes(m: dict, rows: int) -> int:
    """Bytes on disk of `rows` cached rows (headers aside): what `cache` checks against the
    free space before it starts."""
    return sum(int(np.prod(shape)) * np.dtype(dt).itemsize
               for shape, dt in expected_tensors(m, rows).values())


def _check_free_space(cache_dir: str, m: dict, rows: int) -> None:
    need = estimate_bytes(m, rows) + (64 << 20)  # margin: headers, manifest, other writers
    free = files.free_bytes(cache_dir)
    if need > free:
        raise CacheError(f"cache {cache_dir} needs about {files.human(need)} for {rows} rows "
                         f"but only {files.human(free)} is free there; free space, lower "
                         "data.max_rows or point cache.dir at a bigger disk")


_ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F16": 2, "BF16": 2, "U16": 2, "I16": 2, "F32": 4,
              "U32": 4, "I32": 4, "F64": 8, "I64": 8, "U64": 8}
_NP_TO_ST = {"int32": "I32", "uint8": "U8", "uint16": "U16", "float16": "F16"}


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
        if not np.isfinite(lp).all() or (np.exp(lp).sum(-1) > 1.0 + 1e-2).any():
            raise CacheError(f"shard {name}: log-probabilities not finite or summing above 1")
    for key in t:
        if key.startswith("hidden.") and not np.isfinite(t[key].astype(np.float32)).all():
            raise CacheError(f"shard {name}: {key} holds non-finite values")


def summary(cache_dir: str) -> dict:
    """`mlxdistill inspect`: manifest summary after full verification."""
    reader = ShardReader(cache_dir, verify=False)
    vpath = os.path.join(cache_dir, VERIFIED)
    if os.path.exists(vpath):
        os.remove(vpath)  # inspect always re-hashes everything
    reader.verify()
    for i, sh in enumerate(reader.shards):
        check_contents(reader.load_shard(i), reader.manifest, sh["rows"], sh["file"])
    target_bpt, file_bpt = reader.bytes_per_token()
    m = reader.manifest
    return {
        "dir": cache_dir, "mode": m["mode"], "n": m.get("n"), "k": m.get("k"),
        "temperature": m.get("temperature"), "teacher": m.get("teacher"),
        "vocab_size": m["vocab_size"], "seq_len": m["seq_len"], "rows": reader.rows,
        "tokens": m.get("tokens"), "trained_tokens": m.get("trained_tokens"),
        "shards": len(reader.shards), "dataset": m.get("dataset"),
        "dataset_sha256": m.get("dataset_sha256"),
        "bytes_per_token": round(target_bpt, 2), "file_bytes_per_token": round(file_bpt, 2),
        "hidden_layers": m.get("hidden_resolved") or [],
        "keep_top1": bool(m.get("keep_top1")),
        "verified": True,
    }
