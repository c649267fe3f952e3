"""Evaluate a run against its teacher on held-out text: teacher, student before, student after.

Always full-vocabulary KL(teacher ‖ student) against the live teacher, whatever targets the
student was trained on, so a biased objective cannot hide behind agreement. A student of
another tokenizer is scored on its own tokens of the same text, and compared with the
teacher on next-byte distributions (xeval), which every evaluation reports.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional

import mlx.core as mx
import numpy as np

from . import data as data_mod
from . import align, confidence, fallback, files, losses, models, xeval
from .config import Config, ConfigError
from .plots import plot_deferral
from .progress import Progress
from .rundir import RunDir
from .task import answer_sheet, task_accuracy, task_prompts
from .validation import EVAL_BATCH, score

ECE_BINS = 15
_log = logging.getLogger(__name__)


def _accumulate(stats: dict, key: str, value: mx.array) -> None:
    stats[key] = stats.get(key, 0.0) + value.item()


def _tally(st: dict, bins: np.ndarray, lp: mx.array, labels: mx.array, mask: mx.array,
           scored: np.ndarray, lp_t: Optional[mx.array] = None) -> None:
    """One model's sums on one batch (`score`'s, into `st`) and its calibration bins (count,
    sum confidence, sum correct per confidence bin) at the scored positions."""
    for key, v in score(lp, labels, mask, lp_t).items():
        if key != "tokens":
            _accumulate(st, key, v)
    pred = mx.argmax(lp, -1)
    keep = scored.reshape(-1)
    conf = np.array(mx.exp(mx.max(lp, -1))).reshape(-1)[keep]
    idx = np.minimum((conf * ECE_BINS).astype(int), ECE_BINS - 1)
    np.add.at(bins[0], idx, 1.0)
    np.add.at(bins[1], idx, conf)
    np.add.at(bins[2], idx, np.array(pred == labels).reshape(-1)[keep])


def _tally_bytes(st: dict, pt: mx.array, ps: mx.array) -> None:
    """The next-byte sums (agreeing positions, KL) of one batch's paired positions."""
    if pt.shape[0]:
        agree, kl = xeval.byte_terms(pt, ps)
        _accumulate(st, "agree", agree)
        _accumulate(st, "kl", kl)


def _finish(st: dict, bins: np.ndarray, ntok: float, nbytes: float,
            bsum: Optional[dict] = None, npairs: float = 0.0) -> dict:
    """Means of a model's sums: per scored token, bits per byte over its `nbytes`, and the
    next-byte metrics per paired position; rounded as eval.json keeps them."""
    r = {k: v / max(ntok, 1.0) for k, v in st.items()}
    r["ppl"] = math.exp(min(r["ce"], 50.0))
    if nbytes:
        r["bpb"] = st["ce"] / math.log(2) / nbytes
    # Expected calibration error of the top-1 prediction (equal-width confidence bins).
    r["ece"] = float(np.abs(bins[1] - bins[2]).sum() / max(ntok, 1.0))
    if bsum and npairs:
        r["byte_agree"] = bsum["agree"] / npairs
        r["byte_kl"] = bsum["kl"] / npairs
    return {k: round(v, 4) for k, v in r.items()}


