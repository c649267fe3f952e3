"""Write the embedded specialist task: multi-digit addition and subtraction, worked digit by
digit with carries and borrows, with a checkable final answer.

    python scripts/make_task.py                  # data/task/{train,valid,test,prompts}.jsonl
    python scripts/make_task.py --format plain   # "4821+397=" (the earlier format)
    python scripts/make_task.py --hybrid         # data/task/hybrid_{valid,test}.jsonl

Each line of train/valid/test is {"prompt", "completion", "answer"}: the prompt is the
problem, in the default index-hint format with every digit after its place tag and both
operands four digits ("k4h8t2u1+K0H3T9U7=\\n" is 4821+397), the completion its worked
solution, one column per line from the units up ("u1+U7+0=8 c0"), then "Answer: N" (the
reasoning template "{reasoning}\\nAnswer: {answer}\\n"), and `answer` the reference the exact
verifier compares with. prompts.jsonl holds the training problems without solutions, for
the teacher to write its own (`mlxdistill generate`).

Seeded, so the files are reproducible; no problem appears in more than one split (checked
when written), so held-out accuracy measures arithmetic, not recall.
"""

from __future__ import annotations

import argparse
import json
import os
import random

TEMPLATE = "{reasoning}\nAnswer: {answer}\n"


def columns(a: int, op: str, b: int, width: int) -> tuple[list[tuple], str]:
    """The column-by-column working of a + b or a - b (a >= b for subtraction), units first:
    (x, y, carry or borrow in, x + y + c or x - y - c, carry or borrow out) per column, at
    least `width` columns, and the answer. Every format below writes these lines its way."""
    width = max(width, len(str(a)), len(str(b)))
    da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    cols, digits, c = [], [], 0
    for x, y in zip(map(int, da), map(int, db)):
        v = x + y + c if op == "+" else x - y - c
        out = int(v > 9) if op == "+" else int(v < 0)
        cols.append((x, y, c, v, out))
        digits.append(v % 10)
        c = out
    if op == "+" and c:
        digits.append(c)
    answer = str(int("".join(map(str, digits[::-1]))))
    assert answer == str(a + b if op == "+" else a - b)
    return cols, answer


def worked(a: int, op: str, b: int, width: int = 0, fixed: bool = False) -> tuple[str, str]:
    """(worked solution, answer) of a + b or a - b (a >= b for subtraction): one line per
    column from the units up (at least `width` columns), "x+y+carry=s c<carry out>" or
    "x-y-borrow=d b<borrow out>" (a borrowed ten shown as x+10). fixed: every line of an
    operation has one length ("x+y+c=0s", "x+00-y-c=d"), so with padded operands each digit
    a line reads sits at a constant distance back from it."""
    cols, answer = columns(a, op, b, width)
    lines = []
    for x, y, c, v, out in cols:
        if op == "+":
            lines.append(f"{x}+{y}+{c}={v:02d} c{out}" if fixed else f"{x}+{y}+{c}={v} c{out}")
        elif out:
            lines.append(f"{x}+10-{y}-{c}={v + 10} b1")
        else:
            lines.append(f"{x}+00-{y}-{c}={v} b0" if fixed else f"{x}-{y}-{c}={v} b0")
    return "\n".join(lines), answer


# Place tags, units first: the digit of place k is written after TAGS[k] in the first operand
# and after TAGS[k].upper() in the second, and each worked line names its column's two tags.
TAGS = "uthk"


def worked_hints(a: int, op: str, b: int, width: int) -> tuple[str, str, str]:
    """(prompt, worked solution, answer) in the index-hint format: every operand digit
    follows its place tag ("h9t4u1-H3T6U2="), and column k's line starts with the tags of
    the digits it reads ("u1-U2-0=9 b1": 1 - 2 - borrow 0 is 9, borrow 1 out). Finding a
    column's digits is then a lookup by content — the token after the tag — instead of a
    count of positions from each number's end, which is what the untagged teacher got
    wrong (Zhou et al., "What Algorithms Can Transformers Learn?", 2023). Every line of a
    problem has one length and every problem `width` lines."""
    if width > len(TAGS):
        raise ValueError(f"index hints name {len(TAGS)} places; width {width} is too wide")
    cols, answer = columns(a, op, b, width)
    mark = "c" if op == "+" else "b"
    lines = [f"{TAGS[k]}{x}{op}{TAGS[k].upper()}{y}{op}{c}={v % 10} {mark}{out}"
             for k, (x, y, c, v, out) in enumerate(cols)]

    def tagged(n: int, upper: bool) -> str:
        tags = TAGS[:width][::-1]  # most significant place first, as the number is written
        return "".join((t.upper() if upper else t) + ch
                       for t, ch in zip(tags, str(n).zfill(width)))
    return f"{tagged(a, False)}{op}{tagged(b, True)}=\n", "\n".join(lines), answer


