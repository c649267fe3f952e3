"""What a user sees: the progress bar fits the terminal, validation lines stay on screen,
`train` ends by saying where its outputs are, and the plots say what they show."""

import io
import json
import os

import pytest
from conftest import tiny_overrides

from mlxdistill import api, plots, trainer
from mlxdistill.config import load_config
from mlxdistill.progress import Progress


class Tty(io.StringIO):
    """A terminal's stream as Progress sees it."""

    def isatty(self):
        return True


def screen(text: str) -> list[str]:
    """The lines a terminal shows after `text`: "\\r" returns to column 0, and what follows
    overwrites what was there."""
    lines, cur, col = [], [], 0
    for ch in text:
        if ch == "\n":
            lines.append("".join(cur).rstrip())
            cur, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            if col < len(cur):
                cur[col] = ch
            else:
                cur.append(ch)
            col += 1
    return lines + ["".join(cur).rstrip()]


@pytest.mark.parametrize("cols", [20, 40, 60, 80, 100, 200])
def test_bar_never_exceeds_the_terminal_width(monkeypatch, cols):
    monkeypatch.setenv("COLUMNS", str(cols))  # what shutil.get_terminal_size reads first
    tty = Tty()
    bar = Progress(100_000, "teacher pass (sample)", "tok", stream=tty)
    assert bar.enabled
    bar.start -= 100  # a plausible rate and ETA, not millions of tok/s
    for i in range(10):
        bar._last = 0.0  # draw every update
        bar.update(10_000, units=1e6, postfix="loss 2.345" if i % 2 else "")
    bar.close()
    drawn = [seg for seg in tty.getvalue().replace("\n", "\r").split("\r") if seg]
    assert len(drawn) == 10
    assert max(len(seg) for seg in drawn) < cols, drawn
    # what matters survives the squeeze: the counts, then the loss, then the bar
    for i, seg in enumerate(drawn):
        assert seg.startswith(f"{(i + 1) * 10_000}/100000") or cols >= 60, seg
        assert "loss 2.345" in seg or not (i % 2 and cols >= 60), seg
        assert seg.startswith("teacher pass (sample) [#") or cols < 100, seg


def test_message_lands_above_the_bar(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    tty = Tty()
    bar = Progress(10, "train", stream=tty)
    bar.update(3, postfix="loss 1.000")
    bar.message("step 3/10: val_kl 0.5", lambda m: tty.write(m + "\n"))
    bar._last = 0.0  # past the redraw interval
    bar.update(1)
    shown = screen(tty.getvalue())
    assert shown[0] == "step 3/10: val_kl 0.5", shown
    assert shown[1].startswith("train [") and "4/10" in shown[1], shown


def test_message_without_a_terminal_is_the_plain_line():
    out = io.StringIO()
    bar = Progress(10, "train", stream=out)
    lines = []
    bar.update(5)
    bar.message("step 5/10: val_kl 0.5", lines.append)
    bar.close()
    assert lines == ["step 5/10: val_kl 0.5"] and out.getvalue() == ""


@pytest.fixture(scope="module")
def tty_run(tiny, tmp_path_factory):
    """A train run whose bar and log share one (fake) terminal, as on a Mac's."""
    tmp = tmp_path_factory.mktemp("tty")
    cfg = load_config(None, tiny_overrides(tiny, tmp, **{"train.iters": 8}))
    tty = Tty()
    mp = pytest.MonkeyPatch()
    mp.setattr("sys.stderr", tty)  # Progress draws on stderr
    mp.setenv("COLUMNS", "60")
    logged = []

    def log(m):
        logged.append(m)
        tty.write(m + "\n")

    try:
        res = api.train(cfg, quiet=False, log=log)
    finally:
        mp.undo()
    return cfg, res, tty.getvalue(), logged


def test_validation_lines_stay_on_a_terminal(tty_run):
    cfg, _, out, _ = tty_run
    recs = [json.loads(x) for x in open(os.path.join(cfg.run.dir, "metrics.jsonl"))]
    assert "\r" in out  # the bar did draw
    shown = screen(out)
    for r in (r for r in recs if "val_kl" in r):
        line = next((s for s in shown if s.startswith(f"step {r['step']}/8: ")), None)
        assert line is not None, shown
        # the whole line, nothing of the bar drawn over it or glued to it
        assert line == trainer.validation_line(r, 8), line
        assert f"val_kl {r['val_kl']:.4g}" in line and "[" not in line, line
    assert all(len(s) < 60 for s in shown if s.startswith("train [")), shown


def test_train_ends_naming_its_outputs(tty_run):
    cfg, _, _, logged = tty_run
    block = logged[-1].splitlines()
    assert block[0] == f"outputs in {cfg.run.dir}:"
    named = {}
    for line in block[1:]:
        what, path = line.split()[:2]
        named[what] = path
        assert os.path.exists(path), line
    assert named["model"] == os.path.join(cfg.run.dir, "model")
    assert named["evaluation"].endswith("eval.json") and named["metrics"].endswith(".jsonl")
    listed = block[-1].split("(")[1].rstrip(")").split(", ")
    assert {"loss.png", "eval.png", "deferral.png"} <= set(listed)
    assert all(os.path.isfile(os.path.join(named["plots"], n)) for n in listed)


def test_plots_label_their_axes_and_never_mix_units(tty_run):
    cfg, _, _, _ = tty_run
    import matplotlib.pyplot as plt

    recs = [json.loads(x) for x in open(os.path.join(cfg.run.dir, "metrics.jsonl"))]
    figs = dict(plots.metric_figures(recs))
    try:
        assert set(figs) == {"loss.png", "eval.png"}
        units = {}
        for name, fig in figs.items():
            for ax in fig.axes:
                labels = [ln.get_label() for ln in ax.get_lines()]
                assert ax.get_ylabel() and ax.get_legend() is not None, (name, labels)
                units.update({lab: ax.get_ylabel() for lab in labels})
            assert fig.axes[-1].get_xlabel() == "step"
        assert units["val top-1 agreement"] == "fraction of positions"
        assert units["val KL(teacher‖student)"] == units["val CE"] == "nats per token"
        assert units["train loss (objective)"] == "nats per token"
        # one axis, one unit: no axis holds both a fraction and a divergence
        for ax in figs["eval.png"].axes:
            labels = {ln.get_label() for ln in ax.get_lines()}
            assert not ("val top-1 agreement" in labels and len(labels) > 1), labels
    finally:
        for fig in figs.values():
            plt.close(fig)
