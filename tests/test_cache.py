"""Cache contract: write -> verify -> read, resume after a kill, refusal of bad caches."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import tiny_overrides
from safetensors.numpy import load_file

from mlxdistill import cache as cache_mod
from mlxdistill import data as data_mod
from mlxdistill import files
from mlxdistill.config import load_config
from mlxdistill.shards import CacheError


def build(tiny, tmp, **extra):
    cfg = load_config(None, tiny_overrides(tiny, tmp, **extra))
    return cfg, cache_mod.build(cfg, quiet=True, log=lambda m: None)


@pytest.mark.parametrize("mode", ["sample", "topk"])
def test_round_trip(tiny, tmp_path, mode):
    cfg, m = build(tiny, tmp_path, **{"cache.mode": mode, "cache.k": 8, "cache.n": 16})
    assert m["complete"] and m["mode"] == mode and m["num_shards"] == len(m["shards"]) > 1
    for key in ("teacher_fingerprint", "tokenizer_fingerprint", "dataset_sha256", "vocab_size",
                "temperature", "seq_len", "rows", "tokens"):
        assert key in m
    assert m["dataset_sha256"] == files.sha256_file(tiny["train"])
    shard = load_file(os.path.join(cfg.cache.dir, m["shards"][0]["file"]))
    L = cfg.data.seq_len
    assert shard["input_ids"].dtype == np.int32 and shard["input_ids"].shape[1] == L
    assert shard["loss_mask"].dtype == np.uint8
    assert shard["ids"].dtype == np.uint16  # vocab <= 65536
    if mode == "topk":
        assert shard["logprobs"].dtype == np.float16 and shard["ids"].shape[-1] == 8
        p = np.exp(shard["logprobs"].astype(np.float32)).sum(-1)
        assert (p <= 1.001).all() and (p > 0.3).all()
        # the tail is stored, computed from the logits: with the k ids it makes up 1
        tail = np.exp(shard["tail_logprob"].astype(np.float64))
        assert shard["tail_logprob"].dtype == np.float32
        assert np.abs(p + tail - 1.0).max() < 2e-3  # float16 log-probs bound it
    else:
        assert shard["counts"].dtype == np.uint8 and (shard["counts"].sum(-1) == 16).all()

    reader = cache_mod.ShardReader(cfg.cache.dir)
    packed = data_mod.pack(tiny["train"], __import__("mlx_lm").utils.load_tokenizer(
        __import__("pathlib").Path(tiny["teacher"])), L)
    assert reader.rows == packed.rows
    # one epoch of batches covers every row exactly once, rows intact
    bs = 4
    it = reader.batches(bs, seed=0)
    seen = [next(it) for _ in range(reader.rows // bs)]
    got = np.concatenate([b.input_ids for b in seen])
    assert len({r.tobytes() for r in got}) == len(got)
    rows = {r.tobytes() for r in packed.input_ids}
    assert all(r.tobytes() in rows for r in got)
    s = cache_mod.summary(cfg.cache.dir)
    # top-k: 8 x (2-byte id + 2-byte log-prob) + the 4-byte tail
    assert s["verified"] and s["bytes_per_token"] == (48.0 if mode == "sample" else 8 * 4.0 + 4)


def test_batches_resume_at_any_step(tiny, tmp_path):
    cfg, _ = build(tiny, tmp_path)
    reader = cache_mod.ShardReader(cfg.cache.dir)
    full = reader.batches(4, seed=3)
    seq = [next(full).input_ids for _ in range(30)]  # crosses epochs
    resumed = reader.batches(4, seed=3, start_step=17)
    for i in range(17, 30):
        assert np.array_equal(next(resumed).input_ids, seq[i])


def test_resume_after_kill_matches_uninterrupted(tiny, tmp_path, monkeypatch):
    cfg_a, m_a = build(tiny, tmp_path / "a")

    calls = {"n": 0}
    real = cache_mod.save_file

    def dying_save(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:
            real(tensors, path)  # a partial temp file is left behind, as after a kill
            raise KeyboardInterrupt
        return real(tensors, path)

    monkeypatch.setattr(cache_mod, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        build(tiny, tmp_path / "b")
    monkeypatch.setattr(cache_mod, "save_file", real)
    bdir = str(tmp_path / "b" / "cache")
    with open(os.path.join(bdir, "manifest.json")) as f:
        partial = json.load(f)
    assert not partial["complete"] and len(partial["shards"]) == 2
    with pytest.raises(CacheError, match="incomplete"):
        cache_mod.ShardReader(bdir)
    before = {s["file"]: os.stat(os.path.join(bdir, s["file"])).st_mtime_ns
              for s in partial["shards"]}
    _, m_b = build(tiny, tmp_path / "b")
    assert m_b["complete"]
    for name, mtime in before.items():  # finished shards were not redone
        assert os.stat(os.path.join(bdir, name)).st_mtime_ns == mtime
    # same data, same per-shard seeds: identical to the uninterrupted build
    assert [s["sha256"] for s in m_b["shards"]] == [s["sha256"] for s in m_a["shards"]]


def test_corrupt_shard_is_refused(tiny, tmp_path):
    cfg, m = build(tiny, tmp_path)
    cache_mod.ShardReader(cfg.cache.dir)  # verifies and remembers
    path = os.path.join(cfg.cache.dir, m["shards"][1]["file"])
    with open(path, "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CacheError, match="sha256"):
        cache_mod.ShardReader(cfg.cache.dir)


def test_manifest_cannot_point_outside(tiny, tmp_path):
    cfg, m = build(tiny, tmp_path)
    mpath = os.path.join(cfg.cache.dir, "manifest.json")
    m["shards"][0]["file"] = "../../etc/passwd"
    with open(mpath, "w") as f:
        json.dump(m, f)
    with pytest.raises(CacheError, match="outside"):
        cache_mod.ShardReader(cfg.cache.dir)


def test_cache_from_other_data_is_refused(tiny, tmp_path):
    build(tiny, tmp_path)
    with pytest.raises(CacheError, match="dataset_sha256"):
        build(tiny, tmp_path, **{"data.train": tiny["valid"]})
    with pytest.raises(CacheError, match="mode"):
        build(tiny, tmp_path, **{"cache.mode": "topk"})


def test_cache_of_an_earlier_format_is_refused(tiny, tmp_path):
    """Format 1 stored no top-k tail and fingerprinted the teacher by file names and sizes:
    such a cache cannot say which weights built it, so training and `cache` refuse it in
    one line that says to rebuild."""
    cfg, m = build(tiny, tmp_path)
    m["format_version"] = 1
    with open(os.path.join(cfg.cache.dir, cache_mod.MANIFEST), "w") as f:
        json.dump(m, f)
    with pytest.raises(CacheError, match="format_version 1.*rebuild the cache"):
        cache_mod.ensure(cfg, True, lambda m: None)
    with pytest.raises(CacheError, match="format_version 1"):
        build(tiny, tmp_path)


def test_training_refuses_a_complete_cache_with_other_settings(tiny, tmp_path):
    build(tiny, tmp_path, **{"cache.n": 8})
    cfg = load_config(None, tiny_overrides(tiny, tmp_path, **{"cache.n": 16}))
    with pytest.raises(CacheError, match="n=8"):
        cache_mod.ensure(cfg, True, lambda m: None)


@pytest.mark.parametrize("mode", ["sample", "topk"])
def test_inspect_finds_bad_contents_behind_a_valid_sha(tiny, tmp_path, mode):
    """A shard rewritten by a faulty producer, with the manifest updated to match, is still
    caught by the content checks of `inspect`, which name the shard."""
    from safetensors.numpy import save_file

    cfg, m = build(tiny, tmp_path, **{"cache.mode": mode, "cache.k": 8})
    name = m["shards"][1]["file"]
    path = os.path.join(cfg.cache.dir, name)
    t = load_file(path)
    t["ids"][0, 0, 0] = 60000  # beyond the 64-token vocabulary
    save_file(t, path)
    m["shards"][1]["sha256"] = files.sha256_file(path)
    with open(os.path.join(cfg.cache.dir, "manifest.json"), "w") as f:
        json.dump(m, f)
    with pytest.raises(CacheError, match=f"{name} holds token ids outside"):
        cache_mod.summary(cfg.cache.dir)


def test_keep_top1_cache(tiny, tmp_path):
    """Top-1 kept exactly: same 48 bytes/token at n=16, inspect passes, the reader hands
    the loss weights that sum to 1 with the teacher's argmax in slot 0."""
    cfg, m = build(tiny, tmp_path, **{"cache.keep_top1": True})
    assert m["keep_top1"] is True
    s = cache_mod.summary(cfg.cache.dir)
    assert s["verified"] and s["keep_top1"] and s["bytes_per_token"] == 48.0
    batch = next(cache_mod.ShardReader(cfg.cache.dir).batches(4, seed=0))
    w = batch.targets["counts"]
    assert w.dtype == np.float32 and np.allclose(w.sum(-1), 1.0, atol=1e-5)
    assert (w[..., 0] > 0.2).mean() > 0.5  # the sharpened teacher's top-1 carries real mass
    with pytest.raises(CacheError, match="keep_top1"):
        build(tiny, tmp_path)  # the same dir without keep_top1 is another cache


