"""The Python API (mlxdistill.api) returns Python objects, end to end on the tiny pair; and
`train` evaluates only when asked: train.final_eval, a finished run rerun, the size of the
evaluation (data.test_records)."""

import json
import os

import mlx.core as mx
import mlx_lm
import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_overrides

from mlxdistill import api, cache, evaluate, models, trainer
from mlxdistill.cli import main
from mlxdistill.config import Config

QUIET = dict(quiet=True, log=lambda m: None)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A run trained (4 steps) and evaluated once: what the rerun tests start from."""
    d = tmp_path_factory.mktemp("trained")
    cfg = api.load_config(None, tiny_overrides(tiny, d, **{"train.iters": 4}))
    return cfg, api.train(cfg, **QUIET)


def test_python_api_end_to_end(tiny, tmp_path):
    cfg = api.load_config(None, tiny_overrides(tiny, tmp_path, **{
        "train.iters": 4, "train.final_eval": False}))
    assert isinstance(cfg, Config) and cfg.train.iters == 4 and not cfg.train.final_eval

    manifest = api.build_cache(cfg, **QUIET)
    assert manifest["complete"] and manifest["mode"] == "sample"
    assert manifest["rows"] == cache.ShardReader(cfg.cache.dir).rows > 0

    assert api.train(cfg, **QUIET) is None  # final_eval off: nothing evaluated
    assert not os.path.exists(os.path.join(cfg.run.dir, "eval.json"))

    res = api.evaluate(cfg.run.dir, **QUIET)
    with open(os.path.join(cfg.run.dir, "eval.json")) as f:
        assert json.load(f) == json.loads(json.dumps(res))
    for name in ("teacher", "student_before", "student_after"):
        assert 0.0 <= res[name]["accuracy"] <= 1.0 and res[name]["ce"] > 0
    for name in ("student_before", "student_after"):
        assert res[name]["kl"] >= 0 and 0.0 <= res[name]["agree_top1"] <= 1.0
    assert res["tokens"] > 0 and "records" not in res  # every record of data.test

    out = str(tmp_path / "export")
    report = api.export(cfg.run.dir, out, log=lambda m: None)
    assert report["round_trip"]["check"] == "pass" and report["bits"] == 16
    with open(os.path.join(out, "export.json")) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    with open(os.path.join(out, "README.md")) as f:
        meta = yaml.safe_load(f.read().split("---\n")[1])
    assert meta["base_model"] == os.path.basename(tiny["student"])
    assert meta["teacher_model"] == os.path.basename(tiny["teacher"])

    model, tok = api.load_student(cfg.run.dir)
    saved = mlx_lm.load(os.path.join(cfg.run.dir, "model"))[0]  # as mlx_lm users load it
    x = mx.array([tok.encode("the king and the queen speak now", add_special_tokens=False)])
    assert mx.array_equal(model(x), saved(x)).item()


def test_rerun_of_a_finished_run_neither_trains_nor_evaluates(trained, monkeypatch):
    cfg, res = trained
    run = cfg.run.dir
    stamps = {p: os.path.getmtime(os.path.join(run, p))
              for p in ("eval.json", "model", "metrics.jsonl")}

    def forbidden(*a, **k):
        raise AssertionError("a finished run was loaded again")

    # The rerun must not touch the cache, load a model or evaluate.
    monkeypatch.setattr(trainer, "batch_source", forbidden)
    monkeypatch.setattr(models, "load_role", forbidden)
    monkeypatch.setattr(evaluate, "evaluate_run", forbidden)
    logs = []
    again = api.train(cfg, quiet=True, log=logs.append)
    assert again == json.loads(json.dumps(res))
    assert any("is complete" in m and f"mlxdistill eval {run}" in m for m in logs), logs
    assert stamps == {p: os.path.getmtime(os.path.join(run, p)) for p in stamps}


def test_finished_run_without_eval_json_is_evaluated_not_trained(tiny, tmp_path,
                                                                  monkeypatch):
    cfg = api.load_config(None, tiny_overrides(tiny, tmp_path, **{
        "train.iters": 4, "train.final_eval": False}))
    assert api.train(cfg, **QUIET) is None
    monkeypatch.setattr(trainer, "batch_source", lambda *a, **k: pytest.fail("trained again"))
    # final_eval may change on a rerun (it changes nothing trained): now it evaluates.
    on = api.load_config(None, tiny_overrides(tiny, tmp_path, **{"train.iters": 4}))
    res = api.train(on, **QUIET)
    assert res["student_after"]["kl"] >= 0
    assert os.path.isfile(os.path.join(cfg.run.dir, "eval.json"))


def test_more_iters_on_a_finished_run_trains_and_evaluates_again(tiny, tmp_path):
    cfg = api.load_config(None, tiny_overrides(tiny, tmp_path, **{"train.iters": 4}))
    res = api.train(cfg, **QUIET)
    more = api.load_config(None, tiny_overrides(tiny, tmp_path, **{"train.iters": 6}))
    logs = []
    again = api.train(more, quiet=True, log=logs.append)
    assert any("resuming" in m and "step 4" in m for m in logs)
    assert again["student_after"] != res["student_after"]  # evaluated anew, after 6 steps
    with open(os.path.join(cfg.run.dir, "eval.json")) as f:
        assert json.load(f)["student_after"] == again["student_after"]


def test_test_records_evaluates_the_first_records_only(tiny, tmp_path):
    cfg = api.load_config(None, tiny_overrides(tiny, tmp_path, **{
        "train.iters": 2, "train.final_eval": False}))
    api.train(cfg, **QUIET)
    full = api.evaluate(cfg.run.dir, **QUIET)
    first3 = tmp_path / "first3.jsonl"
    with open(cfg.data.test) as f:
        first3.write_text("".join(f.readlines()[:3]))
    on_file = api.evaluate(cfg.run.dir, str(first3), **QUIET)
    capped = api.evaluate(cfg.run.dir, records=3, **QUIET)
    assert capped["records"] == 3 and capped["tokens"] < full["tokens"]
    assert capped["tokens"] == on_file["tokens"]
    for name in ("teacher", "student_before", "student_after"):
        assert capped[name] == on_file[name]
    assert capped["fallback"]["test"]["examples"] == on_file["fallback"]["test"]["examples"] == 3
    assert capped["fallback"]["fit"]["examples"] == 3  # data.valid is capped alike
    assert "first 3 records" in evaluate.format_table(capped)
    # the command line's --records is the same cap
    res = CliRunner().invoke(main, ["eval", cfg.run.dir, "--records", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["student_after"] == capped["student_after"]
    # the config key sets it for train's own evaluation and `eval`'s default
    keyed = api.load_config(None, tiny_overrides(tiny, tmp_path, **{
        "train.iters": 2, "train.final_eval": False, "data.test_records": 3}))
    assert evaluate.evaluate_run(cfg.run.dir, cfg=keyed, **QUIET)["tokens"] == \
        capped["tokens"]
