"""Cloud fallback: when should an app hand a query to the big model instead of the student?

Per example the student reports a confidence it can compute on the device while it runs —
the mean log-probability of its own top-1 prediction over the example's positions (and,
also recorded, the mean margin between its two most likely tokens). Sorting examples from
least to most confident and handing the first k to the teacher gives the *deferral curve*:
quality of the combined system (teacher on the deferred examples, student on the rest)
against the fraction deferred. It starts at the student's quality (nothing deferred) and
ends at the teacher's (everything deferred). A target quality then picks the smallest
deferral that reaches it, and the app's rule is: defer when confidence < threshold.

Pure functions on numpy arrays; evaluate.py measures the per-example numbers.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

SIGNAL = "confidence"
SIGNALS = {
    "confidence": "mean over the example's positions of the student's log-probability of its "
                  "own most likely next token",
    "margin": "mean over the example's positions of the student's log-probability gap between "
              "its two most likely next tokens",
}
QUALITY = "next-token accuracy against the reference text, averaged per example"
TARGET_QUALITY = 0.9  # default target (`export --target-quality`): 90 % of the teacher's quality


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


def choose_threshold(curve: dict, target: float) -> dict:
    """The least deferral whose combined quality reaches `target` (absolute). Raising the
    target never lowers the deferral. If no point reaches it, everything is deferred."""
    idx = len(curve["quality"]) - 1
    for i, q in enumerate(curve["quality"]):
        if q >= target - 1e-12:
            idx = i
            break
    always = curve["always"][idx]
    thr = curve["threshold"][idx]
    rule = ("always defer" if always else "never defer" if thr is None
            else f"defer when confidence < {thr:.6g}")
    return {"target": round(float(target), 6), "threshold": thr, "always_defer": always,
            "deferred_fraction": round(curve["deferred"][idx], 6),
            "expected_quality": round(curve["quality"][idx], 6),
            "reached": curve["quality"][idx] >= target - 1e-12, "rule": rule}


def summarize(per_example: dict, targets=(0.9, 0.95, 0.99)) -> dict:
    """Curves for every signal plus thresholds for targets given as fractions of the
    teacher's quality (e.g. 0.95 = the combined system keeps 95 % of it)."""
    qs, qt = per_example["student"], per_example["teacher"]
    t_quality = float(np.mean(qt))
    out = {"quality": QUALITY, "signal": SIGNAL, "signals": SIGNALS,
           "examples": len(qs), "student_quality": round(float(np.mean(qs)), 6),
           "teacher_quality": round(t_quality, 6), "curves": {}, "thresholds": {},
           "per_example": per_example}
    for sig in SIGNALS:
        curve = deferral_curve(per_example[sig], qs, qt)
        out["curves"][sig] = {k: [None if v is None else round(v, 6) if isinstance(v, float)
                                  else v for v in vals] for k, vals in curve.items()}
        out["curves"][sig]["gain_over_random"] = round(gain_over_random(curve), 6)
    for frac in targets:
        out["thresholds"][str(frac)] = choose_threshold(
            deferral_curve(per_example[SIGNAL], qs, qt), frac * t_quality)
    return out


def threshold_for(summary: Optional[dict], target_fraction: float) -> Optional[dict]:
    """The threshold for `target_fraction` of the teacher's quality from a summary, or None."""
    if not summary:
        return None
    pe = summary["per_example"]
    curve = deferral_curve(pe[SIGNAL], pe["student"], pe["teacher"])
    res = choose_threshold(curve, target_fraction * summary["teacher_quality"])
    return {"signal": SIGNAL, "signal_meaning": SIGNALS[SIGNAL], "quality": QUALITY,
            "target_fraction_of_teacher": target_fraction,
            "student_quality": summary["student_quality"],
            "teacher_quality": summary["teacher_quality"], **res}
