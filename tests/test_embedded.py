"""The embedded default pair under weights/: real, loadable, small, and distillable."""

import glob
import json
import math
import os

import pytest

from conftest import ROOT
from mlx.utils import tree_flatten

from mlxdistill import api
from mlxdistill.config import load_config

W = os.path.join(ROOT, "weights")


def nonembedding(model):
    return sum(v.size for k, v in tree_flatten(model.parameters()) if "embed_tokens" not in k)


def test_weights_small_and_loadable():
    from mlx_lm.utils import load

    # The shipped weights: the default pair, teacher2 and student-xtok within 40 MiB; the
    # task specialist has a budget of its own (its teacher within 10 MB: test_task.py
    # test_shipped_specialist_pair), and all of weights/ stays within the 50 MB allowed.
    import subprocess

    # weights/ is a link into mlxdistill/embedded/: git lists nothing beyond a link, so ask
    # from the real folder (paths come back relative to it). Files not yet committed count
    # too (the wheel ships them); ignored ones (build leftovers) do not.
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard", "."], capture_output=True,
                             cwd=os.path.realpath(W))
    paths = [os.path.join(W, p) for p in tracked.stdout.decode().split("\0")
             if p] if tracked.returncode == 0 else \
        [p for p in glob.glob(os.path.join(W, "**", "*"), recursive=True) if os.path.isfile(p)]
    assert sum(os.path.getsize(p) for p in paths) <= 50e6
    paths = [p for p in paths if not os.path.relpath(p, W).startswith("specialist" + os.sep)]
    assert paths and sum(os.path.getsize(p) for p in paths) <= 40 * 2**20
    teacher, ttok = load(os.path.join(W, "teacher"))
    student, stok = load(os.path.join(W, "student"))
    assert ttok.get_vocab() == stok.get_vocab()
    assert nonembedding(teacher) >= 8 * nonembedding(student)
    assert 6e6 <= sum(v.size for _, v in tree_flatten(teacher.parameters())) <= 16e6
    text = "HAMLET.\nTo be, or not to be, that is the question:\n  Whether 'tis nobler"
    assert ttok.decode(ttok.encode(text, add_special_tokens=False)) == text


def test_student_of_another_tokenizer_kind():
    """weights/student-xtok, the student of cross-tokenizer distillation: weights/student's
    shape but for vocab_size, over a byte-level BPE (not the teacher's SentencePiece) that
    encodes held-out text without unknowns; its recorded held-out CE beats a uniform model."""
    from pathlib import Path

    from mlx_lm.utils import load, load_tokenizer
    from tokenizers import pre_tokenizers

    from mlxdistill.models import vocab_fingerprint

    x = os.path.join(W, "student-xtok")
    model, tok = load(x)
    student, _ = load(os.path.join(W, "student"))
    ttok = load_tokenizer(Path(W) / "teacher")
    configs = []
    for name in ("student-xtok", "student"):
        with open(os.path.join(W, name, "config.json")) as f:
            configs.append(json.load(f))
    vocab = configs[0].pop("vocab_size")
    configs[1].pop("vocab_size")
    assert configs[0] == configs[1] and vocab == len(tok.get_vocab())
    shapes = [{k: v.shape for k, v in tree_flatten(m.parameters()) if "embed_tokens" not in k}
              for m in (model, student)]
    assert shapes[0] == shapes[1]
    assert model.model.embed_tokens.weight.shape == (vocab, configs[0]["hidden_size"])

    # Byte-level: GPT-2's pre-tokenizer and decoder, every byte a token, no <unk> at all.
    with open(os.path.join(x, "tokenizer.json")) as f:
        tj = json.load(f)
    assert tj["pre_tokenizer"]["type"] == tj["decoder"]["type"] == "ByteLevel"
    assert tj["model"]["type"] == "BPE" and tj["model"]["unk_token"] is None
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(tj["model"]["vocab"])
    assert vocab_fingerprint(tok) != vocab_fingerprint(ttok)
    assert (tok.bos_token, tok.eos_token) == (ttok.bos_token, ttok.eos_token) == ("<s>", "</s>")
    assert (tok.bos_token_id, tok.eos_token_id) == (configs[0]["bos_token_id"],
                                                    configs[0]["eos_token_id"])
    specials = set(tok.all_special_ids)
    with open(os.path.join(ROOT, "data", "test.jsonl")) as f:
        texts = [json.loads(next(f))["text"] for _ in range(3)]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids and not specials & set(ids) and max(ids) < vocab
        assert tok.decode(ids) == text

    with open(os.path.join(W, "build.json")) as f:
        rec = json.load(f)["student-xtok"]
    assert rec["params"] == sum(v.size for _, v in tree_flatten(model.parameters()))
    for split in ("valid", "test"):
        assert math.isfinite(rec[f"{split}_ce"]) and 0 < rec[f"{split}_ce"] < math.log(vocab)
        assert math.isfinite(rec[f"{split}_bpb"]) and rec[f"{split}_bpb"] > 0


def test_recorded_results_meet_the_bars():
    """The figures README reports (results/ce_baseline.json, written by
    scripts/ce_baseline.py) meet the bars of the embedded default: the teacher is >= 0.3 nats
    better than the student trained alone for the default budget, and the distilled student
    beats both its starting point and that plain-CE student on held-out CE and KL."""
    with open(os.path.join(ROOT, "results", "ce_baseline.json")) as f:
        r = json.load(f)
    teacher, before, ce, kd = r["teacher"], r["before"], r["plain_ce"], r["distilled"]
    assert teacher["ce"] <= ce["ce"] - 0.3
    assert kd["ce"] < ce["ce"] and kd["kl"] < ce["kl"]
    assert kd["ce"] < before["ce"] and kd["kl"] < before["kl"]
    assert kd["accuracy"] > before["accuracy"] and kd["agree_top1"] > before["agree_top1"]
    with open(os.path.join(W, "build.json")) as f:
        assert json.load(f)["teacher"]["test_ce"] == pytest.approx(teacher["ce"], abs=0.02)


def test_default_objective_lowers_full_vocab_kl(tmp_path):
    """A few steps of the default objective (16 sampled teacher tokens per position, a short
    warmup so that 40 short steps move the student) lower KL(teacher ‖ student) over the full
    vocabulary on held-out text."""
    test_small = tmp_path / "test.jsonl"
    with open(os.path.join(ROOT, "data", "test.jsonl")) as f:
        test_small.write_text("".join(f.readlines()[:6]))
    cfg = load_config(None, [
        f"cache.dir={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}", "data.max_rows=96",
        "train.iters=40", "train.eval_every=20", "train.save_every=40", "train.eval_rows=2",
        "train.warmup=5", "data.seq_len=128",
        f"data.test={test_small}"])
    assert cfg.cache.mode == "sample" and cfg.loss.name == "forward_kl"
    res = api.train(cfg, quiet=True, log=lambda m: None)
    assert res["student_after"]["kl"] < res["student_before"]["kl"] - 0.05, res
