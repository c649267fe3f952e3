"""Other confidence signals for the hybrid router, each fitted on the valid mix exactly as
the shipped rule is (the least deferral keeping --target of the teacher's accuracy there)
and reported on the test mix: is the router's gain over random deferral limited by the
signals confidence.py offers, or by the student?

    python scripts/hybrid.py            # first: the answers and signals this reads
    python scripts/hybrid_signals.py    # results/hybrid_signals.json and .md

Tried beside the four ANSWER_SIGNALS over the whole answer:
- the same four over the final answer only (the tokens after the reasoning template's
  separator, e.g. "Answer:"), computed as confidence.answer_signals with the reasoning
  read as part of the prompt;
- self-consistency: the share of --samples answers sampled at temperature 1 whose final
  answer equals the greedy one;
- a logistic combination of the four signals and the answer's length, fitted on valid
  (the label: the student's answer is right; its values on valid out of fold).
And for each signal the best gain any threshold reaches on the test mix (a ceiling no rule
fitted on valid can beat). Checkpoints under --work, as hybrid.py's.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlxdistill  # noqa: F401,E402  (OpenBLAS before mlx)
import numpy as np  # noqa: E402

from hybrid import cached, load_jsonl  # noqa: E402
from mlxdistill import api, confidence, fallback  # noqa: E402
from mlxdistill import generate as gen_mod  # noqa: E402
from mlxdistill.files import atomic_json, atomic_path  # noqa: E402

SEED = 0


def final_start(tok, ids: list, marker: str) -> int:
    """The index of the first answer token after `marker` (the whole answer when absent)."""
    for i in range(1, len(ids) + 1):
        if marker in tok.decode(ids[:i]):
            return i
    return 0


def final_signals(model, tok, sheet: dict, marker: str) -> dict:
    out: dict = {f"final_{k}": [] for k in confidence.ANSWER_SIGNALS}
    for p, a in zip(sheet["prompt_ids"], sheet["ids"]):
        i = final_start(tok, a, marker)
        for k, v in confidence.answer_signals(model, list(p) + a[:i], a[i:]).items():
            out[f"final_{k}"].append(v)
    return out


def agreement(model, tok, sheet: dict, g, k: int) -> list:
    """Per answer: the share of k sampled answers (temperature 1) with its final answer."""
    import mlx.core as mx
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    tmpl = gen_mod.reasoning_parts(g.reasoning)

    def final(text):
        return gen_mod.split_answer(tmpl, text)[1].strip() if tmpl else text.strip()
    mx.random.seed(SEED)
    toks = [p for p in sheet["prompt_ids"] for _ in range(k)]
    texts: list = []
    for b in range(0, len(toks), 256):
        texts += batch_generate(model, tok, toks[b:b + 256], max_tokens=g.max_tokens,
                                sampler=make_sampler(temp=1.0)).texts
    return [float(np.mean([final(x) == final(t) for x in texts[i * k:(i + 1) * k]]))
            for i, t in enumerate(sheet["texts"])]


def logistic(fit: dict, names: list, l2: float = 1.0, iters: int = 3000):
    """P(the student is right) from `names` (standardised), by gradient descent on valid's
    log-loss: a function of an examples dict."""
    def feats(ex):
        return np.array([ex[n] for n in names], dtype=float).T
    X, y = feats(fit), np.asarray(fit["student"], dtype=float)
    mu, sd = X.mean(0), X.std(0) + 1e-9
    Z = (X - mu) / sd
    w, b = np.zeros(Z.shape[1]), 0.0
    for _ in range(iters):
        g = 1 / (1 + np.exp(-(Z @ w + b))) - y
        w -= 0.1 * (Z.T @ g + l2 * w) / len(y)
        b -= 0.1 * g.mean()
    return lambda ex: ((feats(ex) - mu) / sd @ w + b).tolist()


def out_of_fold(fit: dict, names: list, folds: int = 5) -> list:
    """The combination's values on valid, each from a fit without its own fold: a value
    fitted on the example it scores would flatter the combination when signals are
    compared, and thresholds chosen, on valid."""
    n = len(fit["student"])
    perm = np.random.default_rng(SEED).permutation(n)
    out = np.zeros(n)
    for f in range(folds):
        held = perm[f::folds]
        kept = np.setdiff1d(perm, held)
        part = {k: [v[i] for i in kept] for k, v in fit.items()}
        out[held] = logistic(part, names)({k: [v[i] for i in held] for k, v in fit.items()})
    return out.tolist()


def row(name: str, fit: dict, test: dict, target: float) -> dict:
    qs, qt = np.asarray(test["student"], float), np.asarray(test["teacher"], float)
    cf = fallback.deferral_curve(fit[name], fit["student"], fit["teacher"])
    ch = fallback.choose_threshold(cf, target * float(np.mean(fit["teacher"])), name)
    d = fallback.deferred(test[name], ch["threshold"], ch["always_defer"])
    rep = fallback.report(d, qs, qt)
    ct = fallback.deferral_curve(test[name], qs, qt)
    # the best threshold on test itself: gain over random at each curve point
    best = max((q - fallback.random_quality(qs, qt, r), r)
               for q, r in zip(ct["quality"], ct["deferred"]) if r <= 0.5)
    return {"fit_curve_gain": round(fallback.gain_over_random(cf), 6),
            "test_curve_gain": round(fallback.gain_over_random(ct), 6),
            "deferred_fraction": rep["deferred_fraction"],
            "fraction_of_teacher": rep["fraction_of_teacher"],
            "gain_at_rate": rep["gain_at_rate"], "gain_at_rate_ci": rep["gain_at_rate_ci"],
            "best_test_gain": round(float(best[0]), 6), "best_test_rate": round(best[1], 6)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/hybrid/student")
    ap.add_argument("--valid", default="data/task/hybrid_valid.jsonl")
    ap.add_argument("--test", default="data/task/hybrid_test.jsonl")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--samples", type=int, default=8, help="self-consistency samples")
    ap.add_argument("--work", default="runs/hybrid/work")
    ap.add_argument("--out", default="results/hybrid_signals")
    args = ap.parse_args()
    os.chdir(ROOT)
    for split in ("fit", "report"):
        for who in ("student", "teacher", "signals"):
            if not os.path.exists(f"{args.work}/{split}_{who}.json"):
                raise SystemExit(f"error: {args.work}/{split}_{who}.json not found: run "
                                 "python scripts/hybrid.py first")
    load_jsonl(args.valid), load_jsonl(args.test)  # the files hybrid.py read still exist
    cfg = api.load_run_config(args.run)
    g = cfg.generate
    tmpl = gen_mod.reasoning_parts(g.reasoning)
    if tmpl is None:
        raise SystemExit("error: the run's generate.reasoning is unset: no final answer")
    marker = tmpl[1].strip()
    student, stok = api.load_student(args.run)
    ex = {}
    for split in ("fit", "report"):
        s = cached(f"{args.work}/{split}_student.json", None)
        t = cached(f"{args.work}/{split}_teacher.json", None)
        e = {**cached(f"{args.work}/{split}_signals.json", None),
             "student": [float(c) for c in s["correct"]],
             "teacher": [float(c) for c in t["correct"]],
             "length": [float(len(a)) for a in s["ids"]]}
        e.update(cached(f"{args.work}/{split}_final_signals.json",
                        lambda: final_signals(student, stok, s, marker)))
        e["self_consistency"] = cached(
            f"{args.work}/{split}_agreement_{args.samples}.json",
            lambda: agreement(student, stok, s, g, args.samples))
        ex[split] = e
        print(f"{split}: signals ready", flush=True)
    features = [*confidence.ANSWER_SIGNALS, "length"]
    ex["fit"]["logistic"] = out_of_fold(ex["fit"], features)
    ex["report"]["logistic"] = logistic(ex["fit"], features)(ex["report"])
    names = [*confidence.ANSWER_SIGNALS, *(f"final_{k}" for k in confidence.ANSWER_SIGNALS),
             "self_consistency", "logistic"]
    res = {"run": args.run, "target": args.target, "final_marker": marker,
           "samples": args.samples,
           "signals": {n: row(n, ex["fit"], ex["report"], args.target) for n in names}}
    atomic_json(args.out + ".json", res)
    lines = [f"# Other router signals ({args.run})", "",
             f"Each fitted on {args.valid} as the shipped rule is (least deferral keeping "
             f"{args.target:.0%} of the teacher there), reported on {args.test}. `final_*`: "
             f"over the tokens after `{marker}`; self_consistency: share of {args.samples} "
             "samples (T=1) agreeing with the greedy final answer; logistic: the four "
             "signals and the length, combined on valid (its valid values out of 5 folds). Best on test: the best gain any "
             "threshold reaches on the test mix itself (deferring at most 50 %).", "",
             "| signal | curve gain valid / test | deferred | share of teacher | gain at rate "
             "| best on test |", "|---|---|---|---|---|---|"]
    for n, r in res["signals"].items():
        ci = r["gain_at_rate_ci"] or [float("nan")] * 2
        lines.append(f"| {n} | {r['fit_curve_gain']:+.4f} / {r['test_curve_gain']:+.4f} | "
                     f"{r['deferred_fraction']:.1%} | {r['fraction_of_teacher']:.1%} | "
                     f"{r['gain_at_rate'] * 100:+.1f} [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]"
                     f" | {r['best_test_gain'] * 100:+.1f} at {r['best_test_rate']:.0%} |")
    with atomic_path(args.out + ".md") as tmp:
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
