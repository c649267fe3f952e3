"""Task accuracy: each model answers held-out prompts greedily; its final answer is checked
against the record's reference `answer`.

The answer format is the one the training data was written in: `generate.reasoning` says
where the reasoning ends and the final answer starts, `generate.verifier` how it is checked
(exact match when unset). Retention is student accuracy / teacher accuracy, in %.
"""

from __future__ import annotations

import inspect
from typing import Optional

from . import generate as gen_mod
from .data import read_records

GEN_BATCH = 32


def task_prompts(path: str, limit: int, max_records: Optional[int] = None) -> list[dict]:
    """The first `limit` records of `path` (of its first `max_records`) that carry a
    reference answer, as prompts: a prompt/completion record keeps its prompt, a chat
    record its turns before the last assistant turn. [] when the data has no answers (then
    no task accuracy is reported)."""
    out = []
    for rec in read_records(path)[:max_records]:
        if len(out) >= limit:
            break
        if "answer" not in rec:
            continue
        if isinstance(rec.get("prompt"), str):
            out.append({"prompt": rec["prompt"], "answer": str(rec["answer"])})
        elif isinstance(rec.get("messages"), list):
            msgs = list(rec["messages"])
            while msgs and msgs[-1].get("role") == "assistant":
                msgs.pop()
            if msgs:
                out.append({"messages": msgs, "answer": str(rec["answer"])})
    return out


def greedy_answers(model, tok, prompts: list[dict], g) -> list[str]:
    """Greedy completions (the model's most likely answer, so the score is reproducible)."""
    return greedy_generations(model, tok, prompts, g)["texts"]


def greedy_generations(model, tok, prompts: list[dict], g) -> dict:
    """Greedy completions with what the model read and wrote: {"texts", "prompt_ids",
    "ids"} (the generated token ids, without the stop token), the inputs of
    confidence.answer_signals."""
    # mlx_lm here, not at the top: it takes about a second to import (transformers)
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    tmpl = gen_mod.reasoning_parts(g.reasoning)
    opener = tmpl[0] if tmpl else ""
    out: dict = {"texts": [], "prompt_ids": [], "ids": []}
    extra = ({"return_token_ids": True}
             if "return_token_ids" in inspect.signature(batch_generate).parameters else {})
    for b in range(0, len(prompts), GEN_BATCH):
        toks = [gen_mod.prompt_tokens(tok, rec, g.system, opener)
                for rec in prompts[b:b + GEN_BATCH]]
        resp = batch_generate(model, tok, toks, max_tokens=g.max_tokens,
                              sampler=make_sampler(temp=0.0), **extra)
        # an mlx_lm without return_token_ids: the text's own tokens
        ids = resp.token_ids if extra else [tok.encode(t, add_special_tokens=False)
                                            for t in resp.texts]
        out["texts"].extend(resp.texts)
        out["prompt_ids"].extend(toks)
        out["ids"].extend([list(map(int, i)) for i in ids])
    return out


def verdicts(prompts: list[dict], texts: list[str], g) -> tuple[list[bool], int]:
    """Per answer, whether it is right; and how many times the verifier raised (a verifier
    that raises counts the answer as wrong)."""
    verify = gen_mod.load_verifier(g.verifier or "exact")
    tmpl = gen_mod.reasoning_parts(g.reasoning)
    right, errors = [], 0
    for rec, text in zip(prompts, texts):
        try:
            right.append(bool(verify(rec, gen_mod.split_answer(tmpl, text)[1])))
        except Exception:
            right.append(False)
            errors += 1
    return right, errors


def score(prompts: list[dict], texts: list[str], g) -> dict:
    """Correct answers among `texts`; a verifier that raises counts the answer as wrong and
    the error is reported."""
    right, errors = verdicts(prompts, texts, g)
    n = len(prompts)
    return {"accuracy": round(sum(right) / max(n, 1), 4), "correct": sum(right),
            "verifier_errors": errors}


def retention(res: dict) -> dict:
    """Student task accuracy / teacher task accuracy in % (None when the teacher scores 0:
    there is nothing to retain)."""
    t = res["teacher"]["accuracy"]
    return {name: (round(100 * res[name]["accuracy"] / t, 1) if t > 0 else None)
            for name in res if name != "teacher"}


def task_accuracy(named_models: dict, tok, path: str, g,
                  max_records: Optional[int] = None,
                  toks: Optional[dict] = None,
                  details: Optional[dict] = None) -> Optional[dict]:
    """{"prompts", per model {"accuracy", "correct", "verifier_errors"}, "retention"} on the
    first g.eval_prompts answered records of `path` (of its first `max_records`); None when
    there are none. `toks` names the models with a tokenizer of their own (a student of
    another tokenizer): each model reads the prompt and writes its answer in its own tokens,
    and answers are compared as text. `details`, a dict, receives per model its
    `answer_sheet` (the cloud-fallback rule reuses the answers instead of generating
    them again)."""
    prompts = task_prompts(path, g.eval_prompts, max_records) if g.eval_prompts else []
    if not prompts:
        return None
    toks = toks or {}
    res = {}
    for name, m in named_models.items():
        sheet = answer_sheet(m, toks.get(name, tok), prompts, g)
        res[name] = {"accuracy": round(sum(sheet["correct"]) / len(prompts), 4),
                     "correct": sum(sheet["correct"]), "verifier_errors": sheet["errors"]}
        if details is not None:
            details[name] = sheet
    return {"prompts": len(prompts), **res, "retention": retention(res)}


def answer_sheet(model, tok, prompts: list[dict], g) -> dict:
    """A model's greedy answers to `prompts` (greedy_generations) with, per prompt,
    whether it is right ("correct") and the verifier's errors ("errors")."""
    sheet = greedy_generations(model, tok, prompts, g)
    sheet["correct"], sheet["errors"] = verdicts(prompts, sheet["texts"], g)
    return sheet
