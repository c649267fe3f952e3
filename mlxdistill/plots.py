"""Loss and validation curves from metrics.jsonl -> PNG (matplotlib, headless)."""

from __future__ import annotations

import json
import os
from typing import Optional

from . import files


def plot_metrics(metrics_path: str, out_dir: str) -> list[str]:
    if not os.path.exists(metrics_path):
        return []
    with open(metrics_path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    if not recs:
        return []
    figures = metric_figures(recs)
    import matplotlib.pyplot as plt  # after metric_figures chose the headless backend

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, fig in figures:
        path = os.path.join(out_dir, name)
        with files.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# One axis per unit: nats (losses, divergences) and fractions never share a y-axis.
NATS = "nats per token"
PANELS = [
    ("loss.png", [[("loss", "train loss (objective)"), ("kd", "train KD"),
                   ("ce", "train CE")]], [NATS]),
    ("eval.png", [[("val_kl", "val KL(teacher‖student)"), ("val_ce", "val CE")],
                  [("val_agree", "val top-1 agreement")]],
     [NATS, "fraction of positions"]),
]


def metric_figures(recs: list[dict]) -> list[tuple]:
    """(file name, matplotlib figure) per chart that has data: one panel per unit, each with
    its y-label, the step on the x-axis and a legend. The caller closes the figures."""
    # matplotlib here, not at the top: slow to import, and only plotting needs it
    import matplotlib

    matplotlib.use("Agg")  # no display on CI / over ssh
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = []
    for name, groups, units in PANELS:
        groups = [[(key, label, [(r["step"], r[key]) for r in recs if key in r])
                   for key, label in series] for series in groups]
        kept = [(series, unit) for series, unit in zip(groups, units)
                if any(pts for _, _, pts in series)]
        if not kept:
            continue
        fig, axes = plt.subplots(len(kept), 1, sharex=True, squeeze=False,
                                 figsize=(6, 2.2 + 1.8 * len(kept)))
        for ax, (series, unit) in zip(axes[:, 0], kept):
            for _, label, pts in series:
                if pts:
                    ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=label)
            ax.set_ylabel(unit)
            ax.legend()
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 7.5
        fig.tight_layout()
        out.append((name, fig))
    return out


def plot_deferral(fb: dict, path: str) -> Optional[str]:
    """The report split's deferral curves (the chosen signal bold), random deferral, and
    where each fitted threshold lands on that split (with its intervals); None without a
    rule."""
    if not fb.get("thresholds"):
        return None
    import matplotlib  # here, not at the top: see metric_figures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = fb["test"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for sig, curve in test["curves"].items():
        chosen = sig == fb["signal"]
        ax.plot([100 * d for d in curve["deferred"]], curve["quality"],
                lw=2.0 if chosen else 0.9, alpha=1.0 if chosen else 0.6,
                label=f"by {sig}" + (" (chosen)" if chosen else ""))
    ax.plot([0, 100], [test["student_quality"], test["teacher_quality"]], color="black",
            lw=0.8, ls="-.", label="random deferral")
    ax.axhline(test["teacher_quality"], color="grey", ls=":", label="teacher alone")
    ax.axhline(test["student_quality"], color="grey", ls="--", label="student alone")
    for frac, r in fb["thresholds"].items():
        t = r["test"]
        x, y = 100 * t["deferred_fraction"], t["quality"]
        lo, hi = t["deferred_fraction_ci"]
        xerr = [[x - 100 * lo], [100 * hi - x]]
        yerr = None if not t["quality_ci"] else [[y - t["quality_ci"][0]],
                                                 [t["quality_ci"][1] - y]]
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", ms=4, capsize=2,
                    label=f"rule for {float(frac):.0%} of teacher")
    ax.set_title(f"report split ({test['examples']} examples); rule fitted on the fit split",
                 fontsize=8)
    ax.set_xlabel("% of queries deferred to the teacher")
    ax.set_ylabel(fb["quality"], fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