@pytest.fixture
def own_memo(tmp_path, monkeypatch):
    """Weight hashes remembered in this test's own file, not the user's."""
    path = tmp_path / "memo" / "weight-hashes.json"
    monkeypatch.setenv("MLXDISTILL_HASH_MEMO", str(path))
    return path


def _teacher_copy(tiny, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny["teacher"], teacher)
    return teacher


def _rewrite_in_place(path, offset=-64):
    """Change bytes of a file without changing its size, as a retraining that keeps every
    shape would."""
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        old = f.read(8)
        f.seek(offset, os.SEEK_END)
        f.write(bytes(b ^ 0x55 for b in old))


def test_teacher_weights_changed_in_place_refuse_the_cache(tiny, tmp_path, own_memo):
    """Same config.json, same file names and sizes, other weights: another teacher, so its
    old cache is refused by `cache` and by `train` in one line, not reused."""
    from click.testing import CliRunner

    from mlxdistill.cli import main

    teacher = _teacher_copy(tiny, tmp_path)
    ov = tiny_overrides(tiny, tmp_path, **{"teacher.model": str(teacher)})
    build(tiny, tmp_path, **{"teacher.model": str(teacher)})
    weights = teacher / "model.safetensors"
    size = weights.stat().st_size
    _rewrite_in_place(weights)
    assert weights.stat().st_size == size
    for cmd in ("cache", "train"):
        res = CliRunner().invoke(main, [cmd, "-q", *ov])
        assert res.exit_code == 2, res.output
        err = res.stderr.strip().splitlines()
        assert len(err) == 1 and "teacher_fingerprint" in err[0], res.stderr
        assert str(tmp_path / "cache") in err[0] and "Traceback" not in res.output
    assert not (tmp_path / "run" / "model").exists()


