"""A student of another tokenizer trained from the teacher's cache: the aligned shards kept
beside it (built once, verified, resumed), the batches in the student's tokens, each
cross-tokenizer loss through the trainer, exact resume, and the refusals."""

import json
import os
import pathlib

import numpy as np
import pytest
from conftest import ROOT

from mlxdistill import align, api, cache, xtok
from mlxdistill.config import ConfigError, load_config
from mlxdistill.shards import CacheError

QUIET = dict(quiet=True, log=lambda m: None)
W = os.path.join(ROOT, "weights")


def overrides(tmp, **extra):
    base = {"teacher.model": os.path.join(W, "teacher"),
            "student.model": os.path.join(W, "student-xtok"),
            "data.train": os.path.join(ROOT, "data", "train.jsonl"),
            "data.valid": os.path.join(ROOT, "data", "valid.jsonl"),
            "data.test": os.path.join(ROOT, "data", "test.jsonl"),
            "data.test_records": 4, "data.seq_len": 48, "data.max_rows": 24,
            "cache.dir": str(tmp / "cache"), "cache.shard_rows": 8,
            "run.dir": str(tmp / "run"), "train.iters": 6, "train.batch_size": 4,
            "train.eval_every": 3, "train.save_every": 3, "train.warmup": 1,
            "train.eval_rows": 2, "train.lr": 1e-3, "train.report_every": 3}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def fit(tmp, log=None, **extra):
    cfg = load_config(None, overrides(tmp, **extra))
    logs = []
    api.fit(cfg, quiet=True, log=logs.append if log is None else log)
    return cfg, logs


def metrics(cfg):
    with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def vocabs():
    from mlx_lm.utils import load_tokenizer

    t = load_tokenizer(pathlib.Path(W) / "teacher")
    s = load_tokenizer(pathlib.Path(W) / "student-xtok")
    return t, s, align.vocab(t), align.vocab(s)


def test_aligned_row_pairs_positions_predicting_from_the_same_text(vocabs):
    t, s, tv, sv = vocabs
    text = "KING. 12345 o'er thee,\n\tcafé — naïve 🙂 words"
    ids = [tv.roles["bos"]] + t.encode(text, add_special_tokens=False) + [tv.roles["eos"]]
    mask = np.ones(len(ids), dtype=np.uint8)
    mask[:3] = 0
    lp = -np.arange(len(ids), dtype=np.float32) / 10
    row = xtok.aligned_row(np.array(ids), mask, tv, sv, align.special_map(tv, sv), lp)
    r = align.retokenize(np.array(ids), tv, sv, align.special_map(tv, sv))
    assert row["input_ids"].tolist() == r.ids.tolist()
    assert row["input_ids"][0] == sv.roles["bos"] and row["input_ids"][-1] == sv.roles["eos"]
    paired = np.nonzero(row["t_pos"] >= 0)[0]
    assert len(paired) > len(ids) // 2
    for j in paired:  # both predict the token starting at the same byte
        i = row["t_pos"][j]
        assert r.t_spans[i + 1, 0] == r.s_spans[j + 1, 0]
        same = bytes(r.text[slice(*r.t_spans[i + 1])]) == bytes(r.text[slice(*r.s_spans[j + 1])])
        assert bool(row["one"][j]) == same
    # the first three teacher positions are a prompt: no student position predicting into
    # them is trained
    first_trained = r.t_spans[3, 0]
    for j in np.nonzero(row["loss_mask"])[0]:
        assert r.s_spans[j + 1, 0] >= first_trained
    # chunk log-likelihoods are the teacher's log-probs summed over each chunk
    a = align.align(r.t_spans, r.s_spans)
    for c in range(a.n_chunks):
        want = lp[a.t_chunk == c].astype(np.float64).sum()
        assert row["chunk_lp"][c] == pytest.approx(want, abs=1e-5)


def test_cross_tokenizer_student_trains_from_the_cache(tmp_path):
    cfg, logs = fit(tmp_path)
    said = [m for m in logs if "another tokenizer" in m]
    assert len(said) == 1 and "loss mapped + 0.5 CE (auto" in said[0], logs
    assert any(m.startswith("aligning") for m in logs)
    recs = metrics(cfg)
    assert all(np.isfinite(r["kd"]) and r["kd"] > 0 for r in recs if "kd" in r)
    assert "val_ce" in recs[-1] and "val_kl" not in recs[-1]
    sides = [d for d in os.listdir(cfg.cache.dir) if d.startswith("xtok-")]
    assert len(sides) == 1
    man = json.load(open(os.path.join(cfg.cache.dir, sides[0], xtok.MANIFEST)))
    assert len(man["shards"]) == 3 and man["identity"]["student_tokenizer"]
    # a second run on the same cache aligns nothing again
    cfg2, logs2 = fit(tmp_path, **{"run.dir": str(tmp_path / "run2"), "train.iters": 2})
    assert not any(m.startswith("aligning") for m in logs2)