def compare(teacher, students: dict, packed: data_mod.Packed, vocab: int,
            quiet: bool = True, byte_lens: Optional[np.ndarray] = None,
            buckets: Optional[np.ndarray] = None) -> dict:
    """Per model: CE, perplexity, next-token accuracy, expected calibration error; per student
    also KL to the teacher and top-1/top-5 agreement with the teacher's most likely token.
    With `byte_lens` (the UTF-8 length of every token id), also bits per byte: the scored
    tokens' nats over the bytes of their text, a scale on which models of different
    tokenizers compare. With `buckets` (xeval.first_byte_matrix of the shared tokenizer),
    per student the next-byte agreement and KL at every scored position (xeval)."""
    labels_all = data_mod.hard_targets(packed.input_ids, packed.next_ids)
    t_fwd = models.logits_fn(teacher, vocab)
    s_fwd = {name: models.logits_fn(m, vocab) for name, m in students.items()}
    sums: dict = {name: {} for name in ["teacher", *students]}
    calib = {name: np.zeros((3, ECE_BINS)) for name in sums}
    bsums: dict = {name: {} for name in students}
    onehot = None if buckets is None else xeval.Buckets(mx.array(buckets), None)
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
        idx = np.flatnonzero(scored)
        pt = None if onehot is None else xeval.byte_probs(lp_t, idx, onehot)
        _tally(sums["teacher"], calib["teacher"], lp_t, labels, mask, scored)
        for name, f in s_fwd.items():
            lp = losses.log_softmax(f(x))
            _tally(sums[name], calib[name], lp, labels, mask, scored, lp_t)
            top5 = mx.argpartition(-lp, kth=4, axis=-1)[..., :5]
            hit = (top5 == top_t[..., None]).any(axis=-1)
            _accumulate(sums[name], "agree_top5", (hit * m).sum())
            if pt is not None:
                _tally_bytes(bsums[name], pt, xeval.byte_probs(lp, idx, onehot))
        bar.update(x.shape[0], units=x.size)
    bar.close()
    out = {name: _finish(st, calib[name], ntok, nbytes, bsums.get(name), ntok)
           for name, st in sums.items()}
    out["tokens"] = int(ntok)
    if nbytes:
        out["bytes"] = int(nbytes)
    return out


def compare_cross(teacher, students: dict, packed: data_mod.Packed, ttok, stok,
                  t_size: int, s_size: int, quiet: bool = True) -> dict:
    """`compare` for students of another tokenizer than the teacher's. The teacher reads
    `packed` (its own tokens); each student reads the same rows re-tokenized as training
    re-tokenizes the cache (xeval.cross_rows). Each model is scored on its own tokens: CE,
    perplexity, next-token accuracy, calibration error, and bits per byte over the bytes of
    its own scored tokens; per student the next-byte agreement and KL at the scored shared
    boundaries. KL and top-k agreement need one vocabulary and are not reported. `t_size` /
    `s_size`: the logits columns of each side."""
    tv, sv = align.vocab(ttok), align.vocab(stok)
    rows = xeval.cross_rows(packed, tv, sv)
    t_lens = xeval.piece_lengths(tv.pieces, t_size)
    s_lens = xeval.piece_lengths(sv.pieces, s_size)
    t_oh, s_oh = xeval.buckets(tv, t_size), xeval.buckets(sv, s_size)
    labels_all = data_mod.hard_targets(packed.input_ids, packed.next_ids)
    t_fwd = models.logits_fn(teacher, t_size)
    s_fwd = {name: models.logits_fn(m, s_size) for name, m in students.items()}
    sums: dict = {name: {} for name in ["teacher", *students]}
    calib = {name: np.zeros((3, ECE_BINS)) for name in sums}
    bsums: dict = {name: {} for name in students}
    ntok = nbytes = s_ntok = s_nbytes = npairs = 0.0
    bar = Progress(packed.rows, "evaluate", "tok", quiet)
    for b in range(0, packed.rows, EVAL_BATCH):
        labels_np = labels_all[b:b + EVAL_BATCH]
        scored = packed.loss_mask[b:b + EVAL_BATCH].astype(bool) & (labels_np >= 0)
        x = mx.array(packed.input_ids[b:b + EVAL_BATCH])
        lp_t = losses.log_softmax(t_fwd(x))
        _tally(sums["teacher"], calib["teacher"], lp_t, mx.array(labels_np), mx.array(scored),
               scored)
        ntok += float(scored.sum())
        nbytes += float(t_lens[np.maximum(labels_np, 0)][scored].sum())
        batch = rows[b:b + EVAL_BATCH]
        s_ids, s_labels_np, s_scored = xeval.pad_rows(batch)
        s_ntok += float(s_scored.sum())
        s_nbytes += float(s_lens[np.maximum(s_labels_np, 0)][s_scored].sum())
        t_idx, s_idx, t_fresh, s_fresh = xeval.pair_index(batch, x.shape[1], s_ids.shape[1])
        npairs += len(t_idx)
        pt = xeval.byte_probs(lp_t, t_idx, t_oh, t_fresh)
        xs, s_labels, s_mask = mx.array(s_ids), mx.array(s_labels_np), mx.array(s_scored)
        for name, f in s_fwd.items():
            lp = losses.log_softmax(f(xs))
            _tally(sums[name], calib[name], lp, s_labels, s_mask, s_scored)
            _tally_bytes(bsums[name], pt, xeval.byte_probs(lp, s_idx, s_oh, s_fresh))
        bar.update(x.shape[0], units=x.size)
    bar.close()
    out = {"teacher": _finish(sums["teacher"], calib["teacher"], ntok, nbytes)}
    for name in students:
        out[name] = _finish(sums[name], calib[name], s_ntok, s_nbytes, bsums[name], npairs)
    out.update(tokens=int(ntok), bytes=int(nbytes), student_tokens=int(s_ntok),
               student_bytes=int(s_nbytes), aligned=int(npairs))
    return out


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
    """Per record: the student's confidence signals (confidence.TEXT_SIGNALS) and both
    models' next-token accuracy."""
    t_fwd, s_fwd = models.logits_fn(teacher, vocab), models.logits_fn(student, vocab)
    out: dict = {k: [] for k in (*confidence.TEXT_SIGNALS, "student", "teacher", "tokens")}
    for b in range(0, ids.shape[0], EVAL_BATCH):
        x = mx.array(ids[b:b + EVAL_BATCH, :-1])
        labels = mx.array(ids[b:b + EVAL_BATCH, 1:])
        m = mx.array(trained[b:b + EVAL_BATCH, 1:]).astype(mx.float32)
        n = m.sum(-1)
        lp_s = losses.log_softmax(s_fwd(x))
        per = confidence.text_signals(lp_s, m)
        for k, lp in (("student", lp_s), ("teacher", t_fwd(x))):
            per[k] = ((mx.argmax(lp, -1) == labels) * m).sum(-1) / n
        for k, v in per.items():
            out[k] += np.array(v).round(6).tolist()
        out["tokens"] += np.array(n).astype(int).tolist()
    return out


