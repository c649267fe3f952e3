"""The hybrid system on the task specialist: the student answers on the device and hands a
query to the teacher when its confidence is low. Measured against the student alone, the
teacher alone, random deferral at the router's rate and the oracle, with latency per query.

    python scripts/make_task.py --hybrid       # data/task/hybrid_{valid,test}.jsonl
    python scripts/hybrid.py                   # results/hybrid.json and results/hybrid.md

The rule is fitted on the valid mix exactly as `mlxdistill eval` fits it (fallback.py: the
signal among confidence.ANSWER_SIGNALS with the largest gain over random deferral there,
the least deferral keeping --target of the teacher's accuracy there) and every number is
measured on the test mix. Greedy answers, verdicts and signals are checkpointed under
--work, so a rerun resumes; --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import mlxdistill  # noqa: F401,E402  (OpenBLAS before mlx)
import numpy as np  # noqa: E402

from mlxdistill import api, confidence, fallback, serve, task  # noqa: E402
from mlxdistill.files import atomic_json, atomic_path  # noqa: E402

SEED = 0
RANDOM_DRAWS = 2000  # simulated random deferrals of the router's count of queries


def load_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found (python scripts/make_task.py --hybrid)")
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    if not recs or any("prompt" not in r or "answer" not in r for r in recs):
        raise SystemExit(f"error: {path}: every record needs a prompt and an answer")
    return recs


def cached(path: str, compute):
    """The JSON at `path`, or compute() written there atomically: an interrupted run
    resumes at the first missing step."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    value = compute()
    atomic_json(path, value, indent=None)
    return value


def sheet(model, tok, recs: list[dict], g) -> dict:
    """Greedy answers (batched, as eval grades them), their verdicts and token ids."""
    s = task.answer_sheet(model, tok, [{"prompt": r["prompt"], "answer": r["answer"]}
                                       for r in recs], g)
    return {k: s[k] for k in ("texts", "prompt_ids", "ids", "correct")}


def examples(student_sheet: dict, teacher_sheet: dict, signals: dict) -> dict:
    """fallback.py's per-example lists: each signal, and 1/0 quality per model."""
    return {**signals, "student": [float(c) for c in student_sheet["correct"]],
            "teacher": [float(c) for c in teacher_sheet["correct"]]}


def oracle_row(qs, qt) -> dict:
    """Defer exactly the student's mistakes: the least deferral that reaches the best
    accuracy the two models together can have."""
    qs, qt = np.asarray(qs, dtype=float), np.asarray(qt, dtype=float)
    defer = qs < 1
    return {"deferred_fraction": round(float(defer.mean()), 6),
            "deferred_fraction_ci": fallback.wilson(int(defer.sum()), defer.size),
            "accuracy": round(float(np.where(defer, qt, qs).mean()), 6)}


def random_row(qs, qt, k: int, seed: int = SEED, draws: int = RANDOM_DRAWS) -> dict:
    """Defer k queries drawn at random: the expected accuracy (fallback.report's
    student + rate × (teacher − student)) and a simulation of `draws` such choices."""
    qs, qt = np.asarray(qs, dtype=float), np.asarray(qt, dtype=float)
    n = qs.size
    rng = np.random.default_rng(seed)
    acc = np.empty(draws)
    for i in range(draws):
        d = np.zeros(n, dtype=bool)
        d[rng.choice(n, size=k, replace=False)] = True
        acc[i] = np.where(d, qt, qs).mean()
    lo, hi = np.quantile(acc, [0.025, 0.975])
    return {"deferred_fraction": round(k / n, 6),
            "expected_accuracy": round(float(fallback.random_quality(qs, qt, k / n)), 6),
            "simulated_accuracy": round(float(acc.mean()), 6),
            "simulated_ci": [round(float(lo), 6), round(float(hi), 6)], "draws": draws}