@pytest.mark.parametrize("kind", ["hybrid", "uld"])
def test_each_cross_loss_trains(tmp_path, kind):
    cfg, logs = fit(tmp_path, **{"loss.xtok": kind, "train.iters": 3})
    assert any(f"loss {kind} (loss.xtok)" in m for m in logs)  # loss.alpha as set: 0
    assert all(np.isfinite(r["kd"]) and r["kd"] > 0 for r in metrics(cfg) if "kd" in r)


def test_top_k_cache_serves_a_cross_student(tmp_path):
    cfg, _ = fit(tmp_path, **{"cache.mode": "topk", "cache.k": 8, "train.iters": 3})
    assert all(np.isfinite(r["kd"]) and r["kd"] > 0 for r in metrics(cfg) if "kd" in r)


def test_cross_tokenizer_resume_equals_uninterrupted(tmp_path, monkeypatch):
    from test_train import _weights, interrupted_at

    cfg_a, _ = fit(tmp_path / "a", **{"cache.dir": str(tmp_path / "cache")})
    cfg_b = load_config(None, overrides(tmp_path / "b", **{"cache.dir": str(tmp_path / "cache")}))
    monkeypatch.setattr(api, "evaluate", lambda *a, **k: {})
    interrupted_at(cfg_b, 5, monkeypatch)
    api.fit(cfg_b, **QUIET)
    wa, wb = _weights(cfg_a.run.dir), _weights(cfg_b.run.dir)
    for k in wa:
        assert np.allclose(np.array(wa[k]), np.array(wb[k]), atol=1e-6), k
    la = [(r["step"], r.get("loss"), r.get("val_ce")) for r in metrics(cfg_a)]
    lb = [(r["step"], r.get("loss"), r.get("val_ce")) for r in metrics(cfg_b)]
    assert la == lb


def test_aligned_shards_resume_and_refuse_tampering(tmp_path):
    cfg = load_config(None, overrides(tmp_path))
    reader = cache.ensure(cfg, **QUIET)
    from mlx_lm.utils import load_tokenizer

    t = load_tokenizer(pathlib.Path(W) / "teacher")
    s = load_tokenizer(pathlib.Path(W) / "student-xtok")
    a = xtok.ensure(reader, t, s, "student-xtok", True, lambda m: None)
    # a pass killed after its first shard resumes with the others
    man_path = os.path.join(a.dir, xtok.MANIFEST)
    man = json.load(open(man_path))
    first = sorted(man["shards"])[0]
    kept = man["shards"][first]
    man["shards"] = {first: kept}
    json.dump(man, open(man_path, "w"))
    logs = []
    again = xtok.ensure(reader, t, s, "student-xtok", True, logs.append)
    assert "aligning 16 cached rows" in logs[0]
    assert again.shards[first] == kept
    path = os.path.join(a.dir, kept["file"])
    with open(path, "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\x00\x01\x02")
    with pytest.raises(CacheError, match="sha256"):
        xtok.ensure(reader, t, s, "student-xtok", True, lambda m: None)


def test_chunk_loss_needs_the_next_token_logprobs(tmp_path):
    with pytest.raises(ConfigError, match="cache.next_logprob=true"):
        fit(tmp_path, **{"loss.xtok": "chunk"})


@pytest.fixture(scope="module")
def byte_level_teacher(tmp_path_factory):
    """A tiny random teacher of the byte-level family (student-xtok's tokenizer), made here."""
    import shutil

    from conftest import make_model

    d = tmp_path_factory.mktemp("bl") / "teacher"
    make_model(str(d), vocab=4096, dim=16, layers=1, seed=3, sharpen=3.0)
    for name in os.listdir(os.path.join(W, "student-xtok")):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(W, "student-xtok", name), d / name)
    return str(d)


def mixed(tmp, teacher2, **extra):
    cache2 = str(tmp / "cache2")
    if not os.path.isdir(cache2):
        api.build_cache(load_config(None, overrides(tmp, **{
            "teacher.model": teacher2, "student.model": os.path.join(W, "student"),
            "cache.dir": cache2})), **QUIET)
    return load_config(None, overrides(tmp, **{
        "student.model": os.path.join(W, "student"), "cache.mix": f"[{cache2}]",
        "cache.mix_weights": "[0.5,0.5]", **extra}))


def test_teachers_of_two_tokenizers_mix_in_one_run(tmp_path, byte_level_teacher, monkeypatch):
    from mlxdistill import multi
    from test_train import _weights, interrupted_at

    picks = [multi.step_teacher(0, s, [0.5, 0.5]) for s in range(6)]
    assert 0 < sum(picks) < 6  # both teachers train in these steps (seed 0)
    assert multi.steps_per_teacher(0, 6, [0.5, 0.5]) == [picks.count(0), picks.count(1)]
    cfg = mixed(tmp_path, byte_level_teacher)
    logs = []
    api.fit(cfg, quiet=True, log=logs.append)
    assert any("multi-teacher across tokenizers: 2 caches" in m for m in logs), logs
    assert any("another tokenizer than the teacher of" in m and "cache2" in m for m in logs)
    kds = [r["kd"] for r in metrics(cfg) if "kd" in r]
    assert kds and all(np.isfinite(k) and k > 0 for k in kds)
    # resumed mid-run, each teacher's stream continues where it stopped
    cfg_b = mixed(tmp_path, byte_level_teacher, **{"run.dir": str(tmp_path / "run_b")})
    interrupted_at(cfg_b, 5, monkeypatch)
    api.fit(cfg_b, **QUIET)
    wa, wb = _weights(cfg.run.dir), _weights(cfg_b.run.dir)
    for k in wa:
        assert np.allclose(np.array(wa[k]), np.array(wb[k]), atol=1e-6), k
    with pytest.raises(ConfigError, match="cache.mix_mode=weights"):
        api.fit(mixed(tmp_path, byte_level_teacher, **{"cache.mix_mode": "confidence",
                                                       "run.dir": str(tmp_path / "run_c")}),
                **QUIET)


