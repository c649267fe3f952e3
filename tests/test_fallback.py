"""Cloud fallback: deferral curve, threshold choice, and what `eval` / `export` write."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_overrides

from mlxdistill import api
from mlxdistill import fallback
from mlxdistill.cli import main
from mlxdistill.config import load_config


def _random_case(n=40, seed=0):
    rng = np.random.default_rng(seed)
    conf = np.round(rng.normal(size=n), 1)  # rounded: ties on purpose
    qs = rng.uniform(0.0, 0.6, n)
    qt = np.clip(qs + rng.normal(0.15, 0.1, n), 0, 1)
    return conf, qs, qt


def test_curve_endpoints_are_student_and_teacher():
    conf, qs, qt = _random_case()
    c = fallback.deferral_curve(conf, qs, qt)
    assert c["deferred"][0] == 0.0 and c["quality"][0] == pytest.approx(qs.mean())
    assert c["deferred"][-1] == 1.0 and c["quality"][-1] == pytest.approx(qt.mean())
    assert c["threshold"][0] is None and not c["always"][0] and c["always"][-1]
    assert np.all(np.diff(c["deferred"]) > 0)


def test_threshold_rule_reproduces_each_point():
    """An app applying "defer when conf < threshold" gets exactly the curve's fraction and
    quality, ties included."""
    conf, qs, qt = _random_case(seed=1)
    c = fallback.deferral_curve(conf, qs, qt)
    assert len(c["deferred"]) == len(set(conf.tolist())) + 1  # one cut per distinct value
    for d, q, t in list(zip(c["deferred"], c["quality"], c["threshold"]))[1:-1]:
        defer = conf < t
        assert defer.mean() == pytest.approx(d)
        assert np.where(defer, qt, qs).mean() == pytest.approx(q)


def test_a_perfect_signal_defers_the_worst_first():
    qs = np.array([0.1, 0.5, 0.2, 0.9])
    qt = np.array([0.8, 0.6, 0.7, 0.9])
    c = fallback.deferral_curve(qs, qs, qt)  # confidence = the student's own quality
    gains = np.diff(np.array(c["quality"]) * len(qs))
    assert np.allclose(gains, [0.7, 0.5, 0.1, 0.0])  # largest improvement first
    assert fallback.gain_over_random(c) > 0
    assert fallback.gain_over_random(fallback.deferral_curve(-qs, qs, qt)) < 0  # worst first
    flat = fallback.deferral_curve(np.zeros(4), qs, qt)  # one cut: all or nothing
    assert fallback.gain_over_random(flat) == pytest.approx(0.0)


def test_threshold_choice_is_monotone_in_the_target():
    conf, qs, qt = _random_case(seed=2)
    c = fallback.deferral_curve(conf, qs, qt)
    lo = fallback.choose_threshold(c, qs.mean() - 0.01)
    assert lo["threshold"] is None and lo["deferred_fraction"] == 0 and lo["reached"]
    assert lo["rule"] == "never defer"
    hi = fallback.choose_threshold(c, qt.mean() + 0.5)  # unreachable: everything deferred
    assert hi["always_defer"] and hi["deferred_fraction"] == 1.0 and not hi["reached"]
    prev_frac, prev_thr = -1.0, -np.inf
    for target in np.linspace(qs.mean(), qt.mean(), 25):
        r = fallback.choose_threshold(c, target)
        assert r["reached"] and r["expected_quality"] >= target - 1e-6
        assert r["deferred_fraction"] >= prev_frac
        thr = np.inf if r["always_defer"] else -np.inf if r["threshold"] is None \
            else r["threshold"]
        assert thr >= prev_thr
        prev_frac, prev_thr = r["deferred_fraction"], thr
        # the least deferral that reaches the target: the point before it does not
        i = c["deferred"].index(r["deferred_fraction"])
        assert i == 0 or max(c["quality"][:i]) < target


def test_bad_curve_input():
    with pytest.raises(ValueError):
        fallback.deferral_curve([0.1, 0.2], [0.1], [0.2, 0.3])


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("fallback")
    cfg = load_config(None, tiny_overrides(tiny, d, **{"train.iters": 4}))
    api.train(cfg, quiet=True, log=lambda m: None)
    return cfg


def test_eval_writes_curve_with_exact_endpoints(full_run, tiny):
    import mlx.core as mx
    from mlx_lm.utils import load as mlx_load

    from mlxdistill import data as data_mod

    run_dir = full_run.run.dir
    res = CliRunner().invoke(main, ["eval", run_dir, "--json"])
    assert res.exit_code == 0, res.output
    fb = json.loads(res.stdout)["fallback"]
    assert fb == json.load(open(os.path.join(run_dir, "eval.json")))["fallback"]
    assert os.path.isfile(os.path.join(run_dir, "plots", "deferral.png"))
    pe = fb["per_example"]
    n = fb["examples"]
    assert n == 10 and all(len(pe[k]) == n for k in ("confidence", "margin", "student",
                                                       "teacher", "tokens"))
    assert all(c <= 0 for c in pe["confidence"]) and all(m >= 0 for m in pe["margin"])
    for sig, curve in fb["curves"].items():
        assert curve["quality"][0] == pytest.approx(fb["student_quality"], abs=1e-5)
        assert curve["quality"][-1] == pytest.approx(fb["teacher_quality"], abs=1e-5)
    assert fb["student_quality"] == pytest.approx(np.mean(pe["student"]), abs=1e-5)
    # the teacher's per-example accuracy, recomputed by hand for the first record
    teacher, tok = mlx_load(tiny["teacher"])
    rec = data_mod.read_records(tiny["test"])[0]
    ids = tok.encode(rec["text"], add_special_tokens=False)[:full_run.data.seq_len + 1]
    pred = mx.argmax(teacher(mx.array([ids[:-1]]))[0], -1)
    acc = (pred == mx.array(ids[1:])).astype(mx.float32).mean().item()
    assert pe["teacher"][0] == pytest.approx(acc, abs=1e-5)
    assert pe["tokens"][0] == len(ids) - 1
    table = CliRunner().invoke(main, ["eval", run_dir]).output
    assert "cloud fallback (10 examples" in table and "90% of the teacher: defer" in table
