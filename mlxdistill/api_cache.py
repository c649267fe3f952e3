"""A top-k cache from an HTTP teacher's log-probabilities, with no teacher pass.

`generate` with teacher.api_top_logprobs keeps, in every record it writes, the endpoint's
top entries for each answer token (`teacher_logprobs`: [token, logprob(, id(, bytes))]
lists). An endpoint gives them for the tokens it generated only, as strings of its own
tokenizer, so `cache` needs that tokenizer locally (teacher.tokenizer) and does three
things per record of data.train:

1. packs the record exactly as a local teacher's cache pass does (data.pack: the same rows,
   prompts masked), so the cache is in the endpoint tokenizer's ids;
2. reads each entry's token as an id of that tokenizer: the id the endpoint gave when the
   tokenizer names it with the same string, else the token as a vocabulary string, else its
   bytes (the bytes the endpoint gave, or the string's UTF-8); entries that name no id add
   their probability to the tail;
3. lines the answer's entries up with the record's trained positions: the entries cover the
   tokens the endpoint generated, which the record holds after anything written in front of
   them (a reasoning opener) and before what the template adds (end-of-turn, EOS). The
   offset is the one where the most trained tokens are among their entry's top ids (at
   temperature 0 every one is, as the top-1), searched near the start and near the end; a
   record where fewer than MIN_HITS of the covered tokens are found is not lined up.

Trained positions without an entry (the opener, the template's tokens, every position of a
record not lined up) carry the text's own next token with probability 1: plain
cross-entropy there. The shards are a local top-k cache's (ids, logprobs, tail_logprob;
empty slots have log-probability -inf), so training, cross-tokenizer students and `mlxdistill
inspect` read them as any other; the manifest says where they came from and how many
records and positions were lined up.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np
from safetensors.numpy import save_file

from . import align, files, models, remote
from . import data as data_mod
from .config import Config, ConfigError
from .progress import Progress
from .shards import CacheError, check_free_space, id_dtype

MIN_HITS = 0.8  # share of covered trained tokens found among their entry's top ids
SEARCH = 64  # offsets tried from the start of the trained tokens, and around the end


def check(cfg: Config) -> None:
    """What a cache from an endpoint's log-probabilities needs, refused before any work."""
    c, t = cfg.cache, cfg.teacher
    where = f"teacher.model={remote.redact(t.model)} is an HTTP endpoint"
    if c.mode != "topk":
        raise ConfigError(f"{where}: its cache is built from the top log-probabilities "
                          "`generate` kept (teacher.api_top_logprobs), so it needs "
                          f"cache.mode=topk (got {c.mode!r})")
    if t.tokenizer is None:
        raise ConfigError(f"{where}: set teacher.tokenizer to a local folder with the "
                          "endpoint model's tokenizer (its tokenizer files and config.json), "
                          "which reads the endpoint's tokens as ids")
    for key, bad in (("hidden_layers", bool(c.hidden_layers)), ("next_logprob", c.next_logprob),
                     ("temperature", c.temperature != 1.0)):
        if bad:
            raise ConfigError(f"{where}: cache.{key}={getattr(c, key)!r} needs the teacher's "
                              "weights; an endpoint gives its temperature-1 top "
                              "log-probabilities only")
    if c.mix:
        raise ConfigError(f"{where}: cache.mix is not built from an endpoint; build each "
                          "cache on its own")


def load_tokenizer(cfg: Config):
    """(config, tokenizer) of teacher.tokenizer, with data.chat_template applied."""
    path = cfg.teacher.tokenizer
    if not os.path.isdir(path):
        raise ConfigError(f"teacher.tokenizer={path} is not a folder; give the folder holding "
                          "the endpoint model's tokenizer files and config.json")
    conf, tok = models.load_meta(path, "teacher.tokenizer")
    return conf, models.use_chat_template(tok, cfg)


class Reader:
    """Entries -> ids of the endpoint's tokenizer (step 2 of the module's docstring)."""

    def __init__(self, tok):
        self.vocab = tok.get_vocab()
        self.names = {i: s for s, i in self.vocab.items()}
        try:
            self.by_bytes = align.vocab(tok).lookup
        except align.AlignError:  # a tokenizer without bytes: names and ids only
            self.by_bytes = {}
        self.unknown = 0

    def id_of(self, entry: list) -> Optional[int]:
        token = entry[0]
        if len(entry) > 2 and isinstance(entry[2], int) and self.names.get(entry[2]) == token:
            return entry[2]
        if len(entry) > 3 and isinstance(entry[3], list):
            got = self.by_bytes.get(bytes(entry[3]))
            if got is not None:
                return got
        got = self.vocab.get(token)
        if got is None:
            got = self.by_bytes.get(token.encode("utf-8", "surrogatepass"))
        if got is None:
            self.unknown += 1
        return got

    def position(self, entries: list, k: int) -> tuple[list[int], list[float], float]:
        """(ids, log-probabilities) of the most likely k entries that name an id, equal ids
        merged, and the log of the mass outside them."""
        merged: dict[int, float] = {}
        for e in entries:
            i = self.id_of(e)
            if i is not None and np.isfinite(e[1]):
                merged[i] = float(np.logaddexp(merged[i], e[1])) if i in merged else float(e[1])
        top = sorted(merged.items(), key=lambda kv: -kv[1])[:k]
        rest = 1.0 - sum(np.exp(lp) for _, lp in top)
        return [i for i, _ in top], [lp for _, lp in top], (
            float(np.log(rest)) if rest > 1e-12 else -np.inf)