def _fit_path(valid: Optional[str], path: str) -> tuple[Optional[str], Optional[str]]:
    """(data.valid, None), or (None, why it cannot fit the rule): fitting on the very file
    the rule is reported on would score the threshold on the examples that chose it."""
    if not valid:
        return None, "no data.valid"
    if os.path.abspath(valid) == os.path.abspath(path) or (
            os.path.exists(valid) and os.path.exists(path) and os.path.samefile(valid, path)):
        return None, f"data.valid is {path} itself"
    return valid, None


def fallback_summary(teacher, student, tok, cfg, vocab: Optional[int], path: str,
                     max_records: Optional[int] = None, answers: Optional[dict] = None,
                     teacher_tok=None, targets=fallback.TARGETS) -> Optional[dict]:
    """The cloud-fallback rule of `student` (fallback.summarize): signal and threshold
    fitted on data.valid's examples, every figure reported on `path`'s (both: of their first
    `max_records` records).

    Records with a reference answer (the first generate.eval_prompts of each file): quality
    is task accuracy, the signals the student's confidence in its own greedy answer, one
    forward pass each (`answers`: {"teacher", "student"} answer sheets task.task_accuracy
    already made on `path`, reused). Otherwise: next-token accuracy on each record's first
    seq_len tokens with per-position signals, which needs one tokenizer (None when
    `teacher_tok`, the teacher's own tokenizer, is another)."""
    g = cfg.generate
    ttok = teacher_tok or tok
    fit_path, why = _fit_path(cfg.data.valid, path)
    prompts = task_prompts(path, g.eval_prompts, max_records) if g.eval_prompts else []
    if prompts:
        def examples(ps: list, sheets: dict) -> dict:
            t = sheets.get("teacher") or answer_sheet(teacher, ttok, ps, g)
            s = sheets.get("student") or answer_sheet(student, tok, ps, g)
            pairs = list(zip(s["prompt_ids"], s["ids"]))
            return {**confidence.answer_signals_batch(student, pairs, vocab),
                    "student": [float(c) for c in s["correct"]],
                    "teacher": [float(c) for c in t["correct"]],
                    "tokens": [len(a) for a in s["ids"]]}

        test = examples(prompts, answers or {})
        fit_prompts = task_prompts(fit_path, g.eval_prompts, max_records) if fit_path else []
        if fit_path and not fit_prompts:
            why = f"data.valid ({fit_path}) has no record with an answer"
        fit = examples(fit_prompts, {}) if fit_prompts else None
        quality, signals = fallback.task_quality(g.verifier), confidence.ANSWER_SIGNALS
    else:
        if teacher_tok is not None and \
                models.vocab_fingerprint(teacher_tok) != models.vocab_fingerprint(tok):
            return None  # next-token accuracies over two tokenizers' tokens do not compare

        def examples(p: str) -> dict:
            ids, trained = example_rows(p, tok, cfg.data.seq_len, cfg.data.mask_prompt,
                                        max_records)
            return per_example(teacher, student, ids, trained, vocab)

        test, fit = examples(path), examples(fit_path) if fit_path else None
        quality, signals = fallback.NEXT_TOKEN, confidence.TEXT_SIGNALS
    res = fallback.summarize(test, fit, quality, signals,
                             {"fit": fit_path, "report": path, "records": max_records},
                             targets, why)
    if "rule" in res:
        res["rule"]["vocab"] = vocab
    res["computed_by"] = (
        "mlxdistill.confidence.answer_signals(student, prompt_ids, answer_ids, vocab) on the "
        "student's own greedy answer" if prompts else
        "mlxdistill.confidence.text_signals over the record's scored positions")
    for w in res["warnings"]:
        _log.warning("cloud fallback: %s", w)
    return res


