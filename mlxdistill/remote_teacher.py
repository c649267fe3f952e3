"""An HTTP teacher for `generate`: what is sent for a record, how its `generate.n` answers
are asked for, how an answer's text is read back, and the batches in prompt order with
requests in flight ahead of them.

What the endpoint reads. A local teacher renders the prompt through its tokenizer's chat
template; here the server holds the tokenizer, so a "messages" record goes to
/chat/completions as it is (generate.system first), and so does a "prompt" record as one
user message (teacher.api_endpoint=chat, what every API serves). With
teacher.api_endpoint=completions a prompt record's raw text goes to /completions instead,
as the local teacher reads it when its tokenizer has no template.

The reasoning opener (generate.reasoning's text before {reasoning}): /completions receives
it at the end of the prompt, as the local teacher does. A chat API cannot be made to start
its answer with given text; the opener is written in front of the answer all the same (the
record's format is the local one), an answer that already starts with it loses that copy,
and a server that returns the reasoning apart (`reasoning_content`, `reasoning`) has it put
back in the template's place. Whether a chat model follows the template is up to it and to
generate.system.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Iterator, Optional

from . import remote


def identity(client: remote.Client, teacher) -> dict:
    """The endpoint's part of generate's identity (the key stays out of it)."""
    out = {"teacher": client.base, "api_model": client.resolve_model(teacher.api_model),
           "api_endpoint": teacher.api_endpoint}
    if teacher.api_top_logprobs:  # only then, so files written before the key still resume
        out["api_top_logprobs"] = teacher.api_top_logprobs
    return out


def request(rec: dict, g, endpoint: str, model: str, opener: str, top: int = 0
            ) -> tuple[str, dict, bool]:
    """(path, body, is chat) for one record; `top` > 0 asks for that many top
    log-probabilities per answer token (the chat form every server shares)."""
    sys_turn = [{"role": "system", "content": g.system}] if g.system else []
    if "messages" in rec or endpoint == "chat":
        msgs = rec["messages"] if "messages" in rec else [{"role": "user",
                                                            "content": rec["prompt"]}]
        path, body, chat = "/chat/completions", {"model": model, "messages": sys_turn + msgs}, True
        if rec.get("tools"):
            body["tools"] = rec["tools"]
    else:
        # as prompt_tokens renders a prompt record without a template
        text = (g.system + "\n\n" if g.system else "") + rec["prompt"] + opener
        path, body, chat = "/completions", {"model": model, "prompt": text}, False
    body.update(max_tokens=g.max_tokens, temperature=g.temperature, top_p=g.top_p)
    if top:
        body.update(logprobs=True, top_logprobs=top)
    return path, body, chat


def text_of(choice: dict, chat: bool, tmpl: Optional[tuple[str, str, str]]) -> str:
    """An answer's text, as the local teacher's would continue the prompt (without the
    opener, which output_record writes in front)."""
    if not chat:
        return choice["text"]
    msg = choice["message"]
    text = msg.get("content") or ""
    if tmpl is None:
        return text  # a reasoning field without a template has no place in the record
    opener, sep, _ = tmpl
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if isinstance(reasoning, str) and reasoning.strip():
        return reasoning.strip("\n") + sep + text.lstrip("\n")
    head = opener.strip()
    if head and text.lstrip().startswith(head):  # the model wrote the opener itself
        rest = text.lstrip()
        text = rest[len(opener):] if rest.startswith(opener) else rest[len(head):].lstrip()
    return text


def top_logprobs(choice: dict, top: int, where: str) -> list[list]:
    """An answer's top log-probabilities as a written record keeps them: per answer token,
    its top entries, each [token, logprob] and, where the endpoint gives them, the id
    (mlx_lm.server) and the bytes when they are not the token's UTF-8 (OpenAI). Servers
    differ on which token an entry's own `token` names (mlx_lm.server: not always the one
    generated), so only the top lists are kept; `cache` lines them up with the text."""
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, dict) else None
    if not isinstance(content, list):
        raise remote.RemoteError(f"{where} answered without log-probabilities (no "
                                 "choices[].logprobs.content): this endpoint does not give "
                                 "top_logprobs; set teacher.api_top_logprobs=0")
    out = []
    for pos in content:
        tops = pos.get("top_logprobs", []) if isinstance(pos, dict) else None
        if not isinstance(tops, list):
            raise remote.RemoteError(f"{where} answered a malformed logprobs entry {pos!r:.80}")
        row = []
        for e in tops[:top]:
            token, value = (e.get("token"), e.get("logprob")) if isinstance(e, dict) else (0, 0)
            if not isinstance(token, str) or not isinstance(value, (int, float)):
                raise remote.RemoteError(f"{where} answered a malformed top_logprobs entry "
                                         f"{e!r:.80}")
            item = [token, float(value)]
            tid, raw = e.get("id"), e.get("bytes")
            odd = (raw if isinstance(raw, list) and all(isinstance(b, int) for b in raw)
                   and bytes(raw) != token.encode("utf-8", "surrogatepass") else None)
            if isinstance(tid, int) or odd is not None:
                item.append(tid if isinstance(tid, int) else None)
            if odd is not None:
                item.append(odd)
            row.append(item)
        out.append(row)
    return out


def seed_for(seed: int, index: int, k: int) -> int:
    """The seed of answer k (and up) of prompt `index`: a function of the position only, so
    a rerun asks the same, and within 31 bits for servers that check."""
    digest = hashlib.sha256(f"{seed}/{index}/{k}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def _index(choice: dict) -> int:
    i = choice.get("index")
    return i if isinstance(i, int) else 0


def answers(client: remote.Client, rec: dict, index: int, model: str, g, teacher,
            tmpl: Optional[tuple[str, str, str]]) -> tuple[list[str], int, Optional[list]]:
    """The n answers to one record, their generated tokens and (teacher.api_top_logprobs)
    each answer's top log-probabilities (else None). With teacher.api_n one
    request asks for all n; an endpoint that answers fewer (mlx_lm.server ignores `n`) is
    asked again for the rest, and one that refuses `n` > 1 (llama.cpp's server: HTTP 400)
    gets one request per answer from then on."""
    top = teacher.api_top_logprobs
    path, body, chat = request(rec, g, teacher.api_endpoint, model, tmpl[0] if tmpl else "",
                               top)
    check = remote.choices(chat)
    texts: list[str] = []
    tops: list[list] = []
    ntok = 0
    while len(texts) < g.n:
        want = g.n - len(texts) if teacher.api_n and client.takes_n else 1
        req = dict(body)
        if client.max_tokens_key != "max_tokens":
            req[client.max_tokens_key] = req.pop("max_tokens")
        if want > 1:
            req["n"] = want
        if g.temperature > 0:  # greedy needs none, and some servers batch only unseeded
            req["seed"] = seed_for(g.seed, index, len(texts))
        try:
            out = client.post(path, req, check)
        except remote.RemoteError as e:
            if top and e.status in (400, 422) and "logprob" in str(e).lower():
                raise remote.RemoteError(f"{e}; the refusal names the log-probabilities: "
                                         f"lower teacher.api_top_logprobs={top} to what the "
                                         "endpoint gives, or set it to 0",
                                         e.status) from None
            if e.status in (400, 422) and "max_tokens" in req and chat \
                    and "max_completion_tokens" in str(e):
                # OpenAI's reasoning models take only the newer name; servers that ignore
                # it (llama.cpp's until 2026) would generate without a bound, so the older
                # name stays the first try
                client.max_tokens_key = "max_completion_tokens"
                client.note("max_tokens", f"{client.base} wants max_completion_tokens for "
                            "generate.max_tokens; sending that")
                continue
            if want == 1 or e.status not in (400, 422):
                raise
            client.takes_n = False  # a real fault shows again on the single request
            client.note("n", f"{client.base} refused n={want} answers in one request (HTTP "
                        f"{e.status}); asking one per request (teacher.api_n=false skips the "
                        "try)")
            continue
        got = sorted(out["choices"], key=_index)[:want]
        texts += [text_of(c, chat, tmpl) for c in got]
        if top:
            tops += [top_logprobs(c, top, client.base) for c in got]
        usage = out.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            ntok += usage["completion_tokens"]
    return texts, ntok, (tops if top else None)


def batches(client: remote.Client, model: str, cfg, prompts: list[dict], first: int,
            tmpl: Optional[tuple[str, str, str]]) -> Iterator[tuple]:
    """(first prompt, its records, texts n per record, generated tokens, each text's top
    log-probabilities or None) per batch of
    generate.batch_size prompts, in prompt order. Requests for the batches after the one
    being waited on are already in flight (about twice teacher.concurrency prompts), so a
    slow answer holds up the writing, not the endpoint. The first request that fails for
    good raises here; the caller closes the client, which drops the rest."""
    g, bs = cfg.generate, cfg.generate.batch_size
    starts = iter(range(first, len(prompts), bs))
    pending: deque = deque()  # (start, futures), in prompt order
    ahead = 0  # prompts submitted and not yet handed on
    while True:
        while not pending or ahead < 2 * client.concurrency:
            start = next(starts, None)
            if start is None:
                break
            futs = [client.submit(answers, client, prompts[i], i, model, g, cfg.teacher, tmpl)
                    for i in range(start, min(start + bs, len(prompts)))]
            pending.append((start, futs))
            ahead += len(futs)
        if not pending:
            return
        start, futs = pending.popleft()
        ahead -= len(futs)
        results = [f.result() for f in futs]
        tops = None if cfg.teacher.api_top_logprobs == 0 else [t for r in results for t in r[2]]
        yield (start, prompts[start:start + len(futs)],
               [text for r in results for text in r[0]], sum(r[1] for r in results), tops)
