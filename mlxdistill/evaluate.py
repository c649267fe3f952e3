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

from . import data as data_mod
from . import align, fallback, files, losses, models
from .config import Config, ConfigError
from .plots import plot_deferral
from .progress import Progress
from .rundir import RunDir
from .task import task_accuracy
from .validation import EVAL_BATCH, score

ECE_BINS = 15


def _accumulate(stats: dict, key: str, value: mx.array) -> None:
    stats[key] = stats.get(key, 0.0) + value.item()


def compare(teacher, students: dict, packed: data_mod.Packed, vocab: int,
            quiet: bool = True, byte_lens: Optional[np.ndarray] = None) -> dict:
    """Per model: CE, perplexity, next-token accuracy, expected calibration error; per student
    also KL to the teacher and top-1/top-5 agreement with the teacher's most likely token.
    With `byte_lens` (the UTF-8 length of every token id), also bits per byte: the scored
    tokens' nats over the bytes of their text, a scale on which models of different
    tokenizers compare."""
    labels_all = data_mod.hard_targets(packed.input_ids, packed.next_ids)
    t_fwd = models.logits_fn(teacher, vocab)
    s_fwd = {name: models.logits_fn(m, vocab) for name, m in students.items()}
    sums: dict = {name: {} for name in ["teacher", *students]}
    calib: dict = {}  # name -> [count, sum confidence, sum correct] per confidence bin
    ntok, nbytes = 0.0, 0.0
    bar = Progress(packed.rows, "evaluate", "tok", quiet)
    for b in range(0, packed.rows, EVAL_BATCH):
        x = mx.array(packed.input_ids[b:b + EVAL_BATCH])
        labels_np = labels_all[b:b + EVAL_BATCH]
        labels = mx.array(labels_np)
        # scored positions, on the host too: the byte count and the calibration bins use them
        scored = packed.loss_mask[b:b + EVAL_BATCH].astype(bool) & (labels_np >= 0)
        mask = mx.array(scored)
        m = mask.astype(mx.float32)
        lp_t = losses.log_softmax(t_fwd(x))
        top_t = mx.argmax(lp_t, -1)
        n = m.sum().item()
        ntok += n
        if byte_lens is not None:
            nbytes += float(byte_lens[np.maximum(labels_np, 0)][scored].sum())
        for name, lp in [("teacher", lp_t)] + [(k, losses.log_softmax(f(x)))
                                               for k, f in s_fwd.items()]:
            st = sums[name]
            for key, v in score(lp, labels, mask, None if name == "teacher" else lp_t).items():
                if key != "tokens":
                    _accumulate(st, key, v)
            pred = mx.argmax(lp, -1)
            keep = scored.reshape(-1)
            conf = np.array(mx.exp(mx.max(lp, -1))).reshape(-1)[keep]
            bins = calib.setdefault(name, np.zeros((3, ECE_BINS)))
            idx = np.minimum((conf * ECE_BINS).astype(int), ECE_BINS - 1)
            np.add.at(bins[0], idx, 1.0)
            np.add.at(bins[1], idx, conf)
            np.add.at(bins[2], idx, np.array(pred == labels).reshape(-1)[keep])
            if name != "teacher":
                top5 = mx.argpartition(-lp, kth=4, axis=-1)[..., :5]
                hit = (top5 == top_t[..., None]).any(axis=-1)
                _accumulate(st, "agree_top5", (hit * m).sum())
        bar.update(x.shape[0], units=x.size)
    bar.close()
    out = {}
    for name, st in sums.items():
        r = {k: v / max(ntok, 1.0) for k, v in st.items()}
        r["ppl"] = math.exp(min(r["ce"], 50.0))
        if nbytes:
            r["bpb"] = st["ce"] / math.log(2) / nbytes
        # Expected calibration error of the top-1 prediction (equal-width confidence bins).
        r["ece"] = float(np.abs(calib[name][1] - calib[name][2]).sum() / max(ntok, 1.0))
        out[name] = {k: round(v, 4) for k, v in r.items()}
    out["tokens"] = int(ntok)
    if nbytes:
        out["bytes"] = int(nbytes)
    return out


