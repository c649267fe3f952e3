"""How sure the student is of what it wrote: the signals the cloud-fallback rule compares
with its threshold.

An app (or `mlxdistill serve`) computes them per request, on the device, after the student
has answered: one forward pass of the student over the prompt and its own answer. Every
signal is oriented so that higher means more confident, and the rule is always "defer to
the teacher when the signal is below the threshold" (export.json's `fallback`:
`defer_when: "below"`).

    answer_signals(model, prompt_ids, answer_ids, vocab=None) -> {signal name: float}

is the per-request function; `answer_signals_batch` is the same on many answers at once
(evaluation), `text_signals` the per-position signals for records without answers, where
the student is scored on reference text instead of its own answer.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

# Signals on the student's own answer (records with a reference answer).
ANSWER_SIGNALS = {
    "mean_logprob": "mean over the tokens of the student's own answer of their "
                    "log-probability under the student",
    "min_logprob": "lowest log-probability under the student of any token of its own answer",
    "min_margin": "smallest gap, over the tokens of the student's own answer, between the "
                  "log-probabilities of its two most likely tokens",
    "neg_entropy": "minus the mean entropy (nats) of the student's next-token distribution "
                   "over its own answer",
}
# Signals on reference text (records without an answer): per position of the record.
TEXT_SIGNALS = {
    "confidence": "mean over the record's positions of the student's log-probability of its "
                  "own most likely next token",
    "margin": "mean over the record's positions of the student's log-probability gap between "
              "its two most likely next tokens",
}
BATCH = 8  # answers per forward pass in answer_signals_batch
DEFAULT = "mean_logprob"  # the signal of a rule written by hand rather than fitted by eval


def _log_softmax(logits: mx.array) -> mx.array:
    z = logits.astype(mx.float32)
    return z - mx.logsumexp(z, axis=-1, keepdims=True)


def _reduce(lp: mx.array, tokens: mx.array) -> dict:
    """The answer signals from the student's log-probabilities at the positions that
    predicted each answer token (lp [A, V]) and those tokens (tokens [A])."""
    tok_lp = mx.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    top2 = mx.sort(mx.topk(lp, 2, axis=-1), axis=-1)
    margin = top2[:, 1] - top2[:, 0]
    entropy = -(mx.exp(lp) * lp).sum(-1)
    tok_lp, margin, entropy = (np.array(a, dtype=np.float64) for a in (tok_lp, margin, entropy))
    return {"mean_logprob": round(float(tok_lp.mean()), 6),
            "min_logprob": round(float(tok_lp.min()), 6),
            "min_margin": round(float(margin.min()), 6),
            "neg_entropy": round(float(-entropy.mean()), 6)}


def _positions(n_prompt: int, answer_ids: Sequence[int]) -> tuple[int, int]:
    """(first, last + 1) of the positions whose logits predict the answer tokens. An empty
    answer (the student stopped at once) is scored at the position that predicted its end."""
    if n_prompt < 1:
        raise ValueError("prompt_ids must hold at least one token")
    return n_prompt - 1, n_prompt - 1 + max(len(answer_ids), 1)


def _targets(lp: mx.array, answer_ids: Sequence[int]) -> mx.array:
    # an empty answer: the student's own choice at that position (its stop token)
    return mx.array(list(answer_ids), dtype=mx.int32) if len(answer_ids) \
        else mx.argmax(lp, -1).astype(mx.int32)


def answer_signals(model, prompt_ids: Sequence[int], answer_ids: Sequence[int],
                   vocab: Optional[int] = None) -> dict:
    """The student's confidence in its own answer, for one request.

    answer_signals(model, prompt_ids, answer_ids, vocab=None) -> dict[str, float]

    model: the student as loaded by mlx_lm (called as model(ids[None]) -> logits).
    prompt_ids: the token ids the student read (list of int, non-empty), as generation
      built them: the chat template's prompt, and the reasoning opener if any
      (mlxdistill.generate.prompt_tokens).
    answer_ids: the token ids the student generated after them, without the stop token
      (mlx_lm's batch_generate `token_ids`); may be empty.
    vocab: the number of logits columns to read (export.json's `fallback.vocab`); None:
      all of them.
    Returns {"mean_logprob", "min_logprob", "min_margin", "neg_entropy"} (ANSWER_SIGNALS),
    each a float, higher = more confident, rounded to 6 decimals as the threshold was fitted.
    One forward pass over prompt_ids + answer_ids."""
    lo, hi = _positions(len(prompt_ids), answer_ids)
    ids = list(prompt_ids) + list(answer_ids)
    logits = model(mx.array(ids[:hi], dtype=mx.int32)[None])[0, lo:hi]
    lp = _log_softmax(logits[..., :vocab] if vocab else logits)
    return _reduce(lp, _targets(lp, answer_ids))


signals = answer_signals  # the name `mlxdistill serve` calls it by


def answer_signals_batch(model, pairs: Sequence[tuple], vocab: Optional[int] = None,
                         batch: int = BATCH) -> dict:
    """answer_signals for many (prompt_ids, answer_ids) pairs, `batch` per forward pass
    (right-padded: a causal model's logits before the padding do not change).
    Returns {signal name: [value per pair]}."""
    out: dict = {k: [] for k in ANSWER_SIGNALS}
    for b in range(0, len(pairs), batch):
        chunk = pairs[b:b + batch]
        spans = [_positions(len(p), a) for p, a in chunk]
        rows = [(list(p) + list(a))[:hi] for (p, a), (_, hi) in zip(chunk, spans)]
        x = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int32)
        for i, r in enumerate(rows):
            x[i, :len(r)] = r
        logits = model(mx.array(x))
        for i, ((_, a), (lo, hi)) in enumerate(zip(chunk, spans)):
            row = logits[i, lo:hi]
            lp = _log_softmax(row[..., :vocab] if vocab else row)
            for k, v in _reduce(lp, _targets(lp, a)).items():
                out[k].append(v)
    return out


def text_signals(lp: mx.array, mask: mx.array) -> dict:
    """TEXT_SIGNALS per row from the student's log-probabilities lp [B, L, V] at the scored
    positions mask [B, L] (float, at least one per row): {name: mx.array [B]}."""
    top2 = mx.sort(mx.topk(lp, 2, axis=-1), axis=-1)  # [..., 1] is the top-1
    n = mask.sum(-1)
    return {"confidence": (top2[..., 1] * mask).sum(-1) / n,
            "margin": ((top2[..., 1] - top2[..., 0]) * mask).sum(-1) / n}
