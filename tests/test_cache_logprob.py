"""cache.next_logprob: the teacher's log-probability of each actual next token, stored beside
its distribution for cross-tokenizer chunk likelihood (ALM); opt-in, one-way compatible."""

import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_overrides
from safetensors.numpy import load_file, save_file

from mlxdistill import cache as cache_mod
from mlxdistill import data as data_mod
from mlxdistill import files, models, shards
from mlxdistill.config import load_config
from mlxdistill.shards import CacheError

QUIET = dict(quiet=True, log=lambda m: None)
WITH = {"cache.next_logprob": True}


def cfg_for(tiny, tmp, **extra):
    return load_config(None, tiny_overrides(tiny, tmp, **extra))


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """A sampled cache with next_logprob (the reference for the tests that copy it)."""
    d = tmp_path_factory.mktemp("nlp")
    cfg = cfg_for(tiny, d, **WITH)
    return cfg, cache_mod.build(cfg, **QUIET)


def _teacher_logprobs(tiny, ids: np.ndarray, vocab: int, batch: int) -> np.ndarray:
    """log softmax of the teacher's logits in float64, over the vocabulary the cache uses.
    Forwarded in the cache pass's batches: another batch shape sums the matmuls in another
    order, which alone moves a log-prob here by up to 1e-5."""
    model, _, _ = models.load(tiny["teacher"], "teacher")
    z = np.concatenate([np.asarray(model(mx.array(ids[b:b + batch])).astype(mx.float32))
                        for b in range(0, len(ids), batch)])[..., :vocab].astype(np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _check_against_teacher(tiny, cfg, m):
    reader = cache_mod.ShardReader(cfg.cache.dir)
    checked_last = checked_end = 0
    for i in (0, len(reader.shards) - 1):  # the last shard holds the end of the stream
        t = reader.load_shard(i)
        got = t["next_logprob"]
        assert got.dtype == np.float32 and got.shape == t["input_ids"].shape
        lp = _teacher_logprobs(tiny, t["input_ids"], m["vocab_size"], cfg.cache.batch_size)
        labels = data_mod.hard_targets(t["input_ids"], t["next_ids"])
        has = labels >= 0
        want = np.take_along_axis(lp, np.maximum(labels, 0)[..., None], -1)[..., 0]
        assert np.abs(got[has] - want[has]).max() < 1e-5
        assert (got[~has] == 0).all()
        # the last position is scored against next_ids, the next row's first token
        for r, nxt in enumerate(t["next_ids"]):
            if nxt >= 0:
                assert abs(got[r, -1] - lp[r, -1, nxt]) < 1e-5
                checked_last += 1
            else:
                assert got[r, -1] == 0.0
                checked_end += 1
    assert checked_last > 0 and checked_end == 1  # the stream ends once, in the last row


def test_next_logprob_is_the_teachers_log_probability_of_the_next_token(tiny, built):
    cfg, m = built
    assert m["next_logprob"] is True and m["complete"]
    _check_against_teacher(tiny, cfg, m)
    shard = load_file(os.path.join(cfg.cache.dir, m["shards"][0]["file"]))
    assert shards.estimate_bytes(m, m["shards"][0]["rows"]) == sum(
        v.nbytes for v in shard.values())


def test_tempered_topk_cache_stores_it_at_temperature_1(tiny, tmp_path, monkeypatch):
    """The distribution is tempered; the likelihood of the text is not. One forward per
    teacher batch serves both."""
    calls = {"n": 0}
    real = models.logits_fn

    def counting(model, vocab):
        f = real(model, vocab)

        def forward(x):
            calls["n"] += 1
            return f(x)
        return forward

    monkeypatch.setattr(models, "logits_fn", counting)
    cfg = cfg_for(tiny, tmp_path, **{**WITH, "cache.mode": "topk", "cache.k": 8,
                                     "cache.temperature": 2.0, "loss.temperature": 2.0,
                                     "cache.batch_size": 8})
    m = cache_mod.build(cfg, **QUIET)
    monkeypatch.setattr(models, "logits_fn", real)
    assert calls["n"] == sum(-(-s["rows"] // 8) for s in m["shards"])
    _check_against_teacher(tiny, cfg, m)
    assert cache_mod.summary(cfg.cache.dir)["next_logprob"] is True


def test_the_default_cache_is_unchanged(tiny, tmp_path):
    """Without the key nothing is computed, stored or recorded: a cache built before it
    existed is the cache built now."""
    cfg = cfg_for(tiny, tmp_path)
    assert "next_logprob" not in cache_mod.config_identity(cfg)
    m = cache_mod.build(cfg, **QUIET)
    assert "next_logprob" not in m
    assert "next_logprob" not in load_file(os.path.join(cfg.cache.dir, m["shards"][0]["file"]))
    s = cache_mod.summary(cfg.cache.dir)
    assert s["next_logprob"] is False and s["bytes_per_token"] == 48.0


def test_a_cache_with_it_serves_a_config_without_it(tiny, tmp_path, built, monkeypatch):
    """A cache with it serves a config without it, with the same batch targets as a cache
    without it."""
    cfg_with, _ = built
    monkeypatch.setattr(cache_mod, "build", lambda *a, **k: pytest.fail("teacher pass"))
    plain = cfg_for(tiny, tmp_path, **{"cache.dir": cfg_with.cache.dir})
    batch = next(cache_mod.ensure(plain, **QUIET).batches(4, seed=0))
    assert sorted(batch.targets) == ["counts", "ids"]
    nlp = cache_mod.ShardReader(cfg_with.cache.dir).load_shard(0)["next_logprob"]
    assert nlp.dtype == np.float32 and (nlp <= 0).all()
    assert cache_mod.summary(cfg_with.cache.dir)["bytes_per_token"] == 48.0 + 4


def test_a_cache_without_it_is_refused_naming_the_key(tiny, tmp_path):
    cfg = cfg_for(tiny, tmp_path)
    cache_mod.build(cfg, **QUIET)
    want = cfg_for(tiny, tmp_path, **WITH)
    for run in (lambda: cache_mod.ensure(want, **QUIET),
                lambda: cache_mod.build(want, **QUIET)):
        with pytest.raises(CacheError, match=r"cache\.next_logprob") as e:
            run()
        assert "\n" not in str(e.value) and cfg.cache.dir in str(e.value)


def _rewrite(cache_dir, m, index, change):
    """Change a shard and record its new sha256, as a faulty producer would."""
    path = os.path.join(cache_dir, m["shards"][index]["file"])
    t = load_file(path)
    change(t)
    save_file(t, path)
    m["shards"][index]["sha256"] = files.sha256_file(path)
    with open(os.path.join(cache_dir, cache_mod.MANIFEST), "w") as f:
        json.dump(m, f)


@pytest.mark.parametrize("bad", ["positive", "nan", "end"])
def test_inspect_catches_values_that_are_not_log_probabilities(tiny, tmp_path, built, bad):
    cfg, m = built
    d = str(tmp_path / "copy")
    shutil.copytree(cfg.cache.dir, d)
    last = len(m["shards"]) - 1
    assert cache_mod.summary(d)["verified"]

    def change(t):
        if bad == "end":  # the position with no next token must read 0
            assert t["next_ids"][-1] < 0
            t["next_logprob"][-1, -1] = -1.0
        else:
            t["next_logprob"][0, 3] = 0.5 if bad == "positive" else np.nan

    _rewrite(d, json.loads(json.dumps(m)), last, change)
    with pytest.raises(CacheError, match=f"{m['shards'][last]['file']}: next_logprob"):
        cache_mod.summary(d)


def test_a_shard_lacking_it_is_refused_by_its_header(tiny, tmp_path):
    cfg = cfg_for(tiny, tmp_path)
    m = cache_mod.build(cfg, **QUIET)
    m["next_logprob"] = True
    with open(os.path.join(cfg.cache.dir, cache_mod.MANIFEST), "w") as f:
        json.dump(m, f)
    with pytest.raises(CacheError, match="lacks tensor 'next_logprob'"):
        cache_mod.ShardReader(cfg.cache.dir).load_shard(0)


def test_resume_finishes_the_cache_as_it_was_begun(tiny, tmp_path, built, monkeypatch):
    """A pass killed mid-way resumes to the uninterrupted cache, also when resumed by a
    config without the key: the manifest decides, so every shard holds the same tensors."""
    _, ref = built
    real = cache_mod.save_file
    calls = {"n": 0}

    def dying_save(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(tensors, path)

    monkeypatch.setattr(cache_mod, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cache_mod.build(cfg_for(tiny, tmp_path, **WITH), **QUIET)
    monkeypatch.setattr(cache_mod, "save_file", real)
    with open(tmp_path / "cache" / cache_mod.MANIFEST) as f:
        partial = json.load(f)
    assert not partial["complete"] and len(partial["shards"]) == 2
    m = cache_mod.build(cfg_for(tiny, tmp_path), **QUIET)
    assert m["complete"] and m["next_logprob"] is True
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in ref["shards"]]
