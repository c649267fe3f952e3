"""The embedded specialist task: worked solutions, held-out splits, task accuracy in eval."""

import json
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import make_task  # noqa: E402

from mlxdistill import generate as gen_mod  # noqa: E402


def test_worked_solutions_are_right():
    parts = gen_mod.reasoning_parts(make_task.TEMPLATE)
    for (a, op, b) in [(999, "+", 1), (1000, "-", 1), (4821, "+", 397), (52, "-", 48)]:
        rec = make_task.record(a, op, b)
        reasoning, final = gen_mod.split_answer(parts, rec["completion"])
        assert final == rec["answer"] == str(eval(f"{a}{op}{b}"))
        assert reasoning.count("\n") + 1 == max(len(str(a)), len(str(b)))
    assert make_task.record(999, "+", 1)["completion"].startswith("9+1+0=10 c1\n9+0+1=10 c1")
    assert "0+10-1-0=9 b1" in make_task.record(1000, "-", 1)["completion"]


def test_splits_held_out_and_reproducible():
    splits = make_task.make(5, {"train": 400, "valid": 50, "test": 50}, 3)
    problems = [r["prompt"] for recs in splits.values() for r in recs]
    assert len(set(problems)) == len(problems) == 500
    assert make_task.make(5, {"train": 400, "valid": 50, "test": 50}, 3) == splits
    # the shipped files are the seeded generator's output, and disjoint
    shipped = {}
    for split in ("train", "valid", "test"):
        with open(os.path.join(ROOT, "data", "task", f"{split}.jsonl")) as f:
            shipped[split] = [json.loads(x) for x in f]
    sizes = {k: len(v) for k, v in shipped.items()}
    assert make_task.make(0, sizes, 4) == shipped
    train = {r["prompt"] for r in shipped["train"]}
    assert not train & {r["prompt"] for r in shipped["test"] + shipped["valid"]}
    with open(os.path.join(ROOT, "data", "task", "prompts.jsonl")) as f:
        prompts = [json.loads(x) for x in f]
    assert {p["prompt"] for p in prompts} == train and "completion" not in prompts[0]
    total = sum(os.path.getsize(os.path.join(ROOT, "data", "task", n))
                for n in os.listdir(os.path.join(ROOT, "data", "task")))
    assert total < 3e6