def test_weight_hashes_are_hashed_once_and_remembered(tiny, tmp_path, own_memo, monkeypatch):
    from mlxdistill import files, models

    teacher = _teacher_copy(tiny, tmp_path)
    weights = teacher / "model.safetensors"
    past = weights.stat().st_mtime_ns - 60 * 10**9  # older than the filesystem's tick
    os.utime(weights, ns=(past, past))
    reads = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: reads.append(p) or real(p))

    first = models.model_fingerprint(str(teacher))
    assert len(reads) == 1 and own_memo.is_file()
    assert models.model_fingerprint(str(teacher)) == first and len(reads) == 1  # a stat only

    _rewrite_in_place(weights)  # its mtime moves: hashed again, and another fingerprint
    os.utime(weights, ns=(past + 10**9, past + 10**9))  # ...and remembered again
    changed = models.model_fingerprint(str(teacher))
    assert changed != first and len(reads) == 2
    assert models.model_fingerprint(str(teacher)) == changed and len(reads) == 2

    own_memo.write_text("{not json")  # a damaged memo costs a re-hash, never an error
    assert models.model_fingerprint(str(teacher)) == changed and len(reads) == 3
    json.loads(own_memo.read_text())
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("MLXDISTILL_HASH_MEMO", str(blocked / "memo.json"))  # unwritable
    assert models.model_fingerprint(str(teacher)) == changed and len(reads) == 4


CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}lord {% else %}lady "
                 "{% endif %}{{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}lady {% endif %}")


def test_chat_template_is_part_of_the_cache_identity(tiny, tmp_path):
    """The teacher pass renders chat data with data.chat_template (the tiny models have no
    template of their own); a cache built with another template, or none, is refused."""
    import hashlib

    from mlxdistill import models

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": "speak the king"},
        {"role": "assistant", "content": "the queen weep" + " and" * (i % 3)}]}) + "\n"
        for i in range(40)))
    over = {"data.train": str(chat), "data.chat_template": json.dumps(CHAT_TEMPLATE)}
    cfg, m = build(tiny, tmp_path, **over)
    assert m["chat_template_sha256"] == hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()
    _, tok = models.load_meta_role(cfg, "teacher")
    (head, _), (tail, _) = data_mod.record_segments(tok, json.loads(chat.read_text().split(
        "\n")[0]), True)
    row = cache_mod.ShardReader(cfg.cache.dir).load_shard(0)["input_ids"][0]
    assert row[:len(head) + len(tail)].tolist() == head + tail
    assert tok.decode(head) == "lord speak the king . lady"
    for template in (CHAT_TEMPLATE.replace("lady", "lord"), None):
        other = load_config(None, tiny_overrides(tiny, tmp_path, **{
            **over, "data.chat_template": json.dumps(template)}))
        with pytest.raises(CacheError, match="chat_template_sha256"):
            cache_mod.ensure(other, True, lambda m: None)


def test_a_cache_from_before_the_chat_template_key_is_accepted(tiny, tmp_path):
    """Text data, no data.chat_template: the identity is that of a cache written before the
    key existed (its manifest lacks it), so an existing default cache is still used."""
    cfg, m = build(tiny, tmp_path)
    assert m["chat_template_sha256"] is None
    del m["chat_template_sha256"]
    with open(os.path.join(cfg.cache.dir, cache_mod.MANIFEST), "w") as f:
        json.dump(m, f)
    assert cache_mod.ensure(cfg, True, lambda m: None).rows == m["rows"]
