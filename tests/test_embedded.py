"""The embedded default pair under weights/: real, loadable, small, and distillable."""

import glob
import json
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

    # The committed weights: the default pair (and teacher2) within 40 MB; the task
    # specialist has a budget of its own (its teacher within 10 MB: test_task.py
    # test_shipped_specialist_pair).
    import subprocess

    # weights/ is a link into mlxdistill/embedded/: git lists nothing beyond a link, so ask
    # from the real folder (paths come back relative to it).
    tracked = subprocess.run(["git", "ls-files", "-z", "."], capture_output=True,
                             cwd=os.path.realpath(W))
    paths = [os.path.join(W, p) for p in tracked.stdout.decode().split("\0")
             if p] if tracked.returncode == 0 else \
        [p for p in glob.glob(os.path.join(W, "**", "*"), recursive=True) if os.path.isfile(p)]
    paths = [p for p in paths if not os.path.relpath(p, W).startswith("specialist" + os.sep)]
    assert paths and sum(os.path.getsize(p) for p in paths) <= 40 * 2**20
    teacher, ttok = load(os.path.join(W, "teacher"))
    student, stok = load(os.path.join(W, "student"))
    assert ttok.get_vocab() == stok.get_vocab()
    assert nonembedding(teacher) >= 8 * nonembedding(student)
    assert 6e6 <= sum(v.size for _, v in tree_flatten(teacher.parameters())) <= 16e6
    text = "HAMLET.\nTo be, or not to be, that is the question:\n  Whether 'tis nobler"
    assert ttok.decode(ttok.encode(text, add_special_tokens=False)) == text


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