def outcomes(qs, qt, defer) -> dict:
    """Why the router lands where it does: what its deferrals bought, what it left with the
    student, and the best any choice of the same number of deferrals could reach (all the
    mistakes the teacher fixes first, then ones it cannot change, its own mistakes last)."""
    qs, qt, d = (np.asarray(x, dtype=bool) for x in (qs, qt, defer))
    n, k = qs.size, int(d.sum())
    fixable, breaks = int((~qs & qt).sum()), int((qs & ~qt).sum())
    best = (qs.sum() + min(k, fixable) - max(0, k - (n - breaks))) / n
    rand = fallback.random_quality(qs.astype(float), qt.astype(float), k / n)
    return {"deferred": k, "deferred_fixed": int((d & ~qs & qt).sum()),
            "deferred_both_right": int((d & qs & qt).sum()),
            "deferred_both_wrong": int((d & ~qs & ~qt).sum()),
            "deferred_broken": int((d & qs & ~qt).sum()),
            "kept_fixable": int((~d & ~qs & qt).sum()),
            "kept_wrong_teacher_too": int((~d & ~qs & ~qt).sum()),
            "best_accuracy_at_rate": round(float(best), 6),
            "best_gain_at_rate": round(float(best - rand), 6)}


def by_kind(recs, qs, qt, defer) -> dict:
    """Per kind of problem: count, each model's accuracy, the router's deferral rate."""
    out = {}
    for kind in sorted({r.get("kind", "usual") for r in recs}):
        i = np.array([r.get("kind", "usual") == kind for r in recs])
        out[kind] = {"n": int(i.sum()), "student": round(float(np.mean(qs[i])), 4),
                     "teacher": round(float(np.mean(qt[i])), 4),
                     "deferred": round(float(np.mean(defer[i])), 4)}
    return out


def generate_one(model, tok, ids: list, max_tokens: int) -> list:
    """One greedy answer, token by token, as `mlxdistill serve` writes the student's."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    out = []
    for r in stream_generate(model, tok, ids, max_tokens=max_tokens,
                             sampler=make_sampler(temp=0.0)):
        if r.finish_reason == "stop":
            break
        out.append(r.token)
    return out


def latency(student, stok, teacher, ttok, prompt_ids: list, rule: dict, g) -> dict:
    """Seconds per query, one query at a time, on this machine's CPU (the teacher is called
    in-process: no network in these numbers). Per query: the student's answer, its
    signals, the teacher's answer; the router pays student + signals always and the
    teacher's time when the rule defers."""
    generate_one(student, stok, prompt_ids[0], g.max_tokens)  # warm-up: first-call costs
    generate_one(teacher, ttok, prompt_ids[0], g.max_tokens)
    rows = []
    for ids in prompt_ids:
        t0 = time.perf_counter()
        ans = generate_one(student, stok, ids, g.max_tokens)
        t1 = time.perf_counter()
        sig = confidence.answer_signals(student, ids, ans)
        t2 = time.perf_counter()
        generate_one(teacher, ttok, ids, g.max_tokens)
        t3 = time.perf_counter()
        defer = serve.decide(rule, sig)[0]  # as the server decides
        rows.append({"student": t1 - t0, "signals": t2 - t1, "teacher": t3 - t2,
                     "defer": defer})
    return {"queries": len(rows), "rows": rows}


def latency_summary(lat: dict, test_rate: float) -> dict:
    s = np.array([r["student"] for r in lat["rows"]])
    ss = s + np.array([r["signals"] for r in lat["rows"]])
    t = np.array([r["teacher"] for r in lat["rows"]])
    d = np.array([r["defer"] for r in lat["rows"]])
    routed = ss + np.where(d, t, 0.0)

    def ms(a):
        return {"median_ms": round(1000 * float(np.median(a)), 2),
                "mean_ms": round(1000 * float(np.mean(a)), 2)}
    return {"queries": int(s.size), "student": ms(s), "student_signals": ms(ss),
            "teacher": ms(t), "router_measured": {**ms(routed),
                                                  "deferred": round(float(d.mean()), 4)},
            # at the test mix's deferral rate rather than these queries' share
            "router_expected_mean_ms": round(1000 * float(np.mean(ss) + test_rate * np.mean(t)),
                                             2),
            "where": "in-process MLX on this machine's CPU, one query at a time, greedy, "
                     "after one warm-up call per model; the teacher was called locally, "
                     "not over HTTP"}