def problem(rng: random.Random, max_digits: int) -> tuple[int, str, int]:
    na, nb = rng.randint(2, max_digits), rng.randint(1, max_digits)
    a = rng.randint(10 ** (na - 1), 10 ** na - 1)
    b = rng.randint(10 ** (nb - 1), 10 ** nb - 1)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    return a, op, b


def record(a: int, op: str, b: int, pad: int = 0, fixed: bool = False,
           hints: int = 0) -> dict:
    """pad > 0 writes both operands with `pad` digits (leading zeros) and works every
    column: each digit then sits at a fixed distance from the "=", so reading the k-th
    column's digits is a fixed-offset lookup rather than a count from each number's end.
    hints > 0: the index-hint format of `worked_hints`, `hints` columns."""
    if hints:
        prompt, steps, answer = worked_hints(a, op, b, hints)
        return {"prompt": prompt, "answer": answer,
                "completion": TEMPLATE.format(reasoning=steps, answer=answer)}
    steps, answer = worked(a, op, b, pad, fixed)
    return {"prompt": f"{a:0{pad}d}{op}{b:0{pad}d}=\n",
            "completion": TEMPLATE.format(reasoning=steps, answer=answer), "answer": answer}


# How the problems are written (see record): the index-hint format is the one the shipped
# teacher is trained on; the others are the earlier formats its README section compares.
FORMATS = {"hints": dict(hints=True), "plain": {}, "pad": dict(pad=True),
           "fixed": dict(pad=True, fixed=True)}


def make(seed: int, sizes: dict, max_digits: int, fmt: str = "hints") -> dict:
    """Split name -> records; every problem is distinct across all splits."""
    f = FORMATS[fmt]
    width = dict(pad=max_digits if f.get("pad") else 0, fixed=f.get("fixed", False),
                 hints=max_digits if f.get("hints") else 0)
    rng = random.Random(seed)
    seen: set = set()
    out = {}
    for split, n in sizes.items():
        recs = []
        while len(recs) < n:
            p = problem(rng, max_digits)
            if p not in seen:
                seen.add(p)
                recs.append(record(*p, **width))
        out[split] = recs
    return out


# Harder problems, for measuring a student that hands some queries to its teacher: kinds
# rare or absent in `problem`'s draws (a has 2 to 4 digits, b 1 to 4, each digit count
# equally likely, so both operands four digits is one problem in nine, b = 0 and a one-digit
# a never occur). Each kind is drawn from operands 0..9999 until its condition holds.
HARD_KINDS = {
    "carry_out": "a + b > 9999: the carry out of the thousands makes a fifth digit",
    "carry_chain": "addition where a carry passes through 2 or more columns (0999+0001)",
    "borrow_chain": "subtraction where a borrow passes through 2 or more columns (1000-0999)",
    "near_equal": "a - b < 100 with a four-digit a: the answer drops two or more leading zeros",
    "single_digit": "both operands one digit (a never has fewer than two in training)",
    "zero": "b = 0 (never in training)",
}


def passes(a: int, op: str, b: int) -> int:
    """Columns a carry or borrow passes through: one comes in and one goes out (at most 3
    for addition, 2 for subtraction: its top column never borrows)."""
    return sum(1 for _, _, c, _, out in columns(a, op, b, len(TAGS))[0] if c and out)


def hard_problem(rng: random.Random, kind: str) -> tuple[int, str, int]:
    """One problem of a HARD_KINDS kind, (a, op, b) with a >= b for subtraction."""
    if kind == "near_equal":
        a = rng.randint(1000, 9999)
        return a, "-", a - rng.randint(0, 99)
    if kind == "zero":
        return rng.randint(0, 9999), rng.choice("+-"), 0
    top = 9 if kind == "single_digit" else 9999
    op = {"carry_out": "+", "carry_chain": "+", "borrow_chain": "-"}.get(kind) \
        or rng.choice("+-")
    while True:  # the chains hold for about one draw in ten: a few draws each
        a, b = rng.randint(0, top), rng.randint(0, top)
        if op == "-" and b > a:
            a, b = b, a
        if kind == "single_digit" or (kind == "carry_out" and a + b > 9999) \
                or (kind in ("carry_chain", "borrow_chain") and passes(a, op, b) >= 2):
            return a, op, b


