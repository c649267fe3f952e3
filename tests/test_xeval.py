"""Tokenizer-free evaluation (xeval.py, evaluate.compare / compare_cross): next-byte
distributions against a numpy reference, a model against itself, bits per byte of a student
of another tokenizer computed directly, and `eval` of a cross-tokenizer run directory. On the
embedded weights (teacher: SentencePiece BPE; student-xtok: byte-level BPE)."""

from __future__ import annotations

import json
import math
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlxdistill import align, api, evaluate, losses, models, task, xeval
from mlxdistill import data as data_mod
from mlxdistill.rundir import RunDir

from conftest import ROOT

WEIGHTS = os.path.join(ROOT, "weights")
TEXT = "Good night, sweet prince: and flights of angels sing thee to thy rest!"


@pytest.fixture(scope="module")
def teacher():
    return models.load(os.path.join(WEIGHTS, "teacher"), "teacher")


@pytest.fixture(scope="module")
def xtok():
    return models.load(os.path.join(WEIGHTS, "student-xtok"), "student")


def _one_record(tmp_path, text=TEXT) -> str:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    return str(path)


def test_byte_buckets_match_numpy():
    rng = np.random.default_rng(0)
    pieces = [b"", b" the", b"a", b"\xe2\x96", b" ", b"\n", b"", b" x", b"ab", b"\xff"]
    size = 12  # two logits rows past the tokenizer
    lp = np.log(rng.dirichlet(np.ones(size), size=(2, 3))).astype(np.float32)
    fresh = np.array([False, True, False, True, True, False])

    def first(p, strip):
        p = p[1:] if strip and p[:1] == b" " else p
        return p[0] if p else 256

    ref = np.zeros((6, 257))
    for k, row in enumerate(np.exp(lp).reshape(6, size)):
        for i in range(size):
            ref[k, first(pieces[i] if i < len(pieces) else b"", fresh[k])] += row[i]
    b = xeval.Buckets(mx.array(xeval.first_byte_matrix(pieces, size)),
                      mx.array(xeval.first_byte_matrix(pieces, size, strip_space=True)))
    got = np.array(xeval.byte_probs(mx.array(lp), np.arange(6), b, fresh))
    assert np.allclose(got, ref, atol=1e-6)
    assert np.allclose(got.sum(-1), 1.0, atol=1e-5)
    # only the positions asked for, in their order
    sub = np.array(xeval.byte_probs(mx.array(lp), np.array([4, 1]), b, fresh[[4, 1]]))
    assert np.allclose(sub, ref[[4, 1]], atol=1e-6)
    assert xeval.byte_probs(mx.array(lp), np.zeros(0, np.int64), b).shape == (0, 257)

    # agreement of the argmax buckets and KL(p ‖ q), a bucket empty on one side adding 0
    p, q = ref[:3], ref[3:]
    q[0, p[0].argmax()] = 0.0
    agree, kl = xeval.byte_terms(mx.array(p.astype(np.float32)), mx.array(q.astype(np.float32)))
    both = (p > 0) & (q > 0)
    ref_kl = np.where(both, p * (np.log(np.where(both, p, 1)) - np.log(np.where(both, q, 1))), 0)
    assert agree.item() == int((p.argmax(-1) == q.argmax(-1)).sum())
    assert abs(kl.item() - ref_kl.sum()) < 1e-4


def test_model_against_itself_agrees_on_every_byte(teacher, tmp_path):
    model, tok, cfg = teacher
    vocab = models.logits_size(cfg)
    pieces = align.vocab(tok).pieces
    packed = data_mod.pack(_one_record(tmp_path, TEXT + " " + TEXT), tok, 32, True)
    res = evaluate.compare(model, {"same": model}, packed, vocab,
                           byte_lens=xeval.piece_lengths(pieces, vocab),
                           buckets=xeval.first_byte_matrix(pieces, vocab))
    s = res["same"]
    assert s["byte_agree"] == 1.0 and abs(s["byte_kl"]) < 1e-5
    assert s["kl"] < 1e-5 and "byte_agree" not in res["teacher"]
    # without the buckets (a tokenizer not mapped to bytes) the metrics are left out
    assert "byte_agree" not in evaluate.compare(model, {"same": model}, packed, vocab)["same"]


