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
    assert lo["rule_text"] == "never defer"
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


# ------------------------------------------------ fitted on one split, reported on another

def _examples(conf, qs, qt, name="s"):
    return {name: list(map(float, conf)), "student": list(map(float, qs)),
            "teacher": list(map(float, qt))}


def test_threshold_is_fitted_on_valid_and_applied_to_test():
    """The threshold comes from the fit examples; the reported figures are what that fixed
    threshold does on the test examples, not what a threshold fitted there would do."""
    fit = _examples(range(10), [0] * 10, [1] * 10)  # 90 % of the teacher: defer 9 of 10
    test = _examples(range(0, 20, 2), [0] * 10, [1] * 10)
    fb = fallback.summarize(test, fit, "q", {"s": "m"}, {"fit": "v", "report": "t"},
                            targets=(0.9,))
    r = fb["thresholds"]["0.9"]
    assert r["threshold"] == 8.5 and r["rule_text"] == "defer when s < 8.5"
    assert r["fit"] == {"deferred_fraction": 0.9, "quality": 0.9, "reached": True}
    # on test conf < 8.5 holds for 0, 2, 4, 6, 8: half deferred, half the teacher's quality
    t = r["test"]
    assert t["deferred_fraction"] == 0.5 and t["quality"] == 0.5
    assert t["fraction_of_teacher"] == 0.5 and not t["reached"]
    assert t["gain_at_rate"] == 0.0  # a student that is always wrong: no better than random
    # fitted on the test examples themselves it would have claimed 90 % at 90 % deferred
    own = fallback.choose_threshold(fallback.deferral_curve(test["s"], test["student"],
                                                            test["teacher"]), 0.9)
    assert own["threshold"] == 17.0 and own["deferred_fraction"] == 0.9
    assert fb["data"] == {"fit": "v", "report": "t"} and fb["defer_when"] == "below"


def test_gain_at_the_chosen_rate_by_hand():
    fit = _examples([0.4, 0.5], [0, 1], [1, 1])  # defer the first: threshold 0.45
    conf = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    qs = [0, 0, 1, 0, 1, 1, 1, 1]
    qt = [1, 1, 1, 0, 1, 1, 0, 1]
    fb = fallback.summarize(_examples(conf, qs, qt), fit, "q", {"s": "m"},
                            {"fit": "v", "report": "t"}, targets=(0.9,))
    r = fb["thresholds"]["0.9"]
    assert r["threshold"] == pytest.approx(0.45)
    t = r["test"]
    # the first four deferred: system [1, 1, 1, 0, 1, 1, 1, 1]
    assert t["deferred"] == 4 and t["deferred_fraction"] == 0.5
    assert t["quality"] == 7 / 8 and t["student_quality"] == 5 / 8
    assert t["teacher_quality"] == 6 / 8
    assert t["random_quality"] == pytest.approx(5 / 8 + 0.5 * (6 / 8 - 5 / 8))
    assert t["gain_at_rate"] == pytest.approx(7 / 8 - 0.6875)
    assert t["fraction_of_teacher"] == pytest.approx(7 / 6, abs=1e-6)
    # the whole-curve gain is reported beside it, per signal
    curve = fallback.deferral_curve(conf, qs, qt)
    assert fb["test"]["curves"]["s"]["gain_over_random"] == pytest.approx(
        fallback.gain_over_random(curve), abs=1e-6)


def test_signal_is_chosen_on_the_fit_split():
    """Signal a ranks the fit examples well and the test examples badly, b the reverse:
    the rule uses a, and the test curves show what that costs."""
    rng = np.random.default_rng(3)
    qs_f, qs_t = rng.integers(0, 2, 60), rng.integers(0, 2, 60)
    fit = {"a": list(qs_f + 0.01 * rng.random(60)), "b": list(-qs_f + 0.01 * rng.random(60)),
           "student": list(qs_f.astype(float)), "teacher": [1.0] * 60}
    test = {"a": list(-qs_t + 0.01 * rng.random(60)), "b": list(qs_t + 0.01 * rng.random(60)),
            "student": list(qs_t.astype(float)), "teacher": [1.0] * 60}
    fb = fallback.summarize(test, fit, "q", {"a": "first", "b": "second"},
                            {"fit": "v", "report": "t"})
    assert fb["signal"] == "a" and fb["signal_meaning"] == "first"
    assert fb["fit"]["gain_over_random"]["a"] > 0 > fb["fit"]["gain_over_random"]["b"]
    curves = fb["test"]["curves"]
    assert curves["a"]["gain_over_random"] < 0 < curves["b"]["gain_over_random"]
    assert fb["thresholds"]["0.9"]["rule_text"].startswith("defer when a <")
    assert fb["thresholds"]["0.9"]["test"]["gain_at_rate"] < 0
    assert fb["warnings"] == []  # 60 examples on each split
    assert fallback.choose_signal(fit, ["b", "a"])[0] == "a"