def line_up(targets: np.ndarray, top_ids: list[list[int]]) -> tuple[int, float]:
    """(offset, share of hits): where the answer's entries (top ids per generated token)
    sit among the record's trained next tokens `targets` — the offset with the most tokens
    among their entry's ids — and that count over min(entries, targets) (step 3 of the
    module's docstring)."""
    m, n = len(targets), len(top_ids)
    if not m or not n:
        return 0, 0.0
    width = max(len(t) for t in top_ids)
    table = np.full((n, max(width, 1)), -1, dtype=np.int64)
    for j, t in enumerate(top_ids):
        table[j, :len(t)] = t
    end = m - n
    offsets = sorted({o for o in [*range(0, min(SEARCH, m)), *range(end - 8, end + 9)]
                      if 0 <= o < m})
    best, hits = 0, -1
    for o in offsets:
        cover = min(n, m - o)
        got = int((table[:cover] == targets[o:o + cover, None]).any(-1).sum())
        if got > hits:
            best, hits = o, got
    # over what could be covered at best, so a short overlap cannot look like a match
    return best, hits / min(n, m)


def build(cfg: Config, quiet: bool = False, log=print) -> dict:
    """The top-k cache of cfg.cache.dir from data.train's `teacher_logprobs`; the manifest.
    Built whole (it reads what generate wrote, no model) and the manifest written last, so
    a killed build is simply done again."""
    from .cache import MANIFEST, config_identity, lock, read_manifest, check_compatible

    check(cfg)  # data.train is checked where it is read (_write); api.need_cache checks it
    c, d = cfg.cache, cfg.data  # before `cache` or `train` makes a folder
    tcfg, ttok = load_tokenizer(cfg)
    scfg, stok = models.load_meta_role(cfg, "student")
    if "vocab_size" not in tcfg:
        tcfg = {**tcfg, "vocab_size": len(ttok.get_vocab())}
    try:
        match = models.check_cache_pair(ttok, tcfg, stok, scfg, d.seq_len)
    except models.ModelError as e:  # the likelier slip here: the wrong tokenizer folder
        raise models.ModelError(f"{e} (or teacher.tokenizer={cfg.teacher.tokenizer} is not "
                                "the endpoint model's tokenizer)") from None
    want = {**config_identity(cfg), "tokenizer_fingerprint": match.fingerprint,
            "vocab_size": match.vocab_size}
    files.ensure_dir(c.dir, "cache.dir")
    mpath = os.path.join(c.dir, MANIFEST)
    with lock(c.dir):
        if os.path.exists(mpath):
            old = read_manifest(c.dir)
            check_compatible(old, want, c.dir, prefix=bool(old.get("complete")))
            if old.get("complete"):
                log(f"cache {c.dir} is complete ({old['rows']} rows); nothing to do")
                return old
        files.remove_stale_tmp(c.dir)
        return _write(cfg, ttok, match, want, mpath, quiet, log)


def check_data(cfg: Config) -> list[dict]:
    """data.train's records, refused in one line when one lacks `teacher_logprobs` or
    cache.k exceeds the longest lists they keep: checked before any folder is made."""
    c, d = cfg.cache, cfg.data
    records = data_mod.read_records(d.train)
    missing = next((i for i, r in enumerate(records, 1)
                    if not isinstance(r.get("teacher_logprobs"), list)), None)
    if missing is not None:
        raise CacheError(f"{d.train}: record {missing} has no teacher_logprobs; write the data "
                         "with `mlxdistill generate` and teacher.api_top_logprobs set (the "
                         "endpoint's top log-probabilities of every answer token)")
    widest = max((len(p) for r in records for p in r["teacher_logprobs"]), default=0)
    if c.k > widest:  # slots no entry can fill: bytes for nothing, and a claim the data lacks
        raise ConfigError(f"cache.k={c.k} but {d.train} keeps at most {widest} "
                          "log-probabilities per token (teacher.api_top_logprobs when it was "
                          f"generated): set cache.k={widest} or lower")
    return records


