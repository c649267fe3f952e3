"""Held-out metrics of a student against its teacher: the one definition (`score`) that
periodic validation during training and the final evaluation both use, and the teacher's
distributions on the validation rows, computed once per run so that validation needs no
teacher in memory while the student trains."""

from __future__ import annotations

import os
from typing import Optional

import mlx.core as mx

from . import data as data_mod
from . import files, losses, models

EVAL_BATCH = 4  # rows per forward pass: [4, L, V] float32 logits of three models at once


def score(lp: mx.array, labels: mx.array, mask: mx.array,
          lp_t: Optional[mx.array] = None) -> dict:
    """Sums over the scored positions (mask: bool, already excluding labels < 0) of one
    model's log-probabilities `lp`: cross-entropy and next-token accuracy; with the
    teacher's `lp_t`, also KL(teacher ‖ model) and top-1 agreement. "tokens" is the count."""
    m = mask.astype(mx.float32)
    n = m.sum()
    ce, _ = losses.masked_mean(
        -mx.take_along_axis(lp, mx.maximum(labels, 0)[..., None], -1)[..., 0], mask)
    pred = mx.argmax(lp, -1)
    out = {"tokens": n, "ce": ce * n, "accuracy": ((pred == labels) * m).sum()}
    if lp_t is not None:
        out["kl"] = (losses.dense_kl_pos(lp, lp_t) * m).sum()
        out["agree_top1"] = ((pred == mx.argmax(lp_t, -1)) * m).sum()
    return out


def teacher_targets(cfg, path: str, vocab: int, teacher: models.Lazy, log) -> Optional[dict]:
    """Teacher log-probabilities (float16, full vocabulary) on the first `train.eval_rows`
    validation rows, computed once and kept at `path` in the run dir."""
    if not cfg.data.valid or cfg.train.eval_rows == 0:
        return None
    if os.path.exists(path):
        return dict(mx.load(path))
    model, ttok, _ = teacher.get()
    packed = data_mod.pack(cfg.data.valid, ttok, cfg.data.seq_len, cfg.data.mask_prompt,
                           cfg.train.eval_rows, packing=cfg.data.packing)
    x = mx.array(packed.input_ids)
    forward = models.logits_fn(model, vocab)
    lp = []
    for b in range(0, x.shape[0], EVAL_BATCH):
        lp.append(losses.log_softmax(forward(x[b:b + EVAL_BATCH])).astype(mx.float16))
    out = {"input_ids": x, "loss_mask": mx.array(packed.loss_mask),
           "labels": mx.array(data_mod.hard_targets(packed.input_ids, packed.next_ids)),
           "teacher_logprobs": mx.concatenate(lp)}
    mx.eval(out)
    with files.atomic_path(path) as tmp:
        mx.save_safetensors(tmp, out)
    log(f"validation: {packed.rows} rows of {cfg.data.valid} with teacher distributions")
    return out


def student_rows(cfg, tokenizer) -> Optional[dict]:
    """The first `train.eval_rows` validation rows in a student's own tokens, for a student
    of another tokenizer than the teacher's: its validation is CE alone (token KL to the
    teacher does not apply; `mlxdistill eval` compares the two on bytes)."""
    if not cfg.data.valid or cfg.train.eval_rows == 0:
        return None
    packed = data_mod.pack(cfg.data.valid, tokenizer, cfg.data.seq_len, cfg.data.mask_prompt,
                           cfg.train.eval_rows, packing=cfg.data.packing)
    return {"input_ids": mx.array(packed.input_ids), "loss_mask": mx.array(packed.loss_mask),
            "labels": mx.array(data_mod.hard_targets(packed.input_ids, packed.next_ids))}


def validate(model, ev: dict, vocab: int) -> dict:
    """val_ce, and with the teacher's distributions val_kl (full vocabulary) and val_agree,
    of `model` on the validation rows."""
    lp = losses.log_softmax(models.logits_fn(model, vocab)(ev["input_ids"]))
    labels = ev["labels"]
    s = score(lp, labels, ev["loss_mask"].astype(mx.bool_) & (labels >= 0),
              ev.get("teacher_logprobs"))
    n = mx.maximum(s["tokens"], 1.0)
    out = {"val_ce": round((s["ce"] / n).item(), 4)}
    if "kl" in s:
        out.update(val_kl=round((s["kl"] / n).item(), 4),
                   val_agree=round((s["agree_top1"] / n).item(), 4))
    return out
