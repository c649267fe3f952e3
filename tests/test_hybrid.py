"""The hybrid measurement's pure parts: the harder-problem generator and the oracle and
random-deferral rows."""

import os
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import hybrid  # noqa: E402
import make_task  # noqa: E402


def _splits():
    return make_task.make(0, {"train": 800, "valid": 60, "test": 80}, 4)


def test_hard_problems_are_of_their_kind_and_right():
    for kind in make_task.HARD_KINDS:
        recs = make_task.hard_records(3, 40, [kind], set())
        assert len({r["prompt"] for r in recs}) == 40
        for r in recs:
            head = r["prompt"].strip().rstrip("=")
            op = "+" if "+" in head else "-"
            a, b = (int("".join(ch for ch in x if ch.isdigit())) for x in head.split(op))
            assert r["answer"] == str(a + b if op == "+" else a - b) and r["kind"] == kind
            assert r["completion"].endswith(f"Answer: {r['answer']}\n")
            if kind == "carry_out":
                assert op == "+" and a + b > 9999
            if kind in ("carry_chain", "borrow_chain"):
                assert make_task.passes(a, op, b) >= 2
            if kind == "near_equal":
                assert op == "-" and a >= 1000 and a - b < 100
    assert make_task.passes(1000, "-", 999) == 2 and make_task.passes(9999, "+", 1) == 3


def test_hybrid_splits_are_seeded_mixed_and_held_out():
    splits = _splits()
    kinds = ["carry_out", "near_equal"]
    mixed = make_task.hybrid_splits(splits, 1, {"valid": 40, "test": 60}, kinds)
    assert mixed == make_task.hybrid_splits(_splits(), 1, {"valid": 40, "test": 60}, kinds)
    assert [len(mixed["hybrid_valid"]), len(mixed["hybrid_test"])] == [40, 60]
    usual = {r["prompt"] for r in splits["train"] + splits["valid"] + splits["test"]}
    hard = [r for recs in mixed.values() for r in recs if r["kind"] != "usual"]
    assert len(hard) == 50 and not usual & {r["prompt"] for r in hard}
    assert len({r["prompt"] for recs in mixed.values() for r in recs}) == 100
    assert sum(r["kind"] == "usual" for r in mixed["hybrid_test"]) == 30
    with pytest.raises(ValueError):
        make_task.hard_records(0, 5, ["nope"], set())
    with pytest.raises(ValueError):  # only ~150 one-digit problems exist
        make_task.hard_records(0, 400, ["single_digit"], set())


def test_oracle_and_random_rows():
    qs = np.array([1, 1, 0, 0, 1, 0, 1, 1, 1, 1], dtype=float)
    qt = np.array([1, 1, 1, 0, 1, 1, 1, 1, 0, 1], dtype=float)
    orc = hybrid.oracle_row(qs, qt)
    assert orc["deferred_fraction"] == 0.3 and orc["accuracy"] == 0.9
    rnd = hybrid.random_row(qs, qt, 3, draws=4000)
    # student 0.7, teacher 0.8: 0.7 + 0.3 * 0.1
    assert rnd["expected_accuracy"] == pytest.approx(0.73)
    assert abs(rnd["simulated_accuracy"] - 0.73) < 0.01
    assert rnd["simulated_ci"][0] <= 0.73 <= rnd["simulated_ci"][1]
    assert hybrid.random_row(qs, qt, 10, draws=10)["simulated_accuracy"] == pytest.approx(0.8)


def test_other_signals_parts():
    import hybrid_signals as hs

    class Tok:  # one character per id
        def decode(self, ids):
            return "".join(chr(i) for i in ids)
    ids = [ord(c) for c in "7+5=12\nAnswer: 12\n"]
    i = hs.final_start(Tok(), ids, "Answer:")
    assert Tok().decode(ids[i:]) == " 12\n"
    assert hs.final_start(Tok(), ids, "Final:") == 0  # no marker: the whole answer
    # the combination learns which feature tells right from wrong, out of fold too
    rng = np.random.default_rng(0)
    right = (rng.random(200) < 0.6).astype(float)
    ex = {"student": right.tolist(), "signal": (right + rng.normal(0, 0.3, 200)).tolist(),
          "noise": rng.normal(0, 1, 200).tolist()}
    combo = hs.logistic(ex, ["signal", "noise"])(ex)
    oof = hs.out_of_fold(ex, ["signal", "noise"])
    for v in (combo, oof):
        v = np.array(v)
        assert v[right == 1].mean() > v[right == 0].mean() + 1.0
    assert len(oof) == 200 and not np.allclose(oof, combo)
