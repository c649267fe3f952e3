"""Where a model's worked solutions to the embedded task go wrong: the first wrong line of
each wrong greedy solution, by kind.

    python scripts/task_errors.py                                  # the specialist teacher
    python scripts/task_errors.py --model runs/specialist-bench/X/model --n 200

Kinds of the first line that differs from the gold worked solution:
  operand digit  the column's digits are not the operands' digits in that column (reading
                 the wrong place of the prompt)
  carry in       the carry/borrow brought in is not the previous column's
  arithmetic     digits and carry right, the sum/difference or carry out wrong
  columns        a line too many or too few (the solution stops early or runs on)
  format         a line that does not parse
  answer line    every worked line right, the final answer not the one they spell
Writes RESULTS/task_errors_NAME.json and prints the table.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import mlxdistill  # noqa: E402,F401  (OpenBLAS before mlx)
from make_task import TEMPLATE  # noqa: E402
from mlxdistill import models  # noqa: E402
from mlxdistill.config import load_config  # noqa: E402
from mlxdistill.files import atomic_json  # noqa: E402
from mlxdistill.task import greedy_answers, task_prompts  # noqa: E402

# "7+10-8-0=8 b1" (plain), "7+00-8-0=..." (fixed width), "u7-U8-0=9 b1" (index hints)
LINE = re.compile(r"^[a-z]?(\d)(?:\+10|\+00)?([+-])[A-Z]?(\d)[+-](\d)=(\d+) [cb](\d)$")


def first_error(got: str, gold: str) -> str | None:
    """The kind of the first line of `got` that differs from `gold` (None: all right)."""
    g_lines = gold.split("\nAnswer:")[0].split("\n")
    o_lines = got.split("\nAnswer:")[0].split("\n")
    for i, want in enumerate(g_lines):
        if i >= len(o_lines):
            return "columns"
        if o_lines[i] == want:
            continue
        m, w = LINE.match(o_lines[i]), LINE.match(want)
        if not m:
            return "format"
        if (m[1], m[3]) != (w[1], w[3]):
            return "operand digit"
        if m[4] != w[4]:
            return "carry in"
        return "arithmetic"
    if len(o_lines) != len(g_lines):
        return "columns"
    return None if _answer(got) == _answer(gold) else "answer line"


def _answer(text: str) -> str:
    return text.split("\nAnswer:", 1)[1].split("\n")[0].strip() if "\nAnswer:" in text else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="weights/specialist/teacher")
    ap.add_argument("--data", default="data/task/test.jsonl")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--results", default="results")
    ap.add_argument("--name", default="", help="RESULTS/task_errors_NAME.json "
                    "(default: the model folder's name)")
    args = ap.parse_args()
    g = dataclasses.replace(load_config().generate, verifier="exact", max_tokens=96,
                            reasoning=TEMPLATE)
    model, tok, _ = models.load(args.model, "model")
    prompts = task_prompts(args.data, args.n)
    with open(args.data) as f:
        gold = [json.loads(line)["completion"] for line in f if line.strip()][:len(prompts)]
    texts = greedy_answers(model, tok, prompts, g)
    kinds = collections.Counter(first_error(t, want) for t, want in zip(texts, gold))
    wrong = sum(v for k, v in kinds.items() if k is not None)
    res = {"model": args.model, "problems": len(prompts), "right": kinds.get(None, 0),
           "first_error": {k: v for k, v in kinds.most_common() if k is not None}}
    name = args.name or os.path.basename(os.path.normpath(args.model))
    os.makedirs(args.results, exist_ok=True)
    atomic_json(os.path.join(args.results, f"task_errors_{name}.json"), res)
    print(f"{args.model}: {res['right']} of {len(prompts)} worked solutions right")
    print("| first wrong line | solutions | share of wrong |\n|---|---|---|")
    for k, v in res["first_error"].items():
        print(f"| {k} | {v} | {v / max(wrong, 1):.0%} |")


if __name__ == "__main__":
    main()
