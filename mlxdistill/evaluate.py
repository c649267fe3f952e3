"""Evaluate a run against its teacher on held-out text: teacher, student before, student after.

Always full-vocabulary KL(teacher ‖ student) against the live teacher, whatever targets the
student was trained on, so a biased objective cannot hide behind agreement.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import mlx.core as mx
import numpy as np
import yaml

from . import data as data_mod
from . import losses, models
from .config import ConfigError, from_dict
from .progress import Progress

EVAL_BATCH = 4
ECE_BINS = 15


def _load_run_config(run_dir: str):
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); pass the "
                          "run.dir of a `mlxdistill train` run")
    with open(path) as f:
        return from_dict(yaml.safe_load(f) or {}, source=path)


def load_trained_student(run_dir: str, cfg):
    if os.path.isdir(os.path.join(run_dir, "model")):
        return models.load(os.path.join(run_dir, "model"), "trained student",
                           trust_remote_code=cfg.student.trust_remote_code)[0]
    if os.path.isfile(os.path.join(run_dir, "adapters.safetensors")):
        return models.load_role(cfg, "student", adapter_path=run_dir)[0]
    raise ConfigError(f"{run_dir} has neither model/ nor adapters.safetensors; the run did not "
                      "finish: rerun `mlxdistill train` with the same config to complete it")


def _accumulate(stats: dict, key: str, value: mx.array) -> None:
    stats[key] = stats.get(key, 0.0) + value.item()


def compare(teacher, students: dict, packed: data_mod.Packed, vocab: int,
            quiet: bool = True) -> dict:
    """Per model: CE, perplexity, next-token accuracy, expected calibration error; per student
    also KL to the teacher and top-1/top-5 agreement with the teacher's most likely token."""
    labels_all = data_mod.hard_targets(packed.input_ids, packed.next_ids)
    t_fwd = models.logits_fn(teacher, vocab)
    s_fwd = {name: models.logits_fn(m, vocab) for name, m in students.items()}
    sums: dict = {name: {} for name in ["teacher", *students]}
    calib: dict = {}  # name -> [count, sum confidence, sum correct] per confidence bin
    ntok = 0.0
    bar = Progress(packed.rows, "evaluate", "tok", quiet)
    for b in range(0, packed.rows, EVAL_BATCH):
        x = mx.array(packed.input_ids[b:b + EVAL_BATCH])
        labels = mx.array(labels_all[b:b + EVAL_BATCH])
        mask = mx.array(packed.loss_mask[b:b + EVAL_BATCH]).astype(mx.bool_) & (labels >= 0)
        m = mask.astype(mx.float32)
        lp_t = losses.log_softmax(t_fwd(x))
        top_t = mx.argmax(lp_t, -1)
        n = m.sum().item()
        ntok += n
        for name, lp in [("teacher", lp_t)] + [(k, losses.log_softmax(f(x)))
                                               for k, f in s_fwd.items()]:
            st = sums[name]
            ce, _ = losses.masked_mean(
                -mx.take_along_axis(lp, mx.maximum(labels, 0)[..., None], -1)[..., 0], mask)
            _accumulate(st, "ce", ce * n)
            pred = mx.argmax(lp, -1)
            _accumulate(st, "accuracy", ((pred == labels) * m).sum())
            keep = np.array(mask).reshape(-1)
            conf = np.array(mx.exp(mx.max(lp, -1))).reshape(-1)[keep]
            bins = calib.setdefault(name, np.zeros((3, ECE_BINS)))
            idx = np.minimum((conf * ECE_BINS).astype(int), ECE_BINS - 1)
            np.add.at(bins[0], idx, 1.0)
            np.add.at(bins[1], idx, conf)
            np.add.at(bins[2], idx, np.array(pred == labels).reshape(-1)[keep])
            if name != "teacher":
                _accumulate(st, "kl", (losses.dense_kl_pos(lp, lp_t) * m).sum())
                _accumulate(st, "agree_top1", ((mx.argmax(lp, -1) == top_t) * m).sum())
                top5 = mx.argpartition(-lp, kth=4, axis=-1)[..., :5]
                hit = (top5 == top_t[..., None]).any(axis=-1)
                _accumulate(st, "agree_top5", (hit * m).sum())
        bar.update(x.shape[0], units=x.size)
    bar.close()
    out = {}
    for name, st in sums.items():
        r = {k: v / max(ntok, 1.0) for k, v in st.items()}
        r["ppl"] = math.exp(min(r["ce"], 50.0))
        # Expected calibration error of the top-1 prediction (equal-width confidence bins).
        r["ece"] = float(np.abs(calib[name][1] - calib[name][2]).sum() / max(ntok, 1.0))
        out[name] = {k: round(v, 4) for k, v in r.items()}
    out["tokens"] = int(ntok)
    return out


