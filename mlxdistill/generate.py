"""Sequence-level distillation data: the teacher writes answers to prompts -> JSONL.

Input lines: {"prompt": ...} or {"messages": [...]}, optionally with "answer" (a reference
for the verifier). Output lines are mlx_lm's completions or chat format, so the file feeds
`mlxdistill cache` / `train` directly (prompt tokens masked). A sidecar
`OUT.manifest.json` records provenance (teacher fingerprint, settings, seed) and the
verifier's pass rate.

Reasoning (`generate.reasoning`): a template "OPENER{reasoning}SEPARATOR{answer}CLOSER"
(`think` is "<think>\n{reasoning}\n</think>\n{answer}"). The teacher's prompt ends with the
opener, so it starts by thinking; the completion written keeps the opener, the reasoning and
the answer, so a student learns to write all three, and the record also carries them apart
("reasoning", "final_answer"). Verifiers and task accuracy see only the final answer: the
text after the first separator, up to the closer. An answer that never closes its reasoning
has no final answer and fails any reference check.

Resume: lines go to `OUT.partial` and `OUT.progress.json` records, after every batch, how
many prompts are done and how many bytes are valid; a killed run truncates the partial file
to that size and continues, and OUT appears (by rename) only when complete.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import json
import os
import re
import time
from typing import Callable, Iterator, Optional

import mlx.core as mx

from . import files, models, remote, remote_teacher
from .config import Config, ConfigError
from .data import (NO_TEMPLATE, DataError, chat_template_sha256, has_chat_template,
                   prompt_ids, read_jsonl)
from .distributed import World
from .progress import Progress
from .resume import MISSING, first_difference, refuse_changed


def read_prompts(path: str) -> list[dict]:
    return read_jsonl(path, lambda r: isinstance(r.get("prompt"), str)
                      or isinstance(r.get("messages"), list),
                      "a 'prompt' string or a 'messages' list", what="prompts file")


def load_verifier(spec: Optional[str]) -> Optional[Callable[[dict, str], bool]]:
    """None, "exact" (completion == record["answer"], stripped), "regex:PATTERN" (group 1 of
    the last match in the completion == record["answer"]), or "module:function" called as
    fn(record, completion) -> bool."""
    if not spec:
        return None
    if spec == "exact":
        return lambda rec, text: text.strip() == str(rec.get("answer", "")).strip()
    if spec.startswith("regex:"):
        try:
            pat = re.compile(spec[len("regex:"):])
        except re.error as e:
            raise ConfigError(f"generate.verifier={spec!r}: bad regular expression ({e})") from None

        def check(rec, text):
            found = pat.findall(text)
            if not found:
                return False
            last = found[-1] if isinstance(found[-1], str) else found[-1][0]
            return last.strip() == str(rec.get("answer", "")).strip()

        return check
    mod, sep, fn = spec.partition(":")
    if not sep or not mod or not fn:
        raise ConfigError(f"generate.verifier={spec!r}: use exact, regex:PATTERN or "
                          "module:function")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"generate.verifier={spec!r} cannot be imported ({e})") from None


THINK = "<think>\n{reasoning}\n</think>\n{answer}"


def reasoning_parts(spec: Optional[str]) -> Optional[tuple[str, str, str]]:
    """(opener, separator, closer) of a reasoning template (validated by the config)."""
    if not spec:
        return None
    opener, rest = (THINK if spec == "think" else spec).split("{reasoning}", 1)
    sep, closer = rest.split("{answer}", 1)
    return opener, sep, closer


def split_answer(parts: Optional[tuple[str, str, str]], text: str
                 ) -> tuple[Optional[str], str]:
    """(reasoning, final answer) of a completion; no template: (None, the whole text)."""
    if parts is None:
        return None, text.strip()
    opener, sep, closer = parts
    if opener and text.startswith(opener):  # completions in a written file carry the opener
        text = text[len(opener):]
    reasoning, found, answer = text.partition(sep)
    if not found:
        return text.strip(), ""
    if closer and closer in answer:  # what the model wrote after its answer is not the answer
        answer = answer[:answer.index(closer)]
    return reasoning.strip(), answer.strip()


def prompt_tokens(tok, rec: dict, system: Optional[str], opener: str = "") -> list[int]:
    """What the teacher continues: with a chat template, the prompt part of the record it
    writes, rendered as training will render it (data.prompt_ids); without one, a prompt's
    text (a chat prompt needs a template)."""
    cue = list(tok.encode(opener, add_special_tokens=False)) if opener else []
    sys_turn = [{"role": "system", "content": system}] if system else []
    if "messages" in rec:
        return prompt_ids(tok, sys_turn + rec["messages"], rec.get("tools")) + cue
    if has_chat_template(tok):
        return prompt_ids(tok, sys_turn + [{"role": "user", "content": rec["prompt"]}],
                          rec.get("tools")) + cue
    text = (system + "\n\n" if system else "") + rec["prompt"]
    # The opener is encoded on its own, as the data pipeline encodes a completion apart
    # from its prompt.
    return list(tok.encode(text, add_special_tokens=False)) + cue


def output_record(rec: dict, completion: str, system: Optional[str],
                  parts: Optional[tuple[str, str, str]] = None) -> dict:
    if parts is not None:
        completion = parts[0] + completion
    if "messages" in rec:
        msgs = ([{"role": "system", "content": system}] if system else []) + rec["messages"]
        out = {"messages": msgs + [{"role": "assistant", "content": completion}]}
    else:
        out = {"prompt": rec["prompt"], "completion": completion}
    if parts is not None:
        out["reasoning"], out["final_answer"] = split_answer(parts, completion)
    if "answer" in rec:  # the reference travels with the data: eval scores task accuracy
        out["answer"] = rec["answer"]
    if "tools" in rec:  # the template rendered the prompt with them: training must too
        out["tools"] = rec["tools"]
    return out


SMALL_TEACHER_BYTES = 1 << 28


def small_weights_sha256(path: str) -> Optional[str]:
    """sha256 over a teacher folder's weight hashes when they are small (under 256 MB), else
    None: a short name for the weights, which scripts use to keep a teacher's outputs apart.
    The per-file hashes are the remembered ones the teacher fingerprint uses."""
    names = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else []
    if not names or sum(os.path.getsize(f) for f in names) > SMALL_TEACHER_BYTES:
        return None
    return hashlib.sha256("".join(files.remembered_sha256(names)).encode()).hexdigest()


_atomic_json = files.atomic_json  # a module name of its own: tests cut a run off here


def local_identity(cfg: Config) -> dict:
    """What makes a local teacher's output what it is (with the settings common to both)."""
    identity = {"teacher": cfg.teacher.model,
                "teacher_fingerprint": models.model_fingerprint(cfg.teacher.model)}
    weights_sha = small_weights_sha256(cfg.teacher.model)
    if weights_sha is not None:
        identity["teacher_weights_sha256"] = weights_sha
    return identity