def test_no_validation_split_fits_on_one_half_and_reports_on_the_other():
    conf, qs, qt = _random_case(n=41)
    fb = fallback.summarize(_examples(conf, qs, qt), None, "q", {"s": "m"},
                            {"fit": None, "report": "t.jsonl"}, why="no data.valid")
    fit, test = fb["per_example"]["fit"], fb["per_example"]["test"]
    assert len(fit["s"]) == 20 and len(test["s"]) == 21
    pairs = sorted(zip(fit["s"] + test["s"], fit["student"] + test["student"]))
    assert pairs == sorted(zip(map(float, conf), map(float, qs)))  # a partition of all 41
    assert fb["data"]["fit"].startswith("a seeded half of t.jsonl")
    assert fb["data"]["report"] == "the other half of t.jsonl"
    assert any(w.startswith("no data.valid: the rule is fitted on a seeded half")
               for w in fb["warnings"])
    again = fallback.summarize(_examples(conf, qs, qt), None, "q", {"s": "m"},
                               {"fit": None, "report": "t.jsonl"})
    assert again["thresholds"] == fb["thresholds"]  # seeded
    one = fallback.summarize(_examples([0.1], [0], [1]), None, "q", {"s": "m"},
                             {"fit": None, "report": "t"})
    assert one["thresholds"] == {} and "no rule" in one["warnings"][-1]
    assert fallback.threshold_for(one, 0.9) is None


def test_small_samples_are_warned_about():
    conf, qs, qt = _random_case(n=70)
    big, small = _examples(conf[:40], qs[:40], qt[:40]), _examples(conf[40:69], qs[40:69],
                                                                   qt[40:69])
    assert len(small["s"]) == fallback.MIN_EXAMPLES - 1
    warned = fallback.summarize(big, small, "q", {"s": "m"}, {"fit": "v", "report": "t"})
    assert len(warned["warnings"]) == 1 and "only 29 examples on the fit split" in \
        warned["warnings"][0]
    warned = fallback.summarize(small, big, "q", {"s": "m"}, {"fit": "v", "report": "t"})
    assert "only 29 examples on the report split" in warned["warnings"][0]
    ok = _examples(conf[40:70], qs[40:70], qt[40:70])
    assert fallback.summarize(big, ok, "q", {"s": "m"}, {"fit": "v", "report": "t"})[
        "warnings"] == []