def token_byte_lengths(tokenizer, vocab: int) -> Optional[np.ndarray]:
    """UTF-8 bytes of every token id (0 for special tokens and padding rows), or None for a
    tokenizer whose tokens cannot be mapped to bytes (bits per byte is then not reported)."""
    try:
        pieces = align.token_bytes(tokenizer)
    except align.AlignError:
        return None
    lens = np.zeros(max(vocab, len(pieces)), dtype=np.int64)
    lens[:len(pieces)] = [len(p) for p in pieces]
    return lens


def example_rows(path: str, tokenizer, seq_len: int, mask_prompt: bool,
                 max_records: Optional[int] = None):
    """One row per record (its first seq_len + 1 tokens; of the first `max_records`
    records), right-padded: the unit an app decides on is a query, not a packed row.
    Returns (ids [N, L+1], trained [N, L+1]) with trained[t] saying whether token t is
    scored; records without a scored token are dropped."""
    ids, trained = [], []
    for rec in data_mod.read_records(path)[:max_records]:
        r_ids, r_tr = [], []
        for seg, t in data_mod.record_segments(tokenizer, rec, mask_prompt):
            r_ids.extend(seg)
            r_tr.extend([t] * len(seg))
        r_ids, r_tr = r_ids[:seq_len + 1], r_tr[:seq_len + 1]
        if len(r_ids) >= 2 and any(r_tr[1:]):
            ids.append(r_ids)
            trained.append(r_tr)
    if not ids:
        raise ConfigError(f"{path} has no record with a scored token; cannot compute the "
                          "cloud-fallback curve")
    width = max(len(r) for r in ids)
    out_ids = np.zeros((len(ids), width), dtype=np.int32)
    out_tr = np.zeros((len(ids), width), dtype=bool)
    for i, (r, t) in enumerate(zip(ids, trained)):
        out_ids[i, :len(r)] = r
        out_tr[i, :len(t)] = t
    return out_ids, out_tr


def per_example(teacher, student, ids: np.ndarray, trained: np.ndarray, vocab: int) -> dict:
    """Per record: the student's confidence signals and both models' next-token accuracy."""
    t_fwd, s_fwd = models.logits_fn(teacher, vocab), models.logits_fn(student, vocab)
    out: dict = {k: [] for k in (*fallback.SIGNALS, "student", "teacher", "tokens")}
    for b in range(0, ids.shape[0], EVAL_BATCH):
        x = mx.array(ids[b:b + EVAL_BATCH, :-1])
        labels = mx.array(ids[b:b + EVAL_BATCH, 1:])
        m = mx.array(trained[b:b + EVAL_BATCH, 1:]).astype(mx.float32)
        n = m.sum(-1)
        lp_s = losses.log_softmax(s_fwd(x))
        top2 = mx.sort(mx.topk(lp_s, 2, axis=-1), axis=-1)  # [..., 1] is the top-1
        per = {"confidence": top2[..., 1], "margin": top2[..., 1] - top2[..., 0],
               "student": (mx.argmax(lp_s, -1) == labels).astype(mx.float32),
               "teacher": (mx.argmax(t_fwd(x), -1) == labels).astype(mx.float32)}
        for k, v in per.items():
            out[k] += np.array((v * m).sum(-1) / n).round(6).tolist()
        out["tokens"] += np.array(n).astype(int).tolist()
    return out