def _write(cfg: Config, ttok, match, want: dict, mpath: str, quiet: bool, log) -> dict:
    c, d = cfg.cache, cfg.data
    records = check_data(cfg)
    packed = data_mod.pack(d.train, ttok, d.seq_len, d.mask_prompt, d.max_rows,
                           d.long_lines, d.packing)
    if (note := packed.long_report(d.seq_len, d.long_lines, d.train)):
        log(note)
    rows, L, k = packed.rows, d.seq_len, c.k
    check_free_space(c.dir, {**want, "hidden_resolved": []}, rows)
    flat_mask = packed.loss_mask.reshape(-1)
    labels = data_mod.hard_targets(packed.input_ids, packed.next_ids).reshape(-1)
    total = rows * L
    ids = np.zeros((total, k), dtype=id_dtype(match.vocab_size))
    lps = np.full((total, k), -np.inf, dtype=np.float16)
    tail = np.full(total, -np.inf, dtype=np.float32)
    # Every position starts as its text's next token with probability 1 (untrained ones
    # too: no -inf-only slots, even where the mask drops them).
    ids[:, 0] = np.maximum(labels, 0)
    lps[:, 0] = 0.0
    reader = Reader(ttok)
    lined = unlined = covered = 0
    hit_sum = 0.0
    bar = Progress(len(packed.spans), "endpoint top-k", "rec", quiet)
    t0 = time.time()
    for rec, (start, n) in zip(records, packed.spans):
        lo, hi = max(start - 1, 0), min(start + n - 1, total)  # positions predicting its tokens
        pos = np.arange(lo, hi)[flat_mask[lo:hi].astype(bool)]
        bar.update(1)
        entries = rec["teacher_logprobs"]
        if not len(pos) or not entries:
            continue
        got = [reader.position(e, k) for e in entries]
        offset, share = line_up(labels[pos], [g[0] for g in got])
        if share < MIN_HITS:
            unlined += 1
            continue
        lined += 1
        hit_sum += share
        for j, p in enumerate(pos[offset:offset + len(got)]):
            g_ids, g_lps, g_tail = got[j]
            if not g_ids:
                continue
            ids[p, :len(g_ids)], lps[p, :len(g_ids)], tail[p] = g_ids, g_lps, g_tail
            lps[p, len(g_ids):] = -np.inf
            covered += 1
    bar.close()
    manifest = {**want, "teacher": remote.redact(cfg.teacher.model), "dataset": d.train,
                "source": "endpoint top log-probabilities", "teacher_tokenizer":
                cfg.teacher.tokenizer, "teacher_layers": 0, "hidden_resolved": [],
                "hidden_size": None, "rows": rows, "tokens": int(total),
                "trained_tokens": int(packed.loss_mask.sum()), "api_records_lined_up": lined,
                "api_records_not_lined_up": unlined, "api_positions": covered,
                "api_hit_share": round(hit_sum / lined, 4) if lined else None,
                "api_unknown_tokens": reader.unknown, "shards": [], "complete": False}
    nshards = -(-rows // c.shard_rows)
    shaped = lambda a: a.reshape(rows, L, *a.shape[1:])  # noqa: E731
    ids, lps, tail = shaped(ids), shaped(lps), shaped(tail)
    for i in range(nshards):
        a, b = i * c.shard_rows, min((i + 1) * c.shard_rows, rows)
        tensors = {"input_ids": packed.input_ids[a:b], "loss_mask": packed.loss_mask[a:b],
                   "next_ids": packed.next_ids[a:b], "ids": ids[a:b], "logprobs": lps[a:b],
                   "tail_logprob": tail[a:b]}
        name = f"shard-{i:05d}.safetensors"
        with files.atomic_path(os.path.join(c.dir, name)) as tmp:
            save_file({key: np.ascontiguousarray(v) for key, v in tensors.items()}, tmp)
            sha = files.sha256_file(tmp)
        manifest["shards"].append({"index": i, "file": name, "rows": b - a, "sha256": sha})
    manifest.update(num_shards=nshards, complete=True,
                    pass_tok_per_s=round(total / max(time.time() - t0, 1e-6), 1))
    files.atomic_json(mpath, manifest)
    records_total = lined + unlined
    log(f"cache {c.dir} from the endpoint's top log-probabilities: {lined}/{records_total} "
        f"records lined up ({covered} positions with the teacher's top-{k}"
        + (f"; {unlined} not lined up train on their text's tokens" if unlined else "")
        + (f"; {reader.unknown} entries named no id of teacher.tokenizer" if reader.unknown
           else "") + ")")
    if records_total and unlined > records_total // 10:
        log(f"warning: {unlined} of {records_total} records could not be lined up with their "
            "log-probabilities: check that teacher.tokenizer is the endpoint model's")
    return manifest
