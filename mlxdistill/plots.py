"""Loss and validation curves from metrics.jsonl -> PNG (matplotlib, headless)."""

from __future__ import annotations

import json
import os


def plot_metrics(metrics_path: str, out_dir: str) -> list[str]:
    if not os.path.exists(metrics_path):
        return []
    with open(metrics_path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    if not recs:
        return []
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
            fig.savefig(path + ".tmp.png", dpi=100)
            os.replace(path + ".tmp.png", path)
            written.append(path)
        plt.close(fig)
    return written