def retention(res: dict) -> dict:
    """How much of the teacher's capability each student keeps, in %: next-token accuracy
    relative to the teacher's, and CE relative to the teacher's (teacher CE / student CE).
    A student of another tokenizer predicts other tokens, so per-token accuracy and CE do
    not compare: its retention is bits per byte relative to the teacher's."""
    t = res["teacher"]
    out = {}
    for name in ("student_before", "student_after"):
        if name in res:
            s = res[name]
            if "student_tokens" in res:
                out[name] = {"bpb_pct": round(100 * t["bpb"] / max(s["bpb"], 1e-9), 1)}
                continue
            out[name] = {"accuracy_pct": round(100 * s["accuracy"] / max(t["accuracy"], 1e-9), 1),
                         "ce_pct": round(100 * t["ce"] / max(s["ce"], 1e-9), 1)}
    return out


def evaluate_run(run_dir: str, data_path: Optional[str] = None, quiet: bool = False,
                 log=print, write: bool = True, cfg: Optional[Config] = None,
                 teacher: Optional[models.Lazy] = None,
                 records: Optional[int] = None) -> dict:
    """Teacher, student before and student after on `data_path` (default: the run's
    data.test), its first `records` records (default: data.test_records; None: all): the
    table (`compare_cross` for a student of another tokenizer), task accuracy when the
    records carry answers, and the cloud-fallback rule (fallback_summary; for a student of
    another tokenizer only when graded by task accuracy); written to eval.json unless
    `write` is False. `cfg` and `teacher` let `train` pass what it already holds (its
    config, a teacher it kept in memory)."""
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
    # A student of another tokenizer (cross-tokenizer distillation) is scored on its own
    # tokens of the same text; any other pair must share the teacher's vocabulary.
    cross = models.vocab_fingerprint(ttok) != models.vocab_fingerprint(stok)
    if cross:
        t_size = models.own_logits_size(ttok, tcfg, "teacher")
        s_size = models.own_logits_size(stok, scfg, "student")
        models.check_seq_len(cfg.data.seq_len, tcfg, "teacher")
        models.check_seq_len(cfg.data.seq_len, scfg, "student")
    else:
        match = models.check_pair(ttok, tcfg, stok, scfg, cfg.data.seq_len)
    after = run.load_student(cfg)
    packed = data_mod.pack(path, ttok, cfg.data.seq_len, cfg.data.mask_prompt,
                           packing=cfg.data.packing, max_records=cap)
    students = {"student_before": before, "student_after": after}
    if cross:
        res = compare_cross(teacher, students, packed, ttok, stok, t_size, s_size, quiet)
    else:
        pieces, vocab = token_pieces(ttok), match.vocab_size
        tables = (None, None) if pieces is None else (xeval.piece_lengths(pieces, vocab),
                                                      xeval.first_byte_matrix(pieces, vocab))
        res = compare(teacher, students, packed, vocab, quiet, *tables)
    res["retention"] = retention(res)
    res["data"] = path
    if cap is not None:
        res["records"] = packed.records  # the first ones only (absent: every record)
    # Task accuracy: when the records carry reference answers, each model answers greedily,
    # reading the prompt and writing its answer in its own tokens.
    sheets: dict = {}
    task = task_accuracy({"teacher": teacher, **students}, ttok, path, cfg.generate, cap,
                         toks={"student_before": stok, "student_after": stok} if cross
                         else None, details=sheets)
    if task is not None:
        res["task"] = task
    # Cloud fallback: when the trained student should hand a query to the teacher. Graded
    # by task accuracy it reuses the answers above; graded by next-token accuracy it needs
    # one tokenizer (accuracies over two tokenizers' tokens do not compare).
    fb = fallback_summary(teacher, after, stok if cross else ttok, cfg,
                          s_size if cross else match.vocab_size, path, cap,
                          {"teacher": sheets.get("teacher"),
                           "student": sheets.get("student_after")}, teacher_tok=ttok)
    if fb is not None:
        res["fallback"] = fb
    if write:
        files.atomic_json(run.eval_json, res)
        if "fallback" in res:
            plot_deferral(res["fallback"], os.path.join(run.plots, "deferral.png"))
    if not quiet:
        log(format_table(res))
    return res