def hard_records(seed: int, n: int, kinds, exclude: set) -> list[dict]:
    """`n` distinct problems (index-hint format), the kinds in turn, none whose prompt is in
    `exclude` (those of the usual splits): held out from training by construction."""
    if not kinds or any(k not in HARD_KINDS for k in kinds):
        raise ValueError(f"kinds must be among {', '.join(HARD_KINDS)}; got {list(kinds)}")
    rng, seen, out, misses = random.Random(seed), set(exclude), [], 0
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        rec = record(*hard_problem(rng, kind), hints=len(TAGS))
        if rec["prompt"] not in seen:
            seen.add(rec["prompt"])
            out.append({**rec, "kind": kind})
            misses = 0
        elif (misses := misses + 1) > 10000:  # single_digit has only ~150 problems
            raise ValueError(f"{kind}: fewer distinct problems than {n} asked for")
    return out


def hybrid_splits(splits: dict, seed: int, sizes: dict, kinds) -> dict:
    """hybrid_valid / hybrid_test: per split, the first half of the usual held-out records
    ("kind": "usual") and as many harder ones (hard_records, seed `seed`), shuffled."""
    exclude = {r["prompt"] for recs in splits.values() for r in recs}
    out, rng = {}, random.Random(seed)
    for split, n in sizes.items():
        half = n // 2
        if half > len(splits[split]):
            raise ValueError(f"{split} has {len(splits[split])} records; {half} needed")
        hard = hard_records(seed + len(out) + 1, n - half, kinds, exclude)
        exclude |= {r["prompt"] for r in hard}
        recs = [{**r, "kind": "usual"} for r in splits[split][:half]] + hard
        rng.shuffle(recs)
        out[f"hybrid_{split}"] = recs
    return out


def write_jsonl(path: str, recs: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=8000)
    ap.add_argument("--valid", type=int, default=300)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--max-digits", type=int, default=4)
    ap.add_argument("--format", choices=list(FORMATS), default="hints",
                    help="hints: digits tagged by place (worked_hints); plain: '4821+397='; "
                         "pad: zero-padded operands; fixed: padded, lines of one length")
    ap.add_argument("--hybrid", action="store_true",
                    help="write only hybrid_valid/hybrid_test.jsonl: half the usual held-out "
                         "records, half harder ones (--hard-kinds), none seen in any split")
    ap.add_argument("--hard-kinds", default="carry_out,carry_chain,near_equal",
                    help="comma-separated, among: " + ", ".join(HARD_KINDS))
    ap.add_argument("--hybrid-seed", type=int, default=1)
    args = ap.parse_args()
    if args.format == "hints" and not 2 <= args.max_digits <= len(TAGS):
        raise SystemExit(f"error: --max-digits {args.max_digits}: the index-hint format names "
                         f"{len(TAGS)} places (2 to {len(TAGS)} digits); use --format plain")
    splits = make(args.seed, {"train": args.train, "valid": args.valid, "test": args.test},
                  args.max_digits, args.format)
    prompts = {r["prompt"] for recs in splits.values() for r in recs}
    if len(prompts) != sum(map(len, splits.values())):
        raise SystemExit("error: a problem appears twice; the splits would not be held out")
    os.makedirs(args.out, exist_ok=True)
    if args.hybrid:  # the usual splits are rebuilt (seeded) to hold the new problems out
        if args.format != "hints":
            raise SystemExit("error: --hybrid writes the index-hint format only")
        try:
            mixed = hybrid_splits(splits, args.hybrid_seed,
                                  {"valid": args.valid, "test": args.test},
                                  [k for k in args.hard_kinds.split(",") if k])
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        for name, recs in mixed.items():
            write_jsonl(os.path.join(args.out, f"{name}.jsonl"), recs)
        print(f"wrote {args.out}: " + ", ".join(f"{k} {len(v)}" for k, v in mixed.items()))
        return
    for split, recs in splits.items():
        write_jsonl(os.path.join(args.out, f"{split}.jsonl"), recs)
    write_jsonl(os.path.join(args.out, "prompts.jsonl"),
                [{"prompt": r["prompt"], "answer": r["answer"]} for r in splits["train"]])
    print(f"wrote {args.out}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
          + f", prompts {len(splits['train'])}")


if __name__ == "__main__":
    main()
