"""Cloud fallback: when should an app hand a query to the big model instead of the student?

The app runs the student on the device, computes a confidence signal on each query
(confidence.py) and hands the query to the teacher when the signal is below a threshold.
This module fits that rule and says honestly what it buys:

- quality is the task's own score where the records carry reference answers (per example:
  is the student's greedy answer right, is the teacher's — task.py's verifier), and
  next-token accuracy against the reference text only where they do not;
- the signal (among several, confidence.py) and the threshold are chosen on one set of
  examples (the fit split: data.valid) and every reported number is measured on another
  (the report split: data.test) with that rule fixed. Without a separate data.valid the
  test examples are split in two halves (seeded): one fits, the other reports;
- the report gives 95 % intervals (Wilson for the deferral rate, a percentile bootstrap over
  the report examples for the qualities and the gain) and warns below MIN_EXAMPLES;
- the gain is measured against random deferral of the same share of queries, whose
  expected quality is student + rate × (teacher − student).

Sorting examples from least to most confident and handing the first k to the teacher gives
the *deferral curve*: quality of the combined system (teacher on the deferred examples,
student on the rest) against the fraction deferred, from the student's quality to the
teacher's. A target (a fraction of the teacher's quality on the fit split) picks the least
deferral that reaches it there; the threshold is the midpoint between the last deferred and
the first kept confidence.

`summarize` is eval.json's `fallback`, `threshold_for` export.json's, and `rule` what a
server applies: {signal, threshold, defer_when: "below", always_defer, quality, target}.
Pure functions on numpy arrays; evaluate.py measures the per-example numbers.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

NEXT_TOKEN = "next-token accuracy against the reference text"
TARGET_QUALITY = 0.9  # default target (`export --target-quality`): 90 % of the teacher's quality
TARGETS = (0.9, 0.95, 0.99)  # the targets eval reports
MIN_EXAMPLES = 30  # fewer on either split: the rule and its numbers are warned about
CI = 0.95
BOOTSTRAP = 2000  # resamples of the report examples for the intervals
SEED = 0  # of the bootstrap and of the half/half split without data.valid
SIGNAL_CHOICE = ("the largest gain over random deferral (area between the curve and the "
                 "random line) on the fit split")


def task_quality(verifier: Optional[str]) -> str:
    return f"task accuracy ({verifier or 'exact'} verifier)"


def deferral_curve(conf, q_student, q_teacher) -> dict:
    """Realizable operating points of "defer when conf < threshold", least confident first.

    Examples with equal confidence are deferred together, so only cuts between distinct
    confidences are points of the curve. Returns parallel lists: `deferred` (fraction),
    `quality` (mean per example of the combined system) and `threshold` (None = never defer
    at the first point; at the last point everything is deferred, threshold = +inf as None
    with `always` set)."""
    conf = np.asarray(conf, dtype=np.float64)
    qs = np.asarray(q_student, dtype=np.float64)
    qt = np.asarray(q_teacher, dtype=np.float64)
    if not (conf.shape == qs.shape == qt.shape) or conf.ndim != 1 or conf.size == 0:
        raise ValueError("confidence and per-example qualities must be equal-length, non-empty")
    n = conf.size
    order = np.argsort(conf, kind="stable")
    c = conf[order]
    # quality after deferring the k least confident: student total + teacher gain of the first k
    gain = np.concatenate([[0.0], np.cumsum(qt[order] - qs[order])])
    quality = (qs.sum() + gain) / n
    cuts = [0] + [k for k in range(1, n) if c[k - 1] < c[k]] + [n]
    return {
        "deferred": [k / n for k in cuts],
        "quality": [float(quality[k]) for k in cuts],
        "threshold": [None if k in (0, n) else float((c[k - 1] + c[k]) / 2) for k in cuts],
        "always": [k == n for k in cuts],
    }


def gain_over_random(curve: dict) -> float:
    """Mean quality along the curve minus that of deferring at random (the straight line from
    student to teacher): 0 for an uninformative signal, larger the better it ranks."""
    x, y = np.asarray(curve["deferred"]), np.asarray(curve["quality"])
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    return area - (y[0] + y[-1]) / 2


def choose_threshold(curve: dict, target: float, signal: str = "confidence") -> dict:
    """The least deferral whose combined quality reaches `target` (absolute). Raising the
    target never lowers the deferral. If no point reaches it, everything is deferred."""
    idx = len(curve["quality"]) - 1
    for i, q in enumerate(curve["quality"]):
        if q >= target - 1e-12:
            idx = i
            break
    always = curve["always"][idx]
    thr = curve["threshold"][idx]
    text = ("always defer" if always else "never defer" if thr is None
            else f"defer when {signal} < {thr:.6g}")
    return {"target": round(float(target), 6), "threshold": thr, "always_defer": always,
            "deferred_fraction": round(curve["deferred"][idx], 6),
            "expected_quality": round(curve["quality"][idx], 6),
            "reached": curve["quality"][idx] >= target - 1e-12, "rule_text": text}


def deferred(conf, threshold: Optional[float], always: bool) -> np.ndarray:
    """Which examples the rule hands to the teacher: conf < threshold (None: none; always:
    all) — exactly what an app does with the fitted threshold."""
    conf = np.asarray(conf, dtype=np.float64)
    if always:
        return np.ones(conf.shape, dtype=bool)
    if threshold is None:
        return np.zeros(conf.shape, dtype=bool)
    return conf < threshold


def wilson(k: int, n: int, level: float = CI) -> list:
    """Wilson score interval of a proportion k / n."""
    from statistics import NormalDist

    if n == 0:
        return [0.0, 1.0]
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, mid - half), 6), round(min(1.0, mid + half), 6)]


def _interval(samples: np.ndarray, level: float = CI) -> Optional[list]:
    s = samples[np.isfinite(samples)]
    if s.size == 0:
        return None
    lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2])
    return [round(float(lo), 6), round(float(hi), 6)]


def random_quality(qs, qt, rate):
    """The expected quality of deferring a share `rate` of the queries at random: the
    student's mean plus that share of the teacher's gain over it (numpy: along the last
    axis, so per bootstrap resample too)."""
    ms, mt = np.mean(qs, -1), np.mean(qt, -1)
    return ms + rate * (mt - ms)


def report(defer: np.ndarray, qs, qt, seed: int = SEED, resamples: int = BOOTSTRAP) -> dict:
    """What a fixed rule does on the report examples: the share deferred, the system's
    quality (absolute and as a fraction of the teacher's), the quality of deferring the same
    share at random (in expectation) and the gain over it, each with its interval."""
    qs, qt = np.asarray(qs, dtype=np.float64), np.asarray(qt, dtype=np.float64)
    d = np.asarray(defer, dtype=bool)
    n = d.size
    system = np.where(d, qt, qs)

    def stats(idx):  # per resample (rows of idx): rate, quality, fraction, gain
        rate, mt = d[idx].mean(-1), qt[idx].mean(-1)
        quality = system[idx].mean(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(mt > 0, quality / np.where(mt > 0, mt, 1), np.nan)
        return rate, quality, frac, quality - random_quality(qs[idx], qt[idx], rate)

    rate, quality, frac, gain = (float(v[0]) for v in stats(np.arange(n)[None]))
    boot = stats(np.random.default_rng(seed).integers(0, n, size=(resamples, n)))
    t = float(qt.mean())
    return {"examples": n, "deferred": int(d.sum()),
            "deferred_fraction": round(rate, 6), "deferred_fraction_ci": wilson(int(d.sum()), n),
            "student_quality": round(float(qs.mean()), 6), "teacher_quality": round(t, 6),
            "quality": round(quality, 6), "quality_ci": _interval(boot[1]),
            "fraction_of_teacher": round(frac, 6) if t > 0 else None,
            "fraction_of_teacher_ci": _interval(boot[2]) if t > 0 else None,
            "random_quality": round(float(random_quality(qs, qt, rate)), 6),
            "gain_at_rate": round(gain, 6), "gain_at_rate_ci": _interval(boot[3])}


def choose_signal(examples: dict, signals) -> tuple[str, dict]:
    """The signal whose curve lies furthest above random deferral on `examples` (the fit
    split), and every signal's gain there; ties go to the first listed."""
    gains = {s: round(gain_over_random(deferral_curve(examples[s], examples["student"],
                                                      examples["teacher"])), 6)
             for s in signals}
    return max(signals, key=lambda s: gains[s]), gains


def halves(examples: dict, seed: int = SEED) -> tuple[dict, dict]:
    """A seeded split of one set of examples into a fit half and a report half (the report
    half gets the odd one out), for when there is no separate validation split."""
    n = len(examples["student"])
    perm = np.random.default_rng(seed).permutation(n)
    fit, rep = np.sort(perm[:n // 2]), np.sort(perm[n // 2:])
    return ({k: [v[i] for i in fit] for k, v in examples.items()},
            {k: [v[i] for i in rep] for k, v in examples.items()})


def _rounded(curve: dict) -> dict:
    return {k: [None if v is None else round(v, 6) if isinstance(v, float) else v
                for v in vals] for k, vals in curve.items()}


def summarize(test: dict, fit: Optional[dict], quality: str, signals: dict,
              data: dict, targets=TARGETS, why: Optional[str] = None) -> dict:
    """The rule fitted on `fit` and reported on `test`, for each target fraction of the
    teacher's quality (e.g. 0.95 = the combined system keeps 95 % of it).

    test / fit: per-example lists {signal name: ..., "student": quality, "teacher": quality}
    (fit None: no validation examples, for the reason `why`; `test` is then split in
    halves and `data` says so). quality: what the per-example quality is (task_quality /
    NEXT_TOKEN). signals: {name: meaning}. data: {"fit": file, "report": file, ...} where
    the examples come from."""
    warnings = []
    if fit is None:
        fit, test = halves(test)
        data = {**data, "fit": f"a seeded half of {data['report']} (seed {SEED})",
                "report": f"the other half of {data['report']}"}
        warnings.append(f"{why or 'no validation examples'}: the rule is fitted on a seeded "
                        "half of the test examples and reported on the other half; set "
                        "data.valid to fit it on validation examples")
    n_fit, n_test = len(fit["student"]), len(test["student"])
    for split, n in (("fit", n_fit), ("report", n_test)):
        if n < MIN_EXAMPLES:
            warnings.append(f"only {n} examples on the {split} split (< {MIN_EXAMPLES}): "
                            "the threshold and its figures are unreliable; evaluate on more "
                            "records (data.valid, data.test, generate.eval_prompts)")
    out = {"quality": quality, "defer_when": "below", "signals": signals,
           "signal_choice": SIGNAL_CHOICE, "data": data, "min_examples": MIN_EXAMPLES,
           "ci": f"{CI:.0%}: Wilson for the deferral rate, percentile bootstrap ({BOOTSTRAP} "
                 f"resamples of the report examples, seed {SEED}) for qualities and gains",
           "warnings": warnings, "per_example": {"fit": fit, "test": test}}
    if n_fit == 0 or n_test == 0:
        out["warnings"].append("too few examples to fit the rule on one split and report it "
                               "on another: no rule")
        out["thresholds"] = {}
        return out
    signal, fit_gains = choose_signal(fit, list(signals))
    qs, qt = test["student"], test["teacher"]
    out.update(signal=signal, signal_meaning=signals[signal],
               fit={"examples": n_fit, "student_quality": round(float(np.mean(fit["student"])), 6),
                    "teacher_quality": round(float(np.mean(fit["teacher"])), 6),
                    "gain_over_random": fit_gains},
               test={"examples": n_test, "student_quality": round(float(np.mean(qs)), 6),
                     "teacher_quality": round(float(np.mean(qt)), 6), "curves": {}},
               thresholds={})
    for sig in signals:
        curve = deferral_curve(test[sig], qs, qt)
        out["test"]["curves"][sig] = {**_rounded(curve),
                                      "gain_over_random": round(gain_over_random(curve), 6)}
    fit_curve = deferral_curve(fit[signal], fit["student"], fit["teacher"])
    for frac in targets:
        chosen = choose_threshold(fit_curve, frac * float(np.mean(fit["teacher"])), signal)
        if frac == TARGET_QUALITY:  # what a server applies by default
            out["rule"] = rule(signal, chosen, quality, frac)
        rep = report(deferred(test[signal], chosen["threshold"], chosen["always_defer"]), qs, qt)
        out["thresholds"][str(frac)] = {
            "target": frac, "threshold": chosen["threshold"],
            "always_defer": chosen["always_defer"], "rule_text": chosen["rule_text"],
            "fit": {"deferred_fraction": chosen["deferred_fraction"],
                    "quality": chosen["expected_quality"], "reached": chosen["reached"]},
            "test": {**rep, "reached": rep["fraction_of_teacher"] is not None
                     and rep["fraction_of_teacher"] >= frac - 1e-9}}
    return out


def rule(signal: str, chosen: dict, quality: str, target: float) -> dict:
    """What an app or server needs to apply a rule: defer when the signal (computed as
    confidence.answer_signals computes it) is below the threshold, or always."""
    return {"signal": signal, "threshold": chosen["threshold"], "defer_when": "below",
            "always_defer": chosen["always_defer"], "quality": quality, "target": target}


def threshold_for(summary: Optional[dict], target_fraction: float) -> Optional[dict]:
    """export.json's `fallback`: the rule for `target_fraction` of the teacher's quality
    from a summary that computed it, with its figures on the report split; None without a
    rule. An app reads signal, threshold, defer_when (and always_defer: a rule that
    defers everything has no threshold), also gathered in `rule`."""
    if not summary or not summary.get("thresholds"):
        return None
    t = summary["thresholds"][str(target_fraction)]
    curve = summary["test"]["curves"][summary["signal"]]
    return {"signal": summary["signal"], "threshold": t["threshold"], "defer_when": "below",
            "always_defer": t["always_defer"], "rule_text": t["rule_text"],
            "quality": summary["quality"],
            "target": target_fraction, "signal_meaning": summary["signal_meaning"],
            "computed_by": summary.get("computed_by"),
            "signal_choice": summary["signal_choice"], "data": summary["data"],
            "fit": {**{k: summary["fit"][k] for k in ("examples", "student_quality",
                                                        "teacher_quality")}, **t["fit"]},
            "test": {**t["test"], "gain_over_random_area": curve["gain_over_random"]},
            "ci": summary["ci"], "warnings": summary["warnings"],
            "rule": rule(summary["signal"], t, summary["quality"], target_fraction)}



def _pct(ci: Optional[list]) -> str:
    return "" if not ci else f" [{ci[0]:.1%}, {ci[1]:.1%}]"


def describe(fb: dict) -> list[str]:
    """The summary as lines of the evaluation table."""
    d = fb["data"]
    lines = [f"cloud fallback, graded by {fb['quality']}"]
    if fb.get("thresholds"):
        lines[0] += (f": rule fitted on {d['fit']} ({fb['fit']['examples']} examples), "
                     f"reported on {d['report']} ({fb['test']['examples']} examples); signal "
                     f"{fb['signal']} (of {', '.join(fb['signals'])})")
        t = fb["test"]
        lines.append(f"  test: student {t['student_quality']:.3f}, teacher "
                     f"{t['teacher_quality']:.3f}; whole-curve gain over random deferral: "
                     + ", ".join(f"{s} {c['gain_over_random']:+.4f}"
                                 for s, c in t["curves"].items()))
    for frac, r in fb.get("thresholds", {}).items():
        t = r["test"]
        kept = ("-" if t["fraction_of_teacher"] is None
                else f"{t['fraction_of_teacher']:.1%}{_pct(t['fraction_of_teacher_ci'])}")
        lines.append(f"  {float(frac):.0%} of the teacher on the fit split: {r['rule_text']} -> "
                     f"test: {t['deferred_fraction']:.1%}{_pct(t['deferred_fraction_ci'])} "
                     f"deferred, system keeps {kept} of the teacher's quality, "
                     f"{t['gain_at_rate']:+.3f} over random deferral of that share"
                     + ("" if not t["gain_at_rate_ci"] else
                        f" [{t['gain_at_rate_ci'][0]:+.3f}, {t['gain_at_rate_ci'][1]:+.3f}]"))
    lines += [f"  warning: {w}" for w in fb.get("warnings", [])]
    return lines


def card_section(fb: dict) -> list[str]:
    """The model card's "## Cloud fallback" section from export.json's `fallback`."""
    t, f, d = fb["test"], fb["fit"], fb["data"]

    def ci(v: Optional[list], fmt: str) -> str:
        return "-" if not v else f"{fmt.format(v[0])} – {fmt.format(v[1])}"

    kept = "-" if t["fraction_of_teacher"] is None else f"{t['fraction_of_teacher']:.1%}"
    lines = ["## Cloud fallback", "",
             f"This model answers on the device; the query goes to the teacher instead "
             f"(\"deferred\") by the rule **{fb['rule_text']}**"
             + ("" if fb["always_defer"] or fb["threshold"] is None else
                f", where {fb['signal']} = {fb['signal_meaning']} "
                f"(`{fb.get('computed_by')}`)") + ".", "",
             f"Quality = {fb['quality']}. The signal ({SIGNAL_CHOICE}) and the threshold were "
             f"chosen on {d['fit']} ({f['examples']} examples) to keep "
             f"{fb['target']:.0%} of the teacher's quality there (reached: "
             f"{'yes' if f['reached'] else 'no'}); the figures below are measured on "
             f"{d['report']} ({t['examples']} examples), which took no part in that choice. "
             f"Intervals: {fb['ci']}.", "",
             "| on the report split | value | 95 % interval |", "|---|---|---|",
             f"| queries deferred to the teacher | {t['deferred_fraction']:.1%} | "
             f"{ci(t['deferred_fraction_ci'], '{:.1%}')} |",
             f"| quality of student + teacher | {t['quality']:.4f} | "
             f"{ci(t['quality_ci'], '{:.4f}')} |",
             f"| … as a share of the teacher's ({t['teacher_quality']:.4f}) | {kept} | "
             f"{ci(t['fraction_of_teacher_ci'], '{:.1%}')} |",
             f"| student alone | {t['student_quality']:.4f} | |",
             f"| random deferral of the same share | {t['random_quality']:.4f} | |",
             f"| gain over random deferral at this share | {t['gain_at_rate']:+.4f} | "
             f"{ci(t['gain_at_rate_ci'], '{:+.4f}')} |",
             f"| gain over random deferral, whole curve (area) | "
             f"{t['gain_over_random_area']:+.4f} | |", ""]
    lines += [f"Warning: {w}." for w in fb.get("warnings", [])]
    return lines + ([""] if fb.get("warnings") else [])