def markdown(res: dict) -> str:
    r, lat = res["rows"], res["latency"]
    t = r["teacher"]["accuracy"]

    def share(a):
        return f"{a / t:.1%}" if t > 0 else "-"

    def ci(v):
        return f" [{v[0]:.1%}, {v[1]:.1%}]" if v else ""
    rt, rnd, orc = r["router"], r["random"], r["oracle"]
    lines = [f"# Hybrid: student on the device, teacher when needed ({res['student']})", "",
             f"Test mix: {res['test']['examples']} problems ({res['test']['file']}), "
             f"rule fitted on {res['fit']['examples']} ({res['fit']['file']}): "
             f"`{rt['rule_text']}` (signal {res['signal']}, target {res['target']:.0%} of the "
             f"teacher's accuracy on valid).", "",
             "| system | task accuracy | share of teacher | deferred | latency / query (median, mean) |",
             "|---|---|---|---|---|",
             f"| student alone | {r['student']['accuracy']:.1%} | "
             f"{share(r['student']['accuracy'])} | 0 % | {lat['student']['median_ms']:.0f} ms, "
             f"{lat['student']['mean_ms']:.0f} ms (+ signals: "
             f"{lat['student_signals']['median_ms']:.0f}, {lat['student_signals']['mean_ms']:.0f}) |",
             f"| teacher alone | {t:.1%} | 100 % | 100 % | {lat['teacher']['median_ms']:.0f} ms, "
             f"{lat['teacher']['mean_ms']:.0f} ms |",
             f"| router | {rt['quality']:.1%}{ci(rt['quality_ci'])} | "
             f"{rt['fraction_of_teacher']:.1%} | {rt['deferred_fraction']:.1%}"
             f"{ci(rt['deferred_fraction_ci'])} | "
             f"{lat['router_measured']['median_ms']:.0f} ms, "
             f"{lat['router_measured']['mean_ms']:.0f} ms (expected mean at the test rate: "
             f"{lat['router_expected_mean_ms']:.0f} ms) |",
             f"| random deferral, same rate | {rnd['expected_accuracy']:.1%} (simulated "
             f"{rnd['simulated_accuracy']:.1%}{ci(rnd['simulated_ci'])}) | "
             f"{share(rnd['expected_accuracy'])} | {rnd['deferred_fraction']:.1%} | as router |",
             f"| oracle (defer the student's mistakes) | {orc['accuracy']:.1%} | "
             f"{share(orc['accuracy'])} | {orc['deferred_fraction']:.1%} | - |", "",
             f"Router over random at the same rate: {rt['gain_at_rate'] * 100:+.1f} points"
             f"{'' if not rt['gain_at_rate_ci'] else ' [%+.1f, %+.1f]' % tuple(100 * x for x in rt['gain_at_rate_ci'])}. "
             f"Latency: {lat['where']}, {lat['queries']} test queries.", "",
             "| kind | n | student | teacher | router defers |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {v['student']:.1%} | {v['teacher']:.1%} | "
              f"{v['deferred']:.1%} |" for k, v in res["by_kind"].items()]
    o = res["outcomes"]
    lines += ["", "Goal: " + "; ".join(f"{k}: {v}" for k, v in res["goal"].items()) + ".", "",
              f"What the deferrals did on test: of {o['deferred']} deferred, "
              f"{o['deferred_fixed']} were student mistakes the teacher fixed, "
              f"{o['deferred_both_right']} right answers the teacher also got right, "
              f"{o['deferred_both_wrong']} mistakes the teacher repeated and "
              f"{o['deferred_broken']} right answers the teacher got wrong; "
              f"{o['kept_fixable']} mistakes the teacher would have fixed stayed with the "
              f"student ({o['kept_wrong_teacher_too']} more that it would not have). The best "
              f"choice of as many deferrals reaches {o['best_accuracy_at_rate']:.1%}, "
              f"{o['best_gain_at_rate'] * 100:+.1f} points over random.", "",
              "Whole-curve gain over random deferral on test (area), per signal: "
              + ", ".join(f"{k} {v:+.4f}" for k, v in res["curves_gain_over_random"].items())
              + f"; signal chosen on valid: {res['signal']}.", ""]
    return "\n".join(lines)