def common_identity(cfg: Config) -> dict:
    g = cfg.generate
    # the prompts' content too: an edited file at the same path is not "done"
    return {"prompts": g.prompts, "prompts_sha256": files.sha256_file(g.prompts), "n": g.n,
            "max_tokens": g.max_tokens, "temperature": g.temperature, "top_p": g.top_p,
            "verifier": g.verifier, "system": g.system, "batch_size": g.batch_size,
            "seed": g.seed}


def generate(cfg: Config, quiet: bool = False, log=print, world: Optional[World] = None) -> dict:
    """Teacher answers for every prompt -> g.out. Under `mlx.launch` each round of the loop
    gives rank r the r-th batch of prompts; rank 0 gathers the answers and writes them in
    prompt order. A batch's seed depends only on its position, so the file is the same for
    any number of ranks, and a resume may even use another number. An HTTP teacher
    (teacher.model a URL) is asked by rank 0 alone, `teacher.concurrency` requests at once;
    its batches are written in the same order and resume the same way."""
    g = cfg.generate
    world = world or World(cfg.run.dist_timeout)
    http = remote.is_url(cfg.teacher.model)
    if http and world.size > 1:
        raise ConfigError(f"teacher.model={cfg.teacher.model} is an HTTP endpoint: run "
                          "`generate` as one process (teacher.concurrency sets the requests "
                          "in flight), not under mlx.launch")
    if not world.main:
        quiet, log = True, (lambda m: None)  # rank 0 reports and writes for all
    log(world.describe())
    files.check_file(g.out, "generate.out")  # before the teacher's work, not at its end
    prompts = read_prompts(g.prompts)
    verify = load_verifier(g.verifier)
    tmpl = reasoning_parts(g.reasoning)
    client = None
    if http:
        t = cfg.teacher
        client = remote.Client(t.model, t.api_key_env, t.timeout, t.max_retries, t.concurrency)
        identity = remote_teacher.identity(client, t)
        if cfg.data.chat_template is not None:
            log("data.chat_template is not sent to the endpoint, which renders prompts with "
                "its own template; training renders the written records with it")
    else:
        identity = local_identity(cfg)
        if cfg.teacher.api_top_logprobs:
            log("teacher.api_top_logprobs is for an HTTP teacher; a local teacher's top-k "
                "cache is built from its logits by `cache`, so none are written")
    identity.update(common_identity(cfg))
    if tmpl is not None:  # only then, so files written before the key existed still resume
        identity["reasoning"] = g.reasoning
    if cfg.data.chat_template is not None and not http:  # it changes what the teacher reads
        identity["chat_template_sha256"] = chat_template_sha256(cfg.data.chat_template)
    partial, ppath = g.out + ".partial", g.out + ".progress.json"
    mpath = g.out + ".manifest.json"
    prog = {"settings": identity, "done": 0, "bytes": 0, "kept": 0, "rejected": 0,
            "verifier_errors": 0}
    finished = None
    if world.main:  # the files are rank 0's; the other ranks follow its view
        if os.path.exists(g.out) and os.path.exists(mpath):
            with open(mpath) as f:
                done_manifest = json.load(f)
            diff = first_difference(done_manifest.get("settings"), identity)
            if diff is None:
                finished = done_manifest
            else:  # the finished file is replaced when this run completes: say why
                key, was, now = diff
                shown = lambda v: "(none)" if v is MISSING else repr(v)  # noqa: E731
                log(f"{g.out} was generated with {key}={shown(was)}; generating it again with "
                    f"{shown(now)} (it is replaced when this run finishes)")
        if finished is None:
            if os.path.exists(ppath) and os.path.exists(partial):
                with open(ppath) as f:
                    old = json.load(f)
                refuse_changed(old.get("settings"), identity, message=lambda key, was, now: (
                    f"{partial} was started with other settings ({key}: {was!r} then, "
                    f"{now!r} now); delete it and {ppath} or restore the settings"))
                prog = old
                log(f"resuming {g.out}: {prog['done']}/{len(prompts)} prompts done")
            os.makedirs(os.path.dirname(os.path.abspath(g.out)), exist_ok=True)
            with open(partial, "a+b") as f:
                f.truncate(prog["bytes"])  # drop a line half-written by a killed run
    finished, first = world.bcast([finished, prog["done"]], "reading the generate progress")
    if finished is not None:
        log(f"{g.out} is complete ({finished['lines']} lines); nothing to do")
        return finished

    if http:
        batches = remote_teacher.batches(client, identity["api_model"], cfg, prompts, first,
                                         tmpl)
    else:
        batches = _local_batches(cfg, prompts, first, world, tmpl)
    bar = Progress(len(prompts), "generate", "tok", quiet)
    bar.done = first
    t0, ntok = time.time(), 0
    out = open(partial, "ab") if world.main else None
    try:
        for start, records, texts, round_tokens, tops in batches:
            lines = []
            for i, text in enumerate(texts):
                rec = records[i // g.n]
                ok = True
                if verify is not None:
                    try:
                        ok = bool(verify(rec, split_answer(tmpl, text)[1] if tmpl else text))
                    except Exception:  # a faulty verifier rejects, and is reported
                        ok = False
                        prog["verifier_errors"] += 1
                prog["kept" if ok else "rejected"] += 1
                if ok:
                    written = output_record(rec, text, g.system, tmpl)
                    if tops is not None:  # what `cache` builds an HTTP teacher's top-k from
                        written["teacher_logprobs"] = tops[i]
                    lines.append(json.dumps(written, ensure_ascii=False) + "\n")
            out.write("".join(lines).encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())
            prog["done"] = start + len(records)
            prog["bytes"] = out.tell()
            _atomic_json(ppath, prog)
            ntok += round_tokens
            bar.update(len(records), units=round_tokens)
    except remote.RemoteError as e:
        raise remote.RemoteError(f"{e} ({prog['done']}/{len(prompts)} prompts are written "
                                 "and kept: run the same command again to resume)") from None
    finally:
        if client is not None:
            client.close()
        if out is not None:
            out.close()
        bar.close()
    if not world.main:
        return world.bcast(None, "sharing the generate manifest")
    total = prog["kept"] + prog["rejected"]
    manifest = {"settings": identity, "prompts_total": len(prompts), "lines": prog["kept"],
                "kept": prog["kept"], "rejected": prog["rejected"],
                "verifier_errors": prog["verifier_errors"],
                "pass_rate": round(prog["kept"] / max(total, 1), 4)}
    _atomic_json(mpath, manifest)
    os.replace(partial, g.out)
    os.remove(ppath)
    dt = time.time() - t0
    log(f"generated {g.out}: {prog['kept']} answers kept of {total}"
        + (f" (pass rate {manifest['pass_rate']:.1%})" if verify else "")
        + (f"; the verifier raised on {prog['verifier_errors']} (counted as rejected)"
           if prog["verifier_errors"] else "")
        + (f", {ntok / dt:,.0f} tok/s" if ntok and dt > 0 else ""))
    return world.bcast(manifest, "sharing the generate manifest")


def _local_batches(cfg: Config, prompts: list[dict], first: int, world: World,
                   tmpl: Optional[tuple[str, str, str]]) -> Iterator[tuple]:
    """(first prompt, its records, texts n per record, generated tokens, None) per round, on
    rank 0; the other ranks generate their share and yield nothing."""
    # mlx_lm here, not at the top: it takes about a second to import (transformers)
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    g = cfg.generate
    teacher, tok, _ = models.load_role(cfg, "teacher")
    if not has_chat_template(tok):  # refused now, not when the batch holding it comes up
        chat = next((i for i, r in enumerate(prompts, 1) if "messages" in r), None)
        if chat is not None:
            raise DataError(f"{g.prompts}: record {chat}: {NO_TEMPLATE}")
    sampler = make_sampler(temp=g.temperature, top_p=g.top_p if g.top_p < 1.0 else 0.0)
    per_round = g.batch_size * world.size
    for start in range(first, len(prompts), per_round):
        mine = start + world.rank * g.batch_size
        batch = prompts[mine:mine + g.batch_size]
        texts, gen_tokens = [], 0
        if batch:
            # One seed per batch, from its position: a resumed run, or another number of
            # ranks, regenerates every batch identically.
            mx.random.seed(g.seed * 1_000_003 + mine)
            toks = [prompt_tokens(tok, rec, g.system, tmpl[0] if tmpl else "")
                    for rec in batch for _ in range(g.n)]
            resp = batch_generate(teacher, tok, toks, max_tokens=g.max_tokens,
                                  sampler=sampler)
            texts, gen_tokens = list(resp.texts), resp.stats.generation_tokens
        parts = world.gather([texts, gen_tokens], f"generating prompts from {start}")
        if world.main:
            yield (start, prompts[start:start + per_round],
                   [text for part in parts for text in part[0]],  # rank order = prompt order
                   sum(part[1] for part in parts), None)