def test_intervals():
    # Wilson's interval, against published values
    assert fallback.wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert fallback.wilson(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert fallback.wilson(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 400):
        qs, qt = rng.integers(0, 2, n), np.ones(n)
        defer = rng.random(n) < 0.3
        r = fallback.report(defer, qs, qt)
        assert r == fallback.report(defer, qs, qt)  # seeded
        for key in ("quality", "fraction_of_teacher", "gain_at_rate"):
            lo, hi = r[key + "_ci"]
            assert lo <= r[key] <= hi
        lo, hi = r["deferred_fraction_ci"]
        assert lo <= r["deferred_fraction"] <= hi
        assert r["deferred_fraction_ci"] == fallback.wilson(int(defer.sum()), n)
        widths.append(r["quality_ci"][1] - r["quality_ci"][0])
    assert widths[1] < widths[0] / 2  # ten times the examples: about a third of the width
    # a teacher that scores 0 leaves no fraction to keep
    r = fallback.report(np.array([True, False]), [0, 0], [0, 0])
    assert r["fraction_of_teacher"] is None and r["fraction_of_teacher_ci"] is None


def test_export_record_and_card():
    conf, qs, qt = _random_case(n=60)
    fb = fallback.summarize(_examples(conf[:30], qs[:30], qt[:30]),
                            _examples(conf[30:], qs[30:], qt[30:]),
                            fallback.task_quality(None), {"s": "meaning"},
                            {"fit": "valid.jsonl", "report": "test.jsonl"}, targets=(0.8,))
    rec = fallback.threshold_for(fb, 0.8)
    assert {k: rec[k] for k in ("signal", "defer_when", "quality", "target")} == {
        "signal": "s", "defer_when": "below", "quality": "task accuracy (exact verifier)",
        "target": 0.8}
    assert rec["threshold"] == fb["thresholds"]["0.8"]["threshold"]
    assert rec["test"]["gain_at_rate"] == fb["thresholds"]["0.8"]["test"]["gain_at_rate"]
    card = "\n".join(fallback.card_section(rec))
    assert card.startswith("## Cloud fallback") and rec["rule_text"] in card
    assert "gain over random deferral at this share" in card and "valid.jsonl" in card
    assert "whole curve (area)" in card and "95 % interval" in card


# ---------------------------------------------------------------- the signals

def test_answer_signals_by_hand_and_batched(tiny):
    import mlx.core as mx
    from mlx_lm.utils import load as mlx_load

    from mlxdistill import confidence, losses

    model = mlx_load(tiny["student"])[0]
    prompt, answer = [5, 9, 12], [7, 7, 20, 3]
    got = confidence.answer_signals(model, prompt, answer)
    assert set(got) == set(confidence.ANSWER_SIGNALS)
    lp = losses.log_softmax(model(mx.array([prompt + answer]))[0])
    lp = np.array(lp)[len(prompt) - 1:len(prompt) + len(answer) - 1]
    tok = lp[np.arange(len(answer)), answer]
    top2 = np.sort(lp, -1)[:, -2:]
    assert got["mean_logprob"] == pytest.approx(tok.mean(), abs=1e-5)
    assert got["min_logprob"] == pytest.approx(tok.min(), abs=1e-5)
    assert got["min_margin"] == pytest.approx((top2[:, 1] - top2[:, 0]).min(), abs=1e-5)
    ent = -(np.exp(lp) * lp).sum(-1)
    assert got["neg_entropy"] == pytest.approx(-ent.mean(), abs=1e-5)
    # the vocabulary cut an export records, and an empty answer (stopped at once)
    cut = confidence.answer_signals(model, prompt, answer, vocab=30)
    assert cut["neg_entropy"] != got["neg_entropy"]
    empty = confidence.answer_signals(model, prompt, [])
    assert empty["min_margin"] >= 0 and empty["mean_logprob"] == empty["min_logprob"]
    pairs = [(prompt, answer), ([4, 4], []), ([8] * 9, [11, 12]), (prompt, answer[:1])]
    batch = confidence.answer_signals_batch(model, pairs, vocab=30, batch=3)
    for i, (p, a) in enumerate(pairs):
        one = confidence.answer_signals(model, p, a, vocab=30)
        for k, v in one.items():
            assert batch[k][i] == pytest.approx(v, abs=1e-4)
    with pytest.raises(ValueError):
        confidence.answer_signals(model, [], answer)


# ---------------------------------------------------------------- what eval and export write

@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("fallback")
    cfg = load_config(None, tiny_overrides(tiny, d, **{"train.iters": 4}))
    api.train(cfg, quiet=True, log=lambda m: None)
    return cfg


def test_eval_writes_next_token_rule_fitted_on_valid(full_run, tiny):
    import mlx.core as mx
    from mlx_lm.utils import load as mlx_load

    from mlxdistill import data as data_mod

    run_dir = full_run.run.dir
    res = CliRunner().invoke(main, ["eval", run_dir, "--json"])
    assert res.exit_code == 0, res.output
    fb = json.loads(res.stdout)["fallback"]
    assert fb == json.load(open(os.path.join(run_dir, "eval.json")))["fallback"]
    assert os.path.isfile(os.path.join(run_dir, "plots", "deferral.png"))
    assert fb["quality"] == "next-token accuracy against the reference text"
    assert fb["data"]["fit"] == tiny["valid"] and fb["data"]["report"] == tiny["test"]
    assert fb["signal"] in ("confidence", "margin") and fb["defer_when"] == "below"
    pe = fb["per_example"]["test"]
    assert fb["test"]["examples"] == fb["fit"]["examples"] == 10
    assert all(len(pe[k]) == 10 for k in ("confidence", "margin", "student", "teacher",
                                          "tokens"))
    assert all(c <= 0 for c in pe["confidence"]) and all(m >= 0 for m in pe["margin"])
    for curve in fb["test"]["curves"].values():
        assert curve["quality"][0] == pytest.approx(fb["test"]["student_quality"], abs=1e-5)
        assert curve["quality"][-1] == pytest.approx(fb["test"]["teacher_quality"], abs=1e-5)
    # the threshold is the valid split's; its figures are those of the test split
    fit = fb["per_example"]["fit"]
    curve = fallback.deferral_curve(fit[fb["signal"]], fit["student"], fit["teacher"])
    r = fb["thresholds"]["0.9"]
    chosen = fallback.choose_threshold(curve, 0.9 * np.mean(fit["teacher"]))
    assert r["threshold"] == chosen["threshold"] and r["always_defer"] == chosen["always_defer"]
    defer = fallback.deferred(pe[fb["signal"]], r["threshold"], r["always_defer"])
    assert r["test"]["deferred_fraction"] == pytest.approx(defer.mean())
    assert r["test"]["quality"] == pytest.approx(
        np.where(defer, pe["teacher"], pe["student"]).mean(), abs=1e-6)
    assert len(fb["warnings"]) == 2  # 10 examples on each split
    # the teacher's per-example accuracy, recomputed by hand for the first record
    teacher, tok = mlx_load(tiny["teacher"])
    rec = data_mod.read_records(tiny["test"])[0]
    ids = tok.encode(rec["text"], add_special_tokens=False)[:full_run.data.seq_len + 1]
    pred = mx.argmax(teacher(mx.array([ids[:-1]]))[0], -1)
    acc = (pred == mx.array(ids[1:])).astype(mx.float32).mean().item()
    assert pe["teacher"][0] == pytest.approx(acc, abs=1e-5)
    assert pe["tokens"][0] == len(ids) - 1
    table = CliRunner().invoke(main, ["eval", run_dir]).output
    assert "cloud fallback, graded by next-token accuracy" in table
    assert "90% of the teacher on the fit split: " in table
    assert "over random deferral of that share" in table and "warning: only 10" in table


@pytest.fixture(scope="module")
def task_run(tiny, tmp_path_factory):
    """A tiny run whose valid and test records carry answers: the teacher's own greedy
    answer on every other record, something else on the rest."""
    from mlxdistill import models, task

    d = tmp_path_factory.mktemp("fallback_task")
    ov = {"generate.max_tokens": 4, "generate.eval_prompts": 50}
    g = load_config(None, [f"{k}={v}" for k, v in ov.items()]).generate
    teacher, tok, _ = models.load(tiny["teacher"], "teacher")
    words = ["the", "my", "our", "thy", "his", "her"]
    nouns = ["king", "queen", "sea", "ghost", "crown", "storm", "sword", "night"]
    prompts = [{"prompt": f"{w} {n}"} for w in words for n in nouns]  # 48
    said = task.greedy_answers(teacher, tok, prompts, g)
    paths = {}
    for split, part in (("valid", prompts[:14]), ("test", prompts[14:])):
        paths[split] = str(d / f"{split}.jsonl")
        with open(paths[split], "w") as f:
            for i, (p, text) in enumerate(zip(part, said[14 * (split == "test"):])):
                ans = text.strip() if i % 2 == 0 else "not " + text.strip()
                f.write(json.dumps({**p, "completion": " king .", "answer": ans}) + "\n")
    cfg = load_config(None, tiny_overrides(tiny, d, **ov, **{
        "data.valid": paths["valid"], "data.test": paths["test"], "teacher.mode": "online",
        "train.iters": 2}))
    api.train(cfg, quiet=True, log=lambda m: None)
    return cfg, d


def test_task_fallback_in_eval_and_export(task_run, caplog):
    from mlxdistill import confidence

    cfg, d = task_run
    ev = json.load(open(os.path.join(cfg.run.dir, "eval.json")))
    fb, task = ev["fallback"], ev["task"]
    assert fb["quality"] == "task accuracy (exact verifier)"
    assert fb["signal"] in confidence.ANSWER_SIGNALS and fb["signals"] == confidence.ANSWER_SIGNALS
    assert fb["data"]["fit"] == cfg.data.valid and fb["data"]["report"] == cfg.data.test
    assert fb["fit"]["examples"] == 14 and fb["test"]["examples"] == task["prompts"] == 34
    pe = fb["per_example"]["test"]
    # the answers task accuracy graded, reused: the same verdicts
    assert sum(pe["teacher"]) == task["teacher"]["correct"] == 17
    assert sum(pe["student"]) == task["student_after"]["correct"]
    assert sum(fb["per_example"]["fit"]["teacher"]) == 7
    assert set(pe) == {*confidence.ANSWER_SIGNALS, "student", "teacher", "tokens"}
    assert fb["test"]["teacher_quality"] == 0.5
    for frac, r in fb["thresholds"].items():
        t = r["test"]
        assert t["random_quality"] == pytest.approx(
            t["student_quality"] + t["deferred_fraction"]
            * (t["teacher_quality"] - t["student_quality"]), abs=1e-5)
        assert t["gain_at_rate"] == pytest.approx(t["quality"] - t["random_quality"], abs=1e-5)
    assert any("only 14 examples on the fit split" in w for w in fb["warnings"])
    assert os.path.isfile(os.path.join(cfg.run.dir, "plots", "deferral.png"))
    assert fb["rule"] == {"signal": fb["signal"], "defer_when": "below", "target": 0.9,
                          "threshold": fb["thresholds"]["0.9"]["threshold"],
                          "always_defer": fb["thresholds"]["0.9"]["always_defer"],
                          "quality": fb["quality"], "vocab": 64}
    # a server computing the signal on one request gets the value the rule was fitted on
    from mlxdistill import task as task_mod
    from mlxdistill.data import read_records

    model, tok = api.load_student(cfg.run.dir)
    prompts = [{"prompt": r["prompt"], "answer": r["answer"]}
               for r in read_records(cfg.data.test)]
    said = task_mod.greedy_generations(model, tok, prompts, cfg.generate)
    for i in (0, 5):
        one = confidence.answer_signals(model, said["prompt_ids"][i], said["ids"][i], 64)
        for name, value in one.items():
            assert value == pytest.approx(pe[name][i], abs=1e-4)

    out = d / "export"
    with caplog.at_level("WARNING"):
        res = CliRunner().invoke(main, ["export", cfg.run.dir, "-o", str(out),
                                        "--target-quality", "0.8"])
    assert res.exit_code == 0, res.output
    assert "cloud fallback: only 14 examples on the fit split" in caplog.text
    rec = json.load(open(out / "export.json"))["fallback"]
    assert rec["signal"] in confidence.ANSWER_SIGNALS and rec["defer_when"] == "below"
    assert rec["quality"] == "task accuracy (exact verifier)" and rec["target"] == 0.8
    assert "threshold" in rec and rec["vocab"] > 0
    assert rec["data"]["fit"] == cfg.data.valid and rec["fit"]["examples"] == 14
    assert rec["test"]["examples"] == 34 and "gain_at_rate_ci" in rec["test"]
    assert rec["computed_by"].startswith("mlxdistill.confidence.answer_signals")
    assert rec["rule"] == {"signal": rec["signal"], "threshold": rec["threshold"],
                           "defer_when": "below", "always_defer": rec["always_defer"],
                           "quality": rec["quality"], "target": 0.8, "vocab": rec["vocab"]}
    card = (out / "README.md").read_text()
    assert "## Cloud fallback" in card and rec["rule_text"] in card
    assert "task accuracy (exact verifier)" in card
    assert "cloud fallback for 80% of the teacher's quality" in res.output
