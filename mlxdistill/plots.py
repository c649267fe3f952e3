"""Loss and validation curves from metrics.jsonl -> PNG (matplotlib, headless)."""

from __future__ import annotations

import json
import os

from . import files


def plot_metrics(metrics_path: str, out_dir: str) -> list[str]:
    if not os.path.exists(metrics_path):
        return []
    with open(metrics_path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    if not recs:
        return []
    # matplotlib here, not at the top: slow to import, and only plotting needs it
    import matplotlib

    matplotlib.use("Agg")  # no display on CI / over ssh
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    panels = [("loss.png", [("loss", "train loss"), ("kd", "train KD"), ("ce", "train CE")]),
              ("eval.png", [("val_kl", "val KL(teacher‖student)"), ("val_ce", "val CE"),
                            ("val_agree", "val top-1 agreement")])]
    for name, series in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        drew = False
        for key, label in series:
            pts = [(r["step"], r[key]) for r in recs if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=label)
                drew = True
        if drew:
            ax.set_xlabel("step")
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = os.path.join(out_dir, name)
            with files.atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=100)
            written.append(path)
        plt.close(fig)
    return written


def plot_deferral(fb: dict, path: str) -> str:
    """Combined student + teacher quality against the fraction of queries deferred."""
    import matplotlib  # here, not at the top: see plot_metrics

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for sig, curve in fb["curves"].items():
        ax.plot([100 * d for d in curve["deferred"]], curve["quality"], label=f"by {sig}")
    ax.plot([0, 100], [fb["student_quality"], fb["teacher_quality"]], color="black", lw=0.8,
            ls="-.", label="random deferral")
    ax.axhline(fb["teacher_quality"], color="grey", ls=":", label="teacher alone")
    ax.axhline(fb["student_quality"], color="grey", ls="--", label="student alone")
    ax.set_xlabel("% of queries deferred to the teacher")
    ax.set_ylabel("next-token accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