def test_cross_student_bits_per_byte_equal_a_direct_computation(teacher, xtok, tmp_path):
    t_model, ttok, tcfg = teacher
    s_model, stok, scfg = xtok
    t_size, s_size = models.logits_size(tcfg), models.logits_size(scfg)
    packed = data_mod.pack(_one_record(tmp_path), ttok, 64, True)
    res = evaluate.compare_cross(t_model, {"x": s_model}, packed, ttok, stok, t_size, s_size)

    # the student's own tokens of the text, then its EOS (the teacher's EOS, mapped)
    ids = list(stok.encode(TEXT, add_special_tokens=False)) + [stok.eos_token_id]
    lp = np.array(losses.log_softmax(s_model(mx.array([ids]))[0]))
    nats = -sum(float(lp[j, ids[j + 1]]) for j in range(len(ids) - 1))
    nbytes = sum(len(align.vocab(stok).pieces[i]) for i in ids[1:])
    assert res["student_tokens"] == len(ids) - 1 and res["student_bytes"] == nbytes
    assert nbytes == len(TEXT.encode()) - len(align.vocab(stok).pieces[ids[0]])
    assert abs(res["x"]["ce"] - nats / (len(ids) - 1)) < 1e-3
    assert abs(res["x"]["bpb"] - nats / math.log(2) / nbytes) < 1e-3
    # the teacher is scored exactly as the one-tokenizer evaluation scores it
    same = evaluate.compare(t_model, {}, packed, t_size,
                            byte_lens=xeval.piece_lengths(evaluate.token_pieces(ttok), t_size))
    assert res["teacher"] == same["teacher"] and res["tokens"] == same["tokens"]
    assert res["bytes"] == same["bytes"]
    # next-byte metrics at the shared boundaries; no same-vocabulary metrics
    assert 0 < res["aligned"] <= min(res["tokens"], res["student_tokens"])
    assert 0.0 <= res["x"]["byte_agree"] <= 1.0 and res["x"]["byte_kl"] >= 0.0
    assert not {"kl", "agree_top1", "agree_top5"} & set(res["x"])


def test_eval_of_a_cross_tokenizer_run(xtok, tmp_path):
    """A run directory whose student has another tokenizer than the teacher: eval scores
    each model on its own tokens, reports the next-byte metrics and no KL, generates each
    model's answers with its own tokenizer, and grades the cloud-fallback rule by task
    accuracy only (next-token accuracies over two tokenizers do not compare)."""
    s_model, stok, _ = xtok
    with open(os.path.join(ROOT, "data", "test.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"][:300] for _, line in zip(range(3), f)]
    prompts = [{"prompt": "HAMLET. To be, or not"}, {"prompt": "Enter the KING"}]
    ov = {"generate.max_tokens": 6, "generate.eval_prompts": 2}
    g = api.load_config(None, [f"{k}={v}" for k, v in ov.items()]).generate
    said = task.greedy_answers(s_model, stok, prompts, g)  # the student, in its own tokens
    test = tmp_path / "test.jsonl"
    with open(test, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
        for p, a in zip(prompts, said):
            f.write(json.dumps({**p, "completion": " be.", "answer": a.strip()}) + "\n")
    run_dir = tmp_path / "run"
    cfg = api.load_config(None, [f"{k}={v}" for k, v in {
        "teacher.model": os.path.join(WEIGHTS, "teacher"),
        "student.model": os.path.join(WEIGHTS, "student-xtok"),
        "data.train": test, "data.valid": test, "data.test": test, "data.seq_len": 64,
        "run.dir": run_dir, "train.mode": "full", **ov}.items()])
    run = RunDir(str(run_dir))
    os.makedirs(run_dir)
    run.save_config(cfg)
    shutil.copytree(os.path.join(WEIGHTS, "student-xtok"), run.model)

    res = api.evaluate(str(run_dir), quiet=True, log=lambda m: None)
    assert json.load(open(run.eval_json)) == json.loads(json.dumps(res))
    for name in ("teacher", "student_before", "student_after"):
        assert res[name]["bpb"] > 0 and res[name]["ce"] > 0
    for name in ("student_before", "student_after"):
        assert 0.0 <= res[name]["byte_agree"] <= 1.0 and res[name]["byte_kl"] >= 0.0
        assert "kl" not in res[name] and "agree_top1" not in res[name]
        assert set(res["retention"][name]) == {"bpb_pct"}
    assert res["student_before"] == res["student_after"]  # the same weights
    fb = res["fallback"]  # data.valid is the test file itself: fitted on half, reported on half
    assert fb["quality"] == "task accuracy (exact verifier)" and fb["signal"] in fb["signals"]
    assert fb["fit"]["examples"] == fb["test"]["examples"] == 1
    assert fb["data"]["report"].startswith("the other half of")
    assert any(w.startswith("data.valid is") for w in fb["warnings"])
    assert os.path.exists(os.path.join(run.plots, "deferral.png"))
    t = res["task"]
    assert t["prompts"] == 2 and t["student_after"]["accuracy"] == 1.0
    table = evaluate.format_table(res)
    assert "next-byte agreement" in table and "retention: bits per byte %" in table
    assert "retention: CE %" not in table and "cloud fallback, graded by task accuracy" in table
    assert "student tokens" in table
    # rows that need one vocabulary are left out, and the per-token rows are said to be so
    assert not any(line.startswith(("KL(", "top-1", "top-5")) for line in table.splitlines())
    assert "per each model's own token" in table