def fallback_summary(teacher, student, path: str, tokenizer, cfg, vocab: int,
                     max_records: Optional[int] = None) -> dict:
    ids, trained = example_rows(path, tokenizer, cfg.data.seq_len, cfg.data.mask_prompt,
                                max_records)
    res = fallback.summarize(per_example(teacher, student, ids, trained, vocab))
    res["data"] = path
    return res


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
                 log=print, write: bool = True, cfg: Optional[Config] = None,
                 teacher: Optional[models.Lazy] = None,
                 records: Optional[int] = None) -> dict:
    """Teacher, student before and student after on `data_path` (default: the run's
    data.test), its first `records` records (default: data.test_records; None: all): the
    table, task accuracy when the records carry answers, and the cloud-fallback curve;
    written to eval.json unless `write` is False. `cfg` and `teacher` let `train` pass what
    it already holds (its config, a teacher it kept in memory)."""
    run = RunDir(run_dir)
    cfg = cfg or run.load_config()
    if records is not None and (isinstance(records, bool) or not isinstance(records, int)
                                or records < 1):
        raise ConfigError(f"--records {records!r} must be a positive number of records")
    cap = records if records is not None else cfg.data.test_records
    teacher = teacher or models.Lazy(cfg, "teacher")
    path = data_path or cfg.data.test or cfg.data.valid
    if not path:
        raise ConfigError("no evaluation data: set data.test in the config or pass --data")
    if write:  # what eval writes, checked before the models are loaded
        fix = "move it away and run eval again"
        files.check_file(run.eval_json, "eval output", fix)
        files.check_dir(run.plots, "eval output", fix)
    teacher, ttok, tcfg = teacher.get()
    before, stok, scfg = models.load_role(cfg, "student")
    match = models.check_pair(ttok, tcfg, stok, scfg, cfg.data.seq_len)
    after = run.load_student(cfg)
    packed = data_mod.pack(path, ttok, cfg.data.seq_len, cfg.data.mask_prompt,
                           packing=cfg.data.packing, max_records=cap)
    res = compare(teacher, {"student_before": before, "student_after": after}, packed,
                  match.vocab_size, quiet, token_byte_lengths(ttok, match.vocab_size))
    res["retention"] = retention(res)
    res["data"] = path
    if cap is not None:
        res["records"] = packed.records  # the first ones only (absent: every record)
    # Task accuracy: when the records carry reference answers, each model answers greedily.
    task = task_accuracy({"teacher": teacher, "student_before": before,
                          "student_after": after}, ttok, path, cfg.generate, cap)
    if task is not None:
        res["task"] = task
    # Cloud fallback: per-query confidence of the trained student and the deferral curve.
    res["fallback"] = fallback_summary(teacher, after, path, ttok, cfg, match.vocab_size,
                                       cap)
    if write:
        files.atomic_json(run.eval_json, res)
        plot_deferral(res["fallback"], os.path.join(run.plots, "deferral.png"))
    if not quiet:
        log(format_table(res))
    return res


def read_result(path: str) -> dict:
    """A run's eval.json, as `evaluate_run` wrote it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not valid JSON; delete it and run `mlxdistill eval` on "
                          "the run to evaluate it again") from None


def format_table(res: dict) -> str:
    rows = [("metric", "teacher", "student before", "student after")]

    def g(name, key, fmt="{:.3f}"):
        v = res.get(name, {}).get(key)
        return "-" if v is None else fmt.format(v)

    for key, label, fmt in [("ce", "cross-entropy (nats)", "{:.3f}"),
                            ("ppl", "perplexity", "{:.1f}"),
                            ("bpb", "bits per byte", "{:.3f}"),
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
    task = res.get("task")
    if task:  # greedy answers to the test prompts, checked against their reference
        students = ("student_before", "student_after")
        rows.append((f"task accuracy ({task['prompts']} prompts)",
                     *(f"{task[n]['accuracy']:.3f}" for n in ("teacher", *students))))
        rows.append(("retention: task accuracy %",
                     "100.0" if task["teacher"]["accuracy"] else "-",
                     *("-" if task["retention"].get(n) is None else str(task["retention"][n])
                       for n in students)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    first = f"first {res['records']} records, " if "records" in res else ""
    lines = [f"evaluation on {res.get('data')} ({first}{res.get('tokens')} tokens)"]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j])
                               for j, c in enumerate(r)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    fb = res.get("fallback")
    if fb:
        lines.append(f"cloud fallback ({fb['examples']} examples, {fb['quality']}): student "
                     f"{fb['student_quality']:.3f}, teacher {fb['teacher_quality']:.3f}; "
                     "curve above random deferral: " + ", ".join(
                         f"{s} {c['gain_over_random']:+.4f}" for s, c in fb["curves"].items()))
        for frac, t in fb["thresholds"].items():
            lines.append(f"  {float(frac):.0%} of the teacher: defer "
                         f"{t['deferred_fraction']:.0%} of queries ({t['rule']})")
    return "\n".join(lines)
