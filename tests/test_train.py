"""The training loop on the tiny pair: it learns, resumes exactly, and writes outputs that
mlx_lm loads."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_overrides

from mlxdistill import api
from mlxdistill import trainer
from mlxdistill.config import ConfigError, load_config

QUIET = dict(quiet=True, log=lambda m: None)


def run(tiny, tmp, **extra):
    cfg = load_config(None, tiny_overrides(tiny, tmp, **extra))
    return cfg, api.train(cfg, **QUIET)


def test_short_run_lowers_heldout_kl(tiny, tmp_path):
    cfg, res = run(tiny, tmp_path, **{"train.iters": 40, "train.lr": 1e-2})
    before, after = res["student_before"], res["student_after"]
    assert after["kl"] < 0.7 * before["kl"], (before, after)
    assert after["agree_top1"] > before["agree_top1"]
    with open(os.path.join(cfg.run.dir, "eval.json")) as f:
        assert json.load(f)["student_after"]["kl"] == after["kl"]
    recs = [json.loads(line) for line in open(os.path.join(cfg.run.dir, "metrics.jsonl"))]
    assert [r["step"] for r in recs if "val_kl" in r] == [4 * i for i in range(1, 11)]
    assert recs[-1]["val_kl"] < recs[0]["val_kl"]
    assert os.path.isfile(os.path.join(cfg.run.dir, "plots", "loss.png"))


def _weights(path):
    return dict(mx.load(os.path.join(path, "model", "model.safetensors")))


def interrupted_at(cfg, step: int, monkeypatch) -> None:
    """Train `cfg` until `step` is done, then interrupt it (Ctrl-C) as a kill would."""
    real_update = trainer.Progress.update

    def dying_update(self, n=1, units=0.0, postfix=None):
        real_update(self, n, units, postfix)
        if self.done == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Progress, "update", dying_update)
    with pytest.raises(KeyboardInterrupt):
        api.train(cfg, **QUIET)
    monkeypatch.setattr(trainer.Progress, "update", real_update)


def test_resume_after_kill_equals_uninterrupted(tiny, tmp_path, monkeypatch):
    common = {"train.iters": 8, "train.save_every": 4, "train.grad_accum": 2}
    cfg_a, _ = run(tiny, tmp_path / "a", **common)

    cfg_b = load_config(None, tiny_overrides(tiny, tmp_path / "b", **common))
    interrupted_at(cfg_b, 6, monkeypatch)
    assert not os.path.exists(os.path.join(cfg_b.run.dir, "model"))
    logs = []
    api.train(cfg_b, quiet=True, log=logs.append)
    assert any("resuming" in m and "step 4" in m for m in logs)

    wa, wb = _weights(cfg_a.run.dir), _weights(cfg_b.run.dir)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert np.allclose(np.array(wa[k]), np.array(wb[k]), atol=1e-6), k

    def losses(d):
        recs = list(map(json.loads, open(os.path.join(d, "metrics.jsonl"))))
        return [(r["step"], r.get("loss", 0.0), r.get("val_kl", 0.0)) for r in recs]

    la, lb = losses(cfg_a.run.dir), losses(cfg_b.run.dir)
    assert [r[0] for r in la] == [r[0] for r in lb] == [4, 8]  # no duplicate after resume
    assert np.allclose(np.array(la), np.array(lb), atol=1e-5)


def test_changed_config_refuses_to_resume(tiny, tmp_path):
    run(tiny, tmp_path, **{"train.iters": 4})
    from mlxdistill.config import ConfigError

    with pytest.raises(ConfigError, match="train.lr"):
        run(tiny, tmp_path, **{"train.iters": 4, "train.lr": 0.5})


@pytest.mark.parametrize("mode", ["lora", "dora"])
def test_adapters_load_in_mlx_lm(tiny, tmp_path, mode):
    from mlx_lm.utils import load

    cfg, _ = run(tiny, tmp_path, **{"train.mode": mode, "train.iters": 6, "train.lora_rank": 4,
                                    "train.lr": 1e-2})
    ac = json.load(open(os.path.join(cfg.run.dir, "adapter_config.json")))
    assert ac["fine_tune_type"] == mode and ac["lora_parameters"]["rank"] == 4
    tuned, _ = load(tiny["student"], adapter_path=cfg.run.dir)
    base, _ = load(tiny["student"])
    x = mx.array([[5, 6, 7, 8, 9, 10]])
    diff = mx.abs(tuned(x) - base(x)).max().item()
    assert diff > 1e-4  # the adapters were trained and are applied


def test_full_mode_saves_mlx_lm_model(tiny, tmp_path):
    from mlx_lm import generate
    from mlx_lm.utils import load

    cfg, _ = run(tiny, tmp_path, **{"train.iters": 4})
    model, tok = load(os.path.join(cfg.run.dir, "model"))
    w = _weights(cfg.run.dir)
    base, _ = load(tiny["student"])
    assert mx.abs(w["model.embed_tokens.weight"] - base.model.embed_tokens.weight).max().item() > 0
    generate(model, tok, prompt="the king", max_tokens=5)  # mlx_lm runs it (raises if not)


def test_padded_teacher_vocab_is_sliced(tiny, tmp_path):
    """Same tokenizer, embedding padded to more rows (as Qwen2.5-7B vs 0.5B): logits are
    compared over the shared size instead of refusing the pair."""
    from conftest import make_model

    padded = make_model(str(tmp_path / "padded"), vocab=80, dim=32, layers=1, seed=5,
                        sharpen=4.0)
    cfg, res = run(tiny, tmp_path, **{"teacher.model": padded, "train.iters": 4})
    with open(os.path.join(cfg.cache.dir, "manifest.json")) as f:
        assert json.load(f)["vocab_size"] == 64
    assert np.isfinite(res["student_after"]["kl"])


def test_online_teacher_needs_no_cache(tiny, tmp_path):
    """teacher.mode=online: dense targets from the live teacher each step, no cache written;
    with it the whole loss family is available."""
    cfg, res = run(tiny, tmp_path, **{"teacher.mode": "online", "train.iters": 30,
                                      "train.lr": 1e-2, "loss.name": "jsd"})
    assert not os.path.exists(cfg.cache.dir)
    assert res["student_after"]["kl"] < 0.8 * res["student_before"]["kl"]


def test_compare_teacher_against_itself(tiny):
    """Sanity of the evaluation maths: a model compared with itself has KL 0, agreement 1 and
    the same CE / accuracy / calibration error."""
    from mlx_lm.utils import load

    from mlxdistill import data as data_mod
    from mlxdistill.evaluate import compare

    teacher, tok = load(tiny["teacher"])
    packed = data_mod.pack(tiny["test"], tok, 32)
    res = compare(teacher, {"same": teacher}, packed, 64)
    t, s = res["teacher"], res["same"]
    assert abs(s["kl"]) < 1e-5 and s["agree_top1"] == 1.0 and s["agree_top5"] == 1.0
    assert s["ce"] == t["ce"] and s["ece"] == t["ece"] and 0.0 <= t["ece"] <= 1.0
    assert res["tokens"] == int(packed.loss_mask.sum())  # every trained position counted


def test_second_train_on_a_busy_run_dir_refuses(tiny, tmp_path):
    import subprocess

    from mlxdistill.config import ConfigError
    from mlxdistill.trainer import RunLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(["sleep", "30"])
    try:
        (run_dir / ".lock").write_text(str(holder.pid))
        with pytest.raises(ConfigError, match=f"in use by process {holder.pid}"):
            run(tiny, tmp_path, **{"train.iters": 2})
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and the run proceeds, then releases it
    cfg, res = run(tiny, tmp_path, **{"train.iters": 2})
    assert res is not None and not (run_dir / ".lock").exists()
    with RunLock(str(run_dir)):
        assert (run_dir / ".lock").read_text() == str(os.getpid())


def test_on_policy_gkd_runs_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    """loss.lmbda=0.5 with the live teacher (GKD with JSD): about half the steps train on
    student-written continuations; a killed run resumes to the same weights."""
    from mlxdistill import onpolicy

    common = {"teacher.mode": "online", "loss.lmbda": 0.5, "loss.name": "jsd",
              "train.iters": 8, "train.save_every": 4, "train.report_every": 1}
    calls = []
    real = onpolicy.on_policy_batch

    def spy(model, vocab, x):
        ids, mask, labels = real(model, vocab, x)
        calls.append((np.array(x), np.array(ids), np.array(mask)))
        return ids, mask, labels

    monkeypatch.setattr(onpolicy, "on_policy_batch", spy)
    cfg_a, _ = run(tiny, tmp_path / "a", **common)
    n_on = sum(onpolicy.is_on_policy(0.5, 0, s) for s in range(8))
    assert len(calls) == n_on and 0 < n_on < 8
    x, ids, mask = calls[0]
    half = x.shape[1] // 2
    assert (ids[:, :half] == x[:, :half]).all() and (ids[:, half:] != x[:, half:]).any()
    assert ids.max() < 64 and mask[:, :half - 1].sum() == 0 and mask[:, half - 1:].all()
    recs = list(map(json.loads, open(os.path.join(cfg_a.run.dir, "metrics.jsonl"))))
    assert recs[-1]["on_policy_steps"] == n_on
    # An on-policy step has no hard labels: its CE is absent from the record, not a 0 that
    # would read as a perfect score; the other steps log theirs, and the plots still draw.
    for r in recs:
        if onpolicy.is_on_policy(0.5, 0, r["step"] - 1):
            assert "ce" not in r and r["kd"] > 0, r
        else:
            assert r["ce"] > 0, r
    assert os.path.isfile(os.path.join(cfg_a.run.dir, "plots", "loss.png"))

    cfg_b = load_config(None, tiny_overrides(tiny, tmp_path / "b", **common))
    interrupted_at(cfg_b, 6, monkeypatch)
    api.train(cfg_b, **QUIET)
    wa, wb = _weights(cfg_a.run.dir), _weights(cfg_b.run.dir)
    for k in wa:
        assert np.array_equal(np.array(wa[k]), np.array(wb[k])), k


def test_on_policy_needs_the_live_teacher(tiny, tmp_path):
    with pytest.raises(ConfigError, match="loss.lmbda=0.5 .*teacher.mode=online"):
        load_config(None, tiny_overrides(tiny, tmp_path, **{"loss.lmbda": 0.5}))


def test_lora_run_loads_from_any_directory(tiny, tmp_path, monkeypatch):
    """A LoRA run trained with relative paths: its adapter_config.json names a base model
    that mlx_lm loads from any directory, and eval and export of the run work from there."""
    import shutil

    from click.testing import CliRunner
    from mlx_lm.utils import load

    from mlxdistill.cli import main

    project = tmp_path / "project"
    project.mkdir()
    for name in ("teacher", "student", "train.jsonl", "valid.jsonl", "test.jsonl"):
        copy = shutil.copytree if os.path.isdir(tiny["dir"] / name) else shutil.copy
        copy(tiny["dir"] / name, project / name)
    monkeypatch.chdir(project)
    rel = {"teacher.model": "teacher", "student.model": "student", "data.train": "train.jsonl",
           "data.valid": "valid.jsonl", "data.test": "test.jsonl", "cache.dir": "cache",
           "run.dir": "runs/lora", "train.mode": "lora", "train.iters": 4,
           "train.lora_rank": 4, "train.lr": 1e-2}
    run(tiny, project, **rel)
    run_dir = str(project / "runs" / "lora")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    base = json.load(open(os.path.join(run_dir, "adapter_config.json")))["model"]
    assert base == str(project / "student")
    tuned, _ = load(base, adapter_path=run_dir)
    plain, _ = load(base)
    x = mx.array([[5, 6, 7, 8]])
    assert mx.abs(tuned(x) - plain(x)).max().item() > 1e-4
    res = CliRunner().invoke(main, ["eval", run_dir, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["data"] == str(project / "test.jsonl")
    res = CliRunner().invoke(main, ["export", run_dir, "-o", "exported"])
    assert res.exit_code == 0, res.output
    assert os.path.isfile(elsewhere / "exported" / "model.safetensors")


def test_logged_peak_is_the_training_loops_own(tiny, tmp_path, monkeypatch):
    """peak_mem_gb is the peak of the training loop: the teacher that a first run loads once
    for the validation targets (here one of 33 MB, far above the tiny student's step) is
    not in it, so a first run logs what a run without validation targets and a resumed run
    log."""
    from conftest import make_model

    big = make_model(str(tmp_path / "big"), dim=640, layers=2, seed=3, sharpen=4.0)
    common = {"teacher.model": big, "cache.dir": str(tmp_path / "cache"), "train.iters": 4,
              "train.save_every": 2, "train.report_every": 2}

    def peaks(d):
        return [r["peak_mem_gb"] for r in map(json.loads, open(os.path.join(d, "metrics.jsonl")))]

    def fresh_fit(cfg):
        mx.reset_peak_memory()  # each run as if in a process of its own
        trainer.fit(cfg, **QUIET)

    first = load_config(None, tiny_overrides(tiny, tmp_path / "first", **common))
    fresh_fit(first)
    no_eval = load_config(None, tiny_overrides(tiny, tmp_path / "no_eval", **common,
                                               **{"train.eval_rows": 0}))
    fresh_fit(no_eval)
    resumed = load_config(None, tiny_overrides(tiny, tmp_path / "resumed", **common))
    mx.reset_peak_memory()
    interrupted_at(resumed, 3, monkeypatch)  # after the checkpoint of step 2
    logs = []
    mx.reset_peak_memory()
    trainer.fit(resumed, quiet=True, log=logs.append)
    assert any("resuming" in m and "step 2" in m for m in logs)
    a, b, c = peaks(first.run.dir), peaks(no_eval.run.dir), peaks(resumed.run.dir)
    assert len(a) == len(b) == len(c) == 2
    assert max(a + c) - min(b) <= 0.002 and max(b) - min(a + c) <= 0.002, (a, b, c)


def test_the_trained_chat_template_ships_with_the_student(tiny, tmp_path):
    """A run trained with data.chat_template writes it into model/ and into the export, so
    mlx_lm and an app render prompts as the student was trained."""
    from mlx_lm.utils import load

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    cfg = load_config(None, tiny_overrides(tiny, tmp_path, **{
        "train.iters": 2, "train.final_eval": False, "data.chat_template": template}))
    api.train(cfg, **QUIET)
    _, tok = load(os.path.join(cfg.run.dir, "model"))
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "<user>hi"
    report = api.export(cfg.run.dir, str(tmp_path / "out"), log=lambda m: None)
    assert report["round_trip"]["check"] == "pass"
    with open(tmp_path / "out" / "tokenizer_config.json") as f:
        assert json.load(f)["chat_template"] == template