def retention(res: dict) -> dict:
    """How much of the teacher's capability each student keeps, in %: next-token accuracy
    relative to the teacher's, and CE relative to the teacher's (teacher CE / student CE)."""
    t = res["teacher"]
    out = {}
    for name in ("student_before", "student_after"):
        if name in res:
            s = res[name]
            out[name] = {"accuracy_pct": round(100 * s["accuracy"] / max(t["accuracy"], 1e-9), 1),
                         "ce_pct": round(100 * t["ce"] / max(s["ce"], 1e-9), 1)}
    return out


def evaluate_run(run_dir: str, data_path: Optional[str] = None, quiet: bool = False,
                 log=print, write: bool = True) -> dict:
    cfg = _load_run_config(run_dir)
    path = data_path or cfg.data.test or cfg.data.valid
    if not path:
        raise ConfigError("no evaluation data: set data.test in the config or pass --data")
    teacher, ttok, tcfg = models.load_role(cfg, "teacher")
    before, stok, scfg = models.load_role(cfg, "student")
    match = models.check_vocab(ttok, tcfg, stok, scfg)
    after = load_trained_student(run_dir, cfg)
    packed = data_mod.pack(path, ttok, cfg.data.seq_len, cfg.data.mask_prompt)
    res = compare(teacher, {"student_before": before, "student_after": after}, packed,
                  match.vocab_size, quiet)
    res["retention"] = retention(res)
    res["data"] = path
    if write:
        tmp = os.path.join(run_dir, "eval.json.tmp")
        with open(tmp, "w") as f:
            json.dump(res, f, indent=2)
        os.replace(tmp, os.path.join(run_dir, "eval.json"))
    if not quiet:
        log(format_table(res))
    return res


def format_table(res: dict) -> str:
    rows = [("metric", "teacher", "student before", "student after")]

    def g(name, key, fmt="{:.3f}"):
        v = res.get(name, {}).get(key)
        return "-" if v is None else fmt.format(v)

    for key, label, fmt in [("ce", "cross-entropy (nats)", "{:.3f}"),
                            ("ppl", "perplexity", "{:.1f}"),
                            ("accuracy", "next-token accuracy", "{:.3f}"),
                            ("kl", "KL(teacher‖student)", "{:.3f}"),
                            ("agree_top1", "top-1 agreement", "{:.3f}"),
                            ("agree_top5", "top-5 agreement", "{:.3f}"),
                            ("ece", "calibration error (ECE)", "{:.3f}")]:
        rows.append((label, g("teacher", key, fmt), g("student_before", key, fmt),
                     g("student_after", key, fmt)))
    ret = res.get("retention", {})
    for key, label in (("accuracy_pct", "retention: accuracy %"), ("ce_pct", "retention: CE %")):
        rows.append((label, "100.0", str(ret.get("student_before", {}).get(key, "-")),
                     str(ret.get("student_after", {}).get(key, "-"))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"evaluation on {res.get('data')} ({res.get('tokens')} tokens)"]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j])
                               for j, c in enumerate(r)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