def test_plan_counts_the_cross_tokenizer_cost(tmp_path):
    same = api.plan(load_config(None, overrides(tmp_path, **{
        "student.model": os.path.join(W, "student")})))
    cfg = load_config(None, overrides(tmp_path, **{"loss.xtok": "hybrid"}))
    cross = api.plan(cfg, probe=True)
    assert same["cross_tokenizer"] is None and cross["cross_tokenizer"] == "hybrid"
    assert cross["cache"]["aligned_bytes_per_token"] == 14
    assert cross["cache"]["disk_bytes"] > same["cache"]["disk_bytes"]
    assert cross["training"]["parts"]["logits"] > same["training"]["parts"]["logits"]
    # the probe ran the hybrid loss's step: its measured peak is in the estimate's range
    t = cross["training"]
    assert 0.5 < t["measured_peak_bytes"] / t["mlx_bytes"] < 2.0, t


def test_two_ranks_align_and_match_one_process(tmp_path):
    from test_distributed import launch
    from test_train import _weights

    common = {"train.iters": 3, "train.final_eval": "false"}
    one = load_config(None, overrides(tmp_path / "one", **common, **{"train.grad_accum": 2}))
    api.fit(one, **QUIET)
    p = launch(["train", *overrides(tmp_path / "two", **common)])
    assert "data parallel: 2 ranks, 2 rows each" in p.stdout
    assert p.stdout.count("aligning 24 cached rows") == 1, p.stdout  # rank 0 aligns
    wa, wb = _weights(one.run.dir), _weights(str(tmp_path / "two" / "run"))
    for k in wa:
        assert np.allclose(np.array(wa[k]), np.array(wb[k]), atol=1e-5), k


def test_online_teacher_of_another_tokenizer_is_told_which_loss_to_pick(tmp_path):
    from click.testing import CliRunner
    from test_cli import assert_one_line_error

    from mlxdistill.cli import main

    res = CliRunner().invoke(main, ["train", "-q", *overrides(tmp_path, **{
        "teacher.mode": "online"})])
    assert_one_line_error(res, "tokenizers differ", "teacher.mode: cache", "loss.xtok: mapped")


def test_batches_carry_the_teachers_targets_at_the_paired_positions(tmp_path, vocabs):
    t, s, tv, sv = vocabs
    cfg = load_config(None, overrides(tmp_path, **{"cache.mode": "topk", "cache.k": 4}))
    reader = cache.ensure(cfg, **QUIET)
    a = xtok.ensure(reader, t, s, "student-xtok", True, lambda m: None)
    aligned = xtok.AlignedReader(reader, a, chunks=False)
    plain = next(reader.batches(4, seed=3, start_step=2))
    got = next(aligned.batches(4, seed=3, start_step=2))
    assert got.input_ids.shape == (4, aligned.width)
    assert got.targets["ids"].shape[1] == aligned.width
    specials = align.special_map(tv, sv)
    for j in range(4):  # the same rows as the cache's batch, in the student's tokens
        row = xtok.aligned_row(plain.input_ids[j], plain.loss_mask[j], tv, sv, specials)
        n = len(row["input_ids"])
        assert got.input_ids[j, :n].tolist() == row["input_ids"].tolist()
        assert (got.loss_mask[j, n:] == 0).all()
        for p in np.nonzero(row["t_pos"] >= 0)[0]:
            q = row["t_pos"][p]
            for k in ("ids", "logprobs", "tail_logprob"):
                assert np.array_equal(got.targets[k][j, p], plain.targets[k][j, q]), k
        assert got.targets["aligned"][j, :n].tolist() == (row["t_pos"] >= 0).tolist()
    assert (got.next_ids == -1).all()  # the student's last position has no label


def test_auto_mixes_in_half_ce_only_when_alpha_is_left_at_zero(tmp_path):
    def a(**kw):
        return xtok.alpha(load_config(None, overrides(tmp_path, **kw)))

    assert a() == xtok.AUTO_ALPHA == 0.5
    assert a(**{"loss.alpha": 0.25}) == 0.25
    assert a(**{"loss.xtok": "mapped"}) == 0.0
    assert xtok.pick(load_config(None, overrides(tmp_path))) == "mapped"