def token_pieces(tokenizer) -> Optional[tuple]:
    """The bytes of every token id, or None for a tokenizer whose tokens cannot be mapped to
    bytes (bits per byte and the next-byte metrics are then not reported)."""
    try:
        return align.vocab(tokenizer).pieces
    except align.AlignError:
        return None


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
                            ("byte_agree", "next-byte agreement", "{:.3f}"),
                            ("byte_kl", "next-byte KL", "{:.3f}"),
                            ("ece", "calibration error (ECE)", "{:.3f}")]:
        row = (label, g("teacher", key, fmt), g("student_before", key, fmt),
               g("student_after", key, fmt))
        if any(c != "-" for c in row[1:]):  # across tokenizers KL and top-k do not apply
            rows.append(row)
    ret = res.get("retention", {})
    for key, label in (("accuracy_pct", "retention: accuracy %"), ("ce_pct", "retention: CE %"),
                       ("bpb_pct", "retention: bits per byte %")):
        if any(key in r for r in ret.values()):  # a student of another tokenizer: bpb only
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
    tokens = (f"{res.get('tokens')} teacher tokens, {res['student_tokens']} student tokens"
              if "student_tokens" in res else f"{res.get('tokens')} tokens")
    lines = [f"evaluation on {res.get('data')} ({first}{tokens})"]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j])
                               for j, c in enumerate(r)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if "student_tokens" in res:
        lines.append("(cross-entropy, perplexity and accuracy are per each model's own token; "
                     "bits per byte and the next-byte rows compare on one scale)")
    if res.get("fallback"):
        lines += fallback.describe(res["fallback"])
    return "\n".join(lines)