def goal(rt: dict, target: float) -> dict:
    """The issue's goal, each part with its measured margin (positive = met by)."""
    kept, rate, gain = rt["fraction_of_teacher"], rt["deferred_fraction"], rt["gain_at_rate"]
    return {"keeps >= 95 % of the teacher": f"{kept:.1%} ({(kept - target) * 100:+.1f} points)",
            "defers <= 50 %": f"{rate:.1%} ({(0.5 - rate) * 100:+.1f} points to spare)",
            "beats random by >= 10 points": f"{gain * 100:+.1f} points "
                                            f"({(gain - 0.10) * 100:+.1f} vs the goal)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/hybrid/student", help="a finished specialist run")
    ap.add_argument("--valid", default="data/task/hybrid_valid.jsonl")
    ap.add_argument("--test", default="data/task/hybrid_test.jsonl")
    ap.add_argument("--target", type=float, default=0.95, help="share of the teacher's "
                    "accuracy on valid the rule must keep")
    ap.add_argument("--latency-queries", type=int, default=50)
    ap.add_argument("--work", default="runs/hybrid/work", help="checkpoints")
    ap.add_argument("--out", default="results/hybrid")
    ap.add_argument("--fresh", action="store_true", help="ignore the checkpoints")
    args = ap.parse_args()
    os.chdir(ROOT)  # the run's config names paths from the repository root
    if not 0 < args.target <= 1 or args.latency_queries < 1:
        raise SystemExit("error: --target must be in (0, 1] and --latency-queries >= 1")
    if not os.path.exists(os.path.join(args.run, "config.yaml")):
        raise SystemExit(f"error: {args.run}: not a finished run (no config.yaml)")
    if args.fresh:
        import shutil
        shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work, exist_ok=True)
    recs = {"fit": load_jsonl(args.valid), "report": load_jsonl(args.test)}
    cfg = api.load_run_config(args.run)
    g = cfg.generate
    from mlx_lm import load
    student, stok = api.load_student(args.run)
    teacher, ttok = load(cfg.teacher.model)
    ex = {}
    for split, rs in recs.items():
        s = cached(f"{args.work}/{split}_student.json", lambda: sheet(student, stok, rs, g))
        t = cached(f"{args.work}/{split}_teacher.json", lambda: sheet(teacher, ttok, rs, g))
        sig = cached(f"{args.work}/{split}_signals.json", lambda: confidence.answer_signals_batch(
            student, list(zip(s["prompt_ids"], s["ids"]))))
        ex[split] = examples(s, t, sig)
        print(f"{split}: student {np.mean(ex[split]['student']):.3f}, teacher "
              f"{np.mean(ex[split]['teacher']):.3f} on {len(rs)}", flush=True)
    fb = fallback.summarize(ex["report"], ex["fit"], fallback.task_quality(g.verifier),
                            confidence.ANSWER_SIGNALS,
                            {"fit": args.valid, "report": args.test},
                            targets=(args.target,))
    if not fb.get("thresholds"):
        raise SystemExit("error: no rule could be fitted: " + "; ".join(fb["warnings"]))
    th = fb["thresholds"][str(args.target)]
    rep = th["test"]
    qs, qt = np.array(ex["report"]["student"]), np.array(ex["report"]["teacher"])
    defer = fallback.deferred(ex["report"][fb["signal"]], th["threshold"], th["always_defer"])
    rule = {"signal": fb["signal"], "threshold": th["threshold"],
            "always_defer": th["always_defer"]}
    ids = cached(f"{args.work}/report_student.json", lambda: None)["prompt_ids"]
    lat = cached(f"{args.work}/latency.json", lambda: latency(
        student, stok, teacher, ttok, ids[:args.latency_queries], rule, g))
    res = {"student": args.run, "teacher": cfg.teacher.model, "signal": fb["signal"],
           "target": args.target, "quality": fb["quality"],
           "fit": {"file": args.valid, **fb["fit"],
                   "rule": {**rule, "deferred_fraction": th["fit"]["deferred_fraction"],
                            "accuracy": th["fit"]["quality"], "reached": th["fit"]["reached"]}},
           "test": {"file": args.test, "examples": int(qs.size)},
           "rows": {"student": {"accuracy": round(float(qs.mean()), 6)},
                    "teacher": {"accuracy": round(float(qt.mean()), 6)},
                    "router": {**rep, "rule_text": th["rule_text"]},
                    "random": random_row(qs, qt, int(defer.sum())),
                    "oracle": oracle_row(qs, qt)},
           "curves_gain_over_random": {s: c["gain_over_random"]
                                       for s, c in fb["test"]["curves"].items()},
           "outcomes": outcomes(qs, qt, defer),
           "by_kind": by_kind(recs["report"], qs, qt, defer),
           "latency": latency_summary(lat, rep["deferred_fraction"]),
           "ci": fb["ci"], "warnings": fb["warnings"]}
    res["goal"] = goal(rep, args.target)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    atomic_json(args.out + ".json", res)
    with atomic_path(args.out + ".md") as tmp:
        with open(tmp, "w") as f:
            f.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
