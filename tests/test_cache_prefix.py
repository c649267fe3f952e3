"""A cache built for more rows serves a smaller data.max_rows from its first rows, exactly as
a cache built for that many holds them: no second teacher pass."""

import itertools
import json
import os
import random
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import WORDS, tiny_overrides

from mlxdistill import cache as cache_mod
from mlxdistill import data as data_mod
from mlxdistill import models, trainer
from mlxdistill.config import load_config
from mlxdistill.shards import CacheError

QUIET = dict(quiet=True, log=lambda m: None)
# 16-row shards of whole 8-row teacher batches: 24 rows end on a whole batch of the second
# shard, so the cache built for 24 rows ran the very batches the larger one did.
SHARDS = {"cache.shard_rows": 16, "cache.batch_size": 8}


def cfg_for(tiny, tmp, **extra):
    return load_config(None, tiny_overrides(tiny, tmp, **{**SHARDS, **extra}))


@pytest.fixture(scope="module")
def big(tiny, tmp_path_factory):
    """A complete cache of every training row (max_rows null)."""
    d = tmp_path_factory.mktemp("big")
    cfg = cfg_for(tiny, d, **{"data.max_rows": None})
    cache_mod.build(cfg, **QUIET)
    return cfg.cache.dir


def _mixed_records(path, n=40, seed=0):
    """Text and prompt/completion records, some longer than a row."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 9, 20, 45])))
            rec = {"text": words} if i % 3 == 0 else \
                {"prompt": words[: len(words) // 3], "completion": " " + words[len(words) // 3:]}
            f.write(json.dumps(rec) + "\n")
    return str(path)


@pytest.mark.parametrize("packing", ["auto", "stream", "whole"])
@pytest.mark.parametrize("long_lines", ["split", "truncate"])
def test_fewer_rows_pack_as_the_first_rows_of_more(tiny, tmp_path, packing, long_lines):
    path = _mixed_records(tmp_path / "mixed.jsonl")
    _, tok = models.load_meta(tiny["teacher"], "teacher")
    every = data_mod.pack(path, tok, 16, True, None, long_lines, packing)
    assert every.long_records > 0 and every.rows > 10
    for m in range(1, every.rows + 3):
        fewer = data_mod.pack(path, tok, 16, True, m, long_lines, packing)
        for key in ("input_ids", "loss_mask", "next_ids"):
            assert np.array_equal(getattr(fewer, key), getattr(every, key)[:m]), (m, key)


def _shards(reader):
    return [reader.load_shard(i) for i in range(len(reader.shards))]


def test_a_larger_cache_serves_a_smaller_max_rows(tiny, tmp_path, big, monkeypatch):
    own = cfg_for(tiny, tmp_path / "own", **{"data.max_rows": 24})
    cache_mod.build(own, **QUIET)
    ref = cache_mod.ShardReader(own.cache.dir)

    monkeypatch.setattr(cache_mod, "build", lambda *a, **k: pytest.fail("teacher pass"))
    served = cache_mod.ensure(cfg_for(tiny, tmp_path, **{"data.max_rows": 24,
                                                         "cache.dir": big}), **QUIET)
    assert served.rows == ref.rows == 24 < cache_mod.ShardReader(big).rows
    assert [s["rows"] for s in served.shards] == [s["rows"] for s in ref.shards] == [16, 8]
    for got, want in zip(_shards(served), _shards(ref), strict=True):
        assert got.keys() == want.keys()
        for k in want:
            assert np.array_equal(got[k], want[k]), k
    # the batches, over an epoch boundary (6 batches of 4 per epoch)
    for a, b in itertools.islice(zip(served.batches(4, seed=3), ref.batches(4, seed=3)), 14):
        assert np.array_equal(a.input_ids, b.input_ids)
        assert a.targets.keys() == b.targets.keys()
        assert all(np.array_equal(a.targets[k], b.targets[k]) for k in b.targets)


def test_a_prefix_cut_inside_a_batch_serves_the_same_rows(tiny, tmp_path, big):
    """13 rows end inside a teacher batch: the rows and the batch order are a pass at 13's;
    the last partial batch's targets were computed in a full batch (cache.covers)."""
    own = cfg_for(tiny, tmp_path / "own", **{"data.max_rows": 13})
    cache_mod.build(own, **QUIET)
    ref = cache_mod.ShardReader(own.cache.dir)
    served = cache_mod.ensure(cfg_for(tiny, tmp_path, **{"data.max_rows": 13,
                                                         "cache.dir": big}), **QUIET)
    assert served.rows == 13
    for got, want in zip(_shards(served), _shards(ref), strict=True):
        for k in ("input_ids", "loss_mask", "next_ids"):
            assert np.array_equal(got[k], want[k]), k
    it_a, it_b = served.batches(4, seed=1), ref.batches(4, seed=1)
    for _ in range(7):
        assert np.array_equal(next(it_a).input_ids, next(it_b).input_ids)


def test_training_from_the_prefix_equals_training_from_its_own_cache(tiny, tmp_path, big):
    common = {"data.max_rows": 24, "train.iters": 2, "train.eval_every": 2,
              "train.final_eval": False}
    own = cfg_for(tiny, tmp_path / "own", **common)
    trainer.fit(own, **QUIET)
    logs = []
    prefix = cfg_for(tiny, tmp_path / "prefix", **common, **{"cache.dir": big})
    trainer.fit(prefix, quiet=True, log=logs.append)
    assert not any("teacher pass" in m for m in logs)
    a = mx.load(os.path.join(own.run.dir, "model", "model.safetensors"))
    b = mx.load(os.path.join(prefix.run.dir, "model", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert mx.array_equal(a[k], b[k]).item(), k  # bit for bit
    # several teachers: each cache serves the first max_rows, whatever it was built for
    mixed = cfg_for(tiny, tmp_path / "mixed", **common, **{
        "cache.dir": big, "cache.mix": f"[{own.cache.dir}]"})
    logs = []
    trainer.fit(mixed, quiet=True, log=logs.append)
    assert any("multi-teacher: 2 caches" in m for m in logs)
    assert not any("teacher pass" in m for m in logs)


def test_a_cache_serves_no_more_rows_than_it_was_built_for(tiny, tmp_path):
    small = cfg_for(tiny, tmp_path, **{"data.max_rows": 24})
    cache_mod.build(small, **QUIET)
    for more in (40, None):
        with pytest.raises(CacheError, match=r"max_rows=24 but this config needs"):
            cache_mod.ensure(cfg_for(tiny, tmp_path, **{"data.max_rows": more}), **QUIET)


def test_an_unfinished_larger_cache_is_not_finished_for_fewer_rows(tiny, tmp_path, big):
    """Resuming a pass keeps the max_rows it began with: a manifest of N rows never holds
    fewer (the prefix is read from complete caches only)."""
    half = str(tmp_path / "half")
    shutil.copytree(big, half)
    with open(os.path.join(half, "manifest.json")) as f:
        m = json.load(f)
    m["shards"], m["complete"] = m["shards"][:2], False
    with open(os.path.join(half, "manifest.json"), "w") as f:
        json.dump(m, f)
    with pytest.raises(CacheError, match=r"max_rows=None but this config needs 24"):
        cache_mod.ensure(cfg_for(tiny, tmp_path, **{"data.max_rows": 24,
                                                    "cache.dir": half}), **QUIET)
