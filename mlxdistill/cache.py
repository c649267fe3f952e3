"""Teacher pass -> cache shards, and the verified reader that streams them to training.

Layout (binding, see docs/design.md): `manifest.json` + `shard-NNNNN.safetensors`. Each shard is
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
from . import api_cache, files, models, remote, surgery
from .config import Config, ConfigError
from .distributed import World
from .progress import Progress
from .resume import refuse_changed
from .shards import (CacheError, check_contents, check_free_space, check_header,
                     expected_tensors, id_dtype)
from .targets import from_logits, top1_weights

# 2: top-k shards hold the teacher's tail log-mass (tail_logprob, from its logits), and the
# teacher fingerprint hashes the weights' content (format 1's saw file names and sizes only).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
VERIFIED = ".verified.json"
LOCK = ".lock"  # held by the process writing the cache
TARGET_KEYS = {"topk": ("ids", "logprobs", "tail_logprob"), "sample": ("ids", "counts")}
# Per-position tensors a cache holds only when built with the cache.KEY of the same name
# (recorded in the manifest); batches leave them out (xtok.py reads them from the shards).
EXTRA_KEYS = ("next_logprob",)


def target_keys(manifest: dict) -> list[str]:
    """Per-position teacher tensors of a cache: its distribution, then any hidden states."""
    return list(TARGET_KEYS[manifest["mode"]]) + [
        f"hidden.{layer}" for layer in manifest.get("hidden_resolved") or []]


# ---------------------------------------------------------------- manifest

IDENTITY_KEYS = ("format_version", "teacher_fingerprint_kind", "teacher_fingerprint",
                 "tokenizer_fingerprint", "vocab_size",
                 "mode", "n", "k", "temperature", "seq_len", "dataset_sha256", "max_rows",
                 "mask_prompt", "seed", "shard_rows", "hidden_layers", "long_lines",
                 "keep_top1", "packing", "chat_template_sha256")

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
    # Present only when asked for: the identity of a config without it is the one a cache
    # from before the key recorded, and any cache serves it (check_compatible).
    extra = {"next_logprob": True} if c.next_logprob else {}
    return {
        "format_version": FORMAT_VERSION,
        "teacher_fingerprint_kind": models.FINGERPRINT_KIND,
        "teacher_fingerprint": models.model_fingerprint(cfg.teacher.model),
        "mode": c.mode, "n": c.n if c.mode == "sample" else None,
        "k": c.k if c.mode == "topk" else None, "temperature": c.temperature,
        "seq_len": cfg.data.seq_len, "dataset_sha256": files.sha256_file(cfg.data.train),
        "max_rows": cfg.data.max_rows, "mask_prompt": cfg.data.mask_prompt, "seed": c.seed,
        "shard_rows": c.shard_rows, "hidden_layers": list(c.hidden_layers),
        "long_lines": cfg.data.long_lines, "keep_top1": c.keep_top1 and c.mode == "sample",
        "packing": cfg.data.packing,
        # None when unset, which is also how a manifest from before the key reads
        "chat_template_sha256": data_mod.chat_template_sha256(cfg.data.chat_template),
        **extra,
    }


def covers(manifest: dict, max_rows: Optional[int]) -> bool:
    """Whether a complete cache begins with the cache a pass at data.max_rows=`max_rows`
    (None: all) writes. Rows are packed in order, each packing decision depending only on
    the records before it (data.pack), so fewer rows are a prefix of more; shard i's draws
    come from (cache.seed, i) in row order. Bit for bit the same when the prefix ends on a
    whole cache.batch_size batch of its last shard; otherwise that partial batch's targets
    were computed in a full batch, as under another cache.batch_size (not part of a cache's
    identity either): the same distribution, float rounding and draws aside."""
    built = manifest.get("max_rows")
    everything = built is None or manifest.get("rows", 0) < built  # the data ran out first
    return everything or (max_rows is not None and max_rows <= built)


def check_compatible(manifest: dict, want: dict, cache_dir: str, prefix: bool = False) -> None:
    """Refuse a cache whose manifest disagrees with `want` on an identity key (the first in
    IDENTITY_KEYS order is named; a key the manifest lacks reads as None). With `prefix`
    (a complete cache, read through ShardReader(rows=max_rows)), a cache built for more
    rows than `want`'s max_rows is accepted: it `covers` them. A tensor of EXTRA_KEYS is
    one-way: a cache that holds it serves a config that does not ask for it (its reader
    leaves it out), not the reverse."""
    keys = [key for key in IDENTITY_KEYS if key in want and not (prefix and key == "max_rows")]
    message = lambda key, was, now: (  # noqa: E731
        f"cache {cache_dir} was built with {key}={was!r} but this config needs {now!r}; "
        "point cache.dir elsewhere or delete the cache")
    refuse_changed({key: manifest.get(key) for key in keys}, want, keys=keys,
                   error=CacheError, message=message)
    if prefix and "max_rows" in want and not covers(manifest, want["max_rows"]):
        raise CacheError(f"cache {cache_dir} was built with max_rows="
                         f"{manifest.get('max_rows')!r} but this config needs "
                         f"{want['max_rows']!r} (a cache serves a smaller max_rows, not a "
                         "larger one); point cache.dir elsewhere or delete the cache")
    for key in EXTRA_KEYS:
        if want.get(key) and not manifest.get(key):
            raise CacheError(f"cache {cache_dir} was built without cache.{key}, which this "
                             "config sets; point cache.dir elsewhere or delete the cache "
                             f"(the rebuild stores {key})")


# ---------------------------------------------------------------- writer

def build(cfg: Config, quiet: bool = False, log=print, world: Optional[World] = None,
          teacher: Optional[models.Lazy] = None) -> dict:
    """Run the teacher over data.train and write the cache; resumes a killed build.

    Under `mlx.launch` the ranks take the missing shards round-robin and write them into the
    one cache directory (which they must share); rank 0 alone reads and writes the manifest,
    merging every rank's shard records after each round. Shard contents depend only on the
    shard index and the seed, so any number of ranks builds the same cache.

    Rank 0 holds the cache folder's lock throughout: a second pass into the same folder
    (another `cache`, or a `train` that finds the cache missing) is refused at once, naming
    the process that runs the first."""
    world = world or World(cfg.run.dist_timeout)
    if remote.is_url(cfg.teacher.model):  # no teacher pass: what generate kept of its answers
        if world.size > 1:
            raise ConfigError("a cache from an HTTP teacher's log-probabilities is built by one "
                              "process (it runs no model); run `mlxdistill cache` first")
        return api_cache.build(cfg, quiet, log)
    files.check_dir(cfg.cache.dir, "cache.dir")  # before the teacher is loaded
    if not world.main:  # rank 0 locks, and reports, for all
        return _build(cfg, True, lambda m: None, world, teacher)
    files.ensure_dir(cfg.cache.dir, "cache.dir")
    with lock(cfg.cache.dir):
        return _build(cfg, quiet, log, world, teacher)


def lock(cache_dir: str) -> files.PidLock:
    # Refuse rather than wait: a teacher pass takes hours, and a process waiting silently
    # for it looks hung; rerun once the other is done and the cache is simply read.
    return files.PidLock(os.path.join(cache_dir, LOCK), f"cache.dir {cache_dir}",
                         "wait for it to finish (then rerun: the cache is read, not rebuilt) "
                         "or choose another cache.dir", CacheError)


def _build(cfg: Config, quiet: bool, log, world: World,
           teacher: Optional[models.Lazy]) -> dict:
    c = cfg.cache
    teacher, ttok, tcfg = (teacher or models.Lazy(cfg, "teacher")).get()
    scfg, stok = models.load_meta_role(cfg, "student")
    match = models.check_cache_pair(ttok, tcfg, stok, scfg, cfg.data.seq_len)
    if c.mode == "topk" and c.k > match.vocab_size:
        raise ConfigError(f"cache.k={c.k} exceeds the vocabulary size {match.vocab_size}")
    hidden = surgery.resolve_layers(c.hidden_layers, surgery.num_layers(teacher),
                                    "cache.hidden_layers")

    want = {**config_identity(cfg), "tokenizer_fingerprint": match.fingerprint,
            "vocab_size": match.vocab_size}
    files.ensure_dir(c.dir, "cache.dir")
    if world.main:  # before any rank writes: the others wait for rank 0's manifest below
        files.remove_stale_tmp(c.dir)  # partial shards of a killed pass: never read, just space
    mpath = os.path.join(c.dir, MANIFEST)
    if world.main and os.path.exists(mpath):
        manifest = read_manifest(c.dir)
        # A complete cache of more rows serves fewer; an unfinished one is finished only
        # for the max_rows it was begun with.
        check_compatible(manifest, want, c.dir, prefix=bool(manifest.get("complete")))
    else:
        manifest = {**want, "teacher": cfg.teacher.model, "dataset": cfg.data.train,
                    "teacher_layers": surgery.num_layers(teacher), "hidden_resolved": hidden,
                    "hidden_size": int(tcfg.get("hidden_size", 0)) or None,
                    "shards": [], "complete": False}
    # Every rank follows rank 0's view of the cache.
    manifest = world.bcast(manifest, "reading the cache manifest")
    if manifest.get("complete"):
        used = ("" if manifest.get("max_rows") == cfg.data.max_rows else
                f"; data.max_rows={cfg.data.max_rows} trains on its first rows")
        log(f"cache {c.dir} is complete ({manifest['rows']} rows){used}; nothing to do")
        return manifest

    packed = data_mod.pack(cfg.data.train, ttok, cfg.data.seq_len, cfg.data.mask_prompt,
                           cfg.data.max_rows, cfg.data.long_lines, cfg.data.packing)
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
    check_free_space(c.dir, manifest, todo_rows)
    what = f"n={c.n} draws" if c.mode == "sample" else f"top-{c.k}"
    what += ", next-token log-probs" if manifest.get("next_logprob") else ""
    log(f"teacher pass: {todo_rows} rows x {cfg.data.seq_len} tokens through "
        f"{cfg.teacher.model} ({c.mode}, {what}, T={c.temperature}) -> {c.dir}")
    todo = [i for i in range(nshards) if i not in done]
    if world.size > 1:
        log(f"teacher pass split over {world.size} ranks: {len(todo)} shards, round-robin")
    bar = Progress(sum(min(c.shard_rows, packed.rows - i * c.shard_rows)
                       for i in todo[world.rank::world.size]),
                   f"teacher pass ({c.mode})", "tok", quiet)
    forward = models.logits_fn(teacher, match.vocab_size)
    captured = surgery.capture_layers(teacher, hidden)
    idt = id_dtype(match.vocab_size)
    # The manifest decides, not this config: a cache begun with next_logprob is finished
    # with it (it still serves a config without it), so its shards all hold the same tensors.
    with_next = bool(manifest.get("next_logprob"))
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
        labels = None
        if with_next:
            outs["next_logprob"] = []
            labels = data_mod.hard_targets(packed.input_ids[lo:hi], packed.next_ids[lo:hi])
        rng = np.random.default_rng([c.seed, i])  # per shard: a resume redraws identically
        for b in range(lo, hi, c.batch_size):
            x = mx.array(packed.input_ids[b:min(b + c.batch_size, hi)])
            got = from_logits(forward(x), c.mode, c.n, c.k, c.temperature, rng, c.keep_top1,
                              None if labels is None else labels[b - lo:b - lo + x.shape[0]])
            for key, value in got.items():
                outs[key].append(value.astype(idt) if key == "ids" else value)
            for layer in hidden:
                outs[f"hidden.{layer}"].append(np.asarray(captured[layer].astype(mx.float16)))
            bar.update(x.shape[0], units=x.size)
        tensors.update({k: np.concatenate(v) for k, v in outs.items()})
        name = f"shard-{i:05d}.safetensors"
        with files.atomic_path(os.path.join(c.dir, name)) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp)
            sha = files.sha256_file(tmp)
        pending.append({"index": i, "file": name, "rows": hi - lo, "sha256": sha})
    bar.close()
    if todo_rows and world.main:
        dt = time.time() - t0
        manifest["pass_tok_per_s"] = round(todo_rows * cfg.data.seq_len / dt, 1)
        files.atomic_json(mpath, manifest)
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
    files.atomic_json(mpath, manifest)


# ---------------------------------------------------------------- reader

class ShardReader:
    """Verified, streaming access to a cache.

    Shards are verified against the manifest's sha256 once; the result is remembered by
    (size, mtime) in `.verified.json`, so later runs skip re-hashing unchanged files but
    any rewrite is caught.

    `rows` serves the cache's first rows only (a data.max_rows below what it holds:
    `covers`) as a cache built for that many holds them: the same shards, the last one cut,
    so the batch order (`order`, from the shards' row counts) is that cache's too."""

    def __init__(self, cache_dir: str, verify: bool = True, rows: Optional[int] = None):
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
        if rows is not None:
            self.shards = _prefix(self.shards, rows)
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
            if files.sha256_file(path) != s["sha256"]:
                raise CacheError(f"shard {path} does not match its sha256 in the manifest "
                                 "(corrupt or altered); delete it and rerun `mlxdistill cache`")
            seen[s["file"]] = stamp
            changed = True
        if changed:
            files.atomic_json(vpath, seen)

    def load_shard(self, i: int) -> dict:
        sh = self.shards[i]
        path = os.path.join(self.dir, sh["file"])
        stored = sh.get("stored_rows", sh["rows"])
        check_header(path, sh["file"], expected_tensors(self.manifest, stored))
        try:
            tensors = load_file(path)
        except Exception as e:
            raise CacheError(f"cannot read shard {path}: {e}") from None
        if stored != sh["rows"]:  # the last shard of a prefix (rows=)
            tensors = {k: v[:sh["rows"]] for k, v in tensors.items()}
        return tensors

    def bytes_per_token(self) -> tuple[float, float]:
        """(teacher-target bytes, whole-file bytes) per cached token."""
        t = self.load_shard(0)
        tok = t["input_ids"].size
        keys = list(TARGET_KEYS[self.mode]) + [k for k in EXTRA_KEYS if self.manifest.get(k)]
        target = sum(t[k].nbytes for k in keys) / tok
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
                        q.put(self.assemble(want, loaded))
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

    def assemble(self, want, loaded) -> data_mod.Batch:
        """One batch from its rows `want` [(shard, row)], their shards in `loaded` (as
        load_shard returns them): what a reader of another layout (xtok.AlignedReader)
        replaces, with load_shard."""

        def take(key):
            return np.stack([loaded[si][key][r] for si, r in want])

        targets = {k: take(k) for k in target_keys(self.manifest)}
        if self.manifest.get("keep_top1"):
            # float weights in place of counts: the loss normalises whatever "counts" holds
            targets["counts"] = top1_weights(targets["counts"])
        return data_mod.Batch(take("input_ids"), take("loss_mask"), take("next_ids"), targets)


def _prefix(shards: list[dict], rows: int) -> list[dict]:
    """The shard records holding the first `rows` rows; the last one cut to what is used,
    its stored row count kept for the header check."""
    out, left = [], rows
    for s in shards:
        if left <= 0:
            break
        out.append(s if s["rows"] <= left else {**s, "rows": left, "stored_rows": s["rows"]})
        left -= s["rows"]
    return out


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
        "next_logprob": bool(m.get("next_logprob")),
        # a cache from an HTTP teacher's log-probabilities (api_cache.py): how it lined up
        **{k: m[k] for k in ("source", "teacher_tokenizer", "api_records_lined_up",
                             "api_records_not_lined_up", "api_positions", "api_hit_share",
                             "api_unknown_tokens") if k in m},
        "verified": True,
    }


def ensure(cfg: Config, quiet: bool = False, log=print, world: Optional[World] = None,
           teacher: Optional[models.Lazy] = None) -> "ShardReader":
    """The verified cache of `cfg`, built first if missing or incomplete. Under several ranks
    all of them run the teacher (rank 0's view of the cache decides), and rank 0 verifies
    the shards before the others, which then find them already verified."""
    world = world or World(cfg.run.dist_timeout)
    mpath = os.path.join(cfg.cache.dir, MANIFEST)
    need = world.main and (not os.path.exists(mpath)
                           or not read_manifest(cfg.cache.dir).get("complete"))
    if world.bcast(need, "checking the cache"):
        build(cfg, quiet=quiet, log=log, world=world, teacher=teacher)
    if not world.main:
        world.barrier("rank 0's cache verification")
    # A cache built for more rows serves the first data.max_rows (covers).
    reader = ShardReader(cfg.cache.dir, rows=cfg.data.max_rows)
    if world.main:
        world.barrier("rank 0's cache verification")
    check_compatible(reader.manifest, config_identity(cfg), cfg.cache.dir, prefix=True)
    return reader
