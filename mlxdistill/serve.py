"""`mlxdistill serve`: an OpenAI-compatible HTTP server that answers with the student and
hands a request to a bigger model's endpoint when the student is not confident enough.

The rule is the one measured for the student (`fallback.rule` in an exported folder's
export.json, or in a run's eval.json): a named confidence signal of the student's own answer
and a threshold; defer when the signal is below it. The student writes its whole answer
first, so the decision is made before anything is sent, streaming included; a deferred
request is sent to the fallback and, when that is down or slower than its timeout, the
student's answer goes out marked as such. Every JSON body says who answered
(`answered_by`: "student" | "fallback"), so does the `X-Answered-By` header, and the
student's confidence comes with it.

One generation runs at a time, always on the same thread, the one that loaded the model:
the accelerator is one device, and MLX's arrays and streams belong to the thread that made
them. Requests past `max_concurrent` waiting or running get 429 at once rather than a queue
that hides the load. HTTP parsing is the standard library's: ThreadingHTTPServer, one
thread per connection.

The rule was fitted on greedy answers (eval's and export's fallback): a request with a
temperature above 0 is answered and judged the same way, but its confidence is that of a
sampled answer, which the threshold was not fitted on.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from . import confidence, models, remote
from .data import has_chat_template
from .errors import Error
from .generate import prompt_tokens
from .rundir import RunDir

API_KEY_ENV = "MLXDISTILL_API_KEY"


class ServeError(Error):
    pass


class BadRequest(Exception):
    """A client error: (HTTP status, message) answered as OpenAI's error object."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Options:
    host: str = "127.0.0.1"
    port: int = 8080
    fallback: Optional[str] = None         # base URL of an OpenAI-compatible endpoint (…/v1)
    fallback_model: Optional[str] = None   # its "model" field (default: the request's)
    fallback_key_env: Optional[str] = None  # environment variable holding its API key
    fallback_key: Optional[str] = field(default=None, repr=False)  # read from it at start
    fallback_timeout: float = 30.0         # seconds before the student's answer goes out
    api_key: Optional[str] = field(default=None, repr=False)  # required of clients when set
    max_tokens: int = 1024                 # the most a request may ask for
    default_max_tokens: int = 256
    max_body: int = 1 << 20                # bytes
    max_concurrent: int = 8                # generations running or waiting


@dataclass
class Student:
    model: object
    tok: object
    name: str
    context: int
    rule: Optional[dict]  # {"signal", "threshold", "always_defer", ...}; None: never defer
    note: Optional[str] = None  # why there is no rule, said at start-up


def read_rule(folder: str) -> tuple[Optional[dict], Optional[str]]:
    """The deferral rule measured for this student (export.json's, else eval.json's) and,
    when there is none a server can apply, why."""
    for name in ("export.json", "eval.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                rule = (json.load(f).get("fallback") or {}).get("rule")
        except (OSError, ValueError, AttributeError) as e:
            raise ServeError(f"{path} cannot be read as JSON ({e}); export or evaluate the "
                             "student again") from None
        if not rule:
            continue
        if rule.get("signal") not in confidence.ANSWER_SIGNALS:
            # fitted on reference text (records without answers): a per-position signal
            # that says nothing about one answer the server wrote
            return None, (f"the rule in {path} uses '{rule.get('signal')}', measured on "
                          "reference text, which a server cannot compute on its own answer; "
                          "evaluate on data.test records that carry answers for one it can")
        if rule.get("threshold") is None and not rule.get("always_defer"):
            return None, f"the rule in {path} never defers (its target needs no deferral)"
        return rule, None
    return None, "no deferral rule measured for it (export.json or eval.json)"


def load_student(path: str) -> Student:
    """A run directory (its trained student and eval.json's rule) or a model folder (an
    export, with export.json's rule, or any mlx_lm folder: then it never defers)."""
    run = RunDir(path)
    if run.is_run():
        cfg = run.load_config()
        _, tok, config = models.load_role(cfg, "student")
        model = run.load_student(cfg)
    elif models.is_model_folder(path):
        model, tok, config = models.load(path, "served")
    else:
        raise ServeError(f"{path} is neither a run directory nor an mlx_lm model folder; give "
                         "runs/NAME (after `mlxdistill train`) or an exported folder")
    context = int(config.get("max_position_embeddings") or 4096)
    rule, note = read_rule(path)
    return Student(model, tok, os.path.basename(os.path.normpath(path)), context, rule, note)


# ------------------------------------------------------------------ requests


def _int(body: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadRequest(400, f"'{key}' must be an integer from {lo} to {hi}, got {v!r}")
    return v


def _float(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise BadRequest(400, f"'{key}' must be a number from {lo} to {hi}, got {v!r}")
    return float(v)


def parse(kind: str, body: dict, student: Student, opts: Options) -> dict:
    """The request's prompt ids and sampling settings, or BadRequest naming the field."""
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in msgs):
            raise BadRequest(400, "'messages' must be a non-empty list of {\"role\": ..., "
                                  "\"content\": \"...\"} objects with text content")
        if not has_chat_template(student.tok):
            raise BadRequest(400, "this model has no chat template; use /v1/completions "
                                  "with a 'prompt'")
        rec = {"messages": msgs}
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest(400, "'prompt' must be a non-empty string")
        rec = {"prompt": prompt}
    max_tokens = _int(body, "max_tokens", opts.default_max_tokens, 1, opts.max_tokens)
    if body.get("max_completion_tokens") is not None:
        max_tokens = _int(body, "max_completion_tokens", max_tokens, 1, opts.max_tokens)
    if _int(body, "n", 1, 1, 1) != 1:
        raise BadRequest(400, "'n' must be 1")
    ids = prompt_tokens(student.tok, rec, None)
    if len(ids) + max_tokens > student.context:
        raise BadRequest(400, f"the prompt is {len(ids)} tokens and max_tokens {max_tokens}; "
                              f"this model's context is {student.context} tokens: shorten "
                              "the prompt or lower max_tokens")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest(400, "'stop' must be a string or a list of non-empty strings")
    return {"ids": ids, "max_tokens": max_tokens, "stop": stop,
            "temperature": _float(body, "temperature", 0.0, 0.0, 2.0),
            "top_p": _float(body, "top_p", 1.0, 0.0, 1.0),
            "stream": bool(body.get("stream", False))}


def student_answer(student: Student, req: dict) -> dict:
    """The student's whole answer and its confidence; called on the server's one MLX thread."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=req["temperature"],
                           top_p=req["top_p"] if req["top_p"] < 1.0 else 0.0)
    text, ids, finish = "", [], "length"
    for r in stream_generate(student.model, student.tok, req["ids"],
                             max_tokens=req["max_tokens"], sampler=sampler):
        if r.finish_reason == "stop":  # the end token: not part of the answer
            finish = "stop"
            break
        text += r.text
        ids.append(r.token)
        cut = min((text.find(s) for s in req["stop"] if s in text), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
            break
        if r.finish_reason:
            finish = r.finish_reason
    signals = confidence.answer_signals(student.model, req["ids"], ids,
                                        vocab=(student.rule or {}).get("vocab"))
    return {"text": text, "tokens": len(ids), "finish": finish, "signals": signals}


def decide(rule: Optional[dict], signals: dict) -> tuple[bool, Optional[float]]:
    """(defer?, the signal's value). No rule (a plain folder): never defer."""
    if not rule:
        return False, None
    value = signals.get(rule["signal"])
    if rule.get("always_defer"):
        return True, value
    thr = rule.get("threshold")
    return value is not None and thr is not None and value < thr, value


def ask_fallback(opts: Options, kind: str, body: dict) -> dict:
    """The fallback endpoint's answer (non-streaming), or an exception on any failure:
    status, timeout, refused connection, a body that is not the expected JSON."""
    url = opts.fallback.rstrip("/") + ("/chat/completions" if kind == "chat" else
                                       "/completions")
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    if opts.fallback_model:
        out["model"] = opts.fallback_model
    headers = {"Content-Type": "application/json"}
    if opts.fallback_key:
        headers["Authorization"] = f"Bearer {opts.fallback_key}"
    req = urllib.request.Request(url, json.dumps(out).encode(), headers, method="POST")
    with remote.opener(url).open(req, timeout=opts.fallback_timeout) as resp:
        data = json.loads(resp.read())
    if not isinstance(data, dict):
        raise ValueError("the fallback's answer is not a JSON object")
    remote.choices(kind == "chat")(data)  # ValueError naming what is missing
    choice = data["choices"][0]
    text = choice["message"]["content"] if kind == "chat" else choice["text"]
    if not isinstance(text, str):
        raise ValueError("no text in the fallback's answer")
    return {"text": text, "finish": choice.get("finish_reason") or "stop",
            "model": data.get("model"), "usage": data.get("usage")}


def response(kind: str, model: str, text: str, finish: str, answered_by: str,
             conf: dict, usage: Optional[dict]) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": text},
               "finish_reason": finish} if kind == "chat" else
              {"index": 0, "text": text, "finish_reason": finish})
    return {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage, "answered_by": answered_by, "confidence": conf}


def chunks(res: dict, kind: str, size: int = 16) -> list[dict]:
    """A finished answer as OpenAI stream chunks (the text in pieces, then the finish)."""
    text, base = res["choices"][0], {k: res[k] for k in ("id", "model", "created",
                                                          "answered_by", "confidence")}
    body = text["message"]["content"] if kind == "chat" else text["text"]
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    out = []
    pieces = [body[i:i + size] for i in range(0, len(body), size)] or [""]
    for i, p in enumerate(pieces):
        delta = ({"delta": ({"role": "assistant"} if i == 0 else {}) | {"content": p}}
                 if kind == "chat" else {"text": p})
        out.append({**base, "object": obj,
                    "choices": [{"index": 0, **delta, "finish_reason": None}]})
    end = {"delta": {}} if kind == "chat" else {"text": ""}
    out.append({**base, "object": obj,
                "choices": [{"index": 0, **end, "finish_reason": text["finish_reason"]}]})
    return out


# ------------------------------------------------------------------ the server


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, student: Student, worker: ThreadPoolExecutor, opts: Options,
                 log=print):
        super().__init__((opts.host, opts.port), Handler)
        self.student, self.worker, self.opts, self.log = student, worker, opts, log
        self.slots = threading.BoundedSemaphore(opts.max_concurrent)
        self.stats_lock = threading.Lock()
        self.stats = {"requests": 0, "deferred": 0, "fallback_failed": 0}
        self.pool = ThreadPoolExecutor(opts.max_concurrent, thread_name_prefix="fallback")

    def count(self, answered_by: str, deferred: bool, failed: bool) -> str:
        with self.stats_lock:
            s = self.stats
            s["requests"] += 1
            s["deferred"] += deferred
            s["fallback_failed"] += failed
            return f"deferral rate {s['deferred'] / s['requests']:.1%} of {s['requests']}"

    def server_close(self) -> None:
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.worker.shutdown(wait=False, cancel_futures=True)


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # the server logs one line per answer itself
        pass

    def _send(self, status: int, obj: dict, answered_by: Optional[str] = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if answered_by:
            self.send_header("X-Answered-By", answered_by)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

    def _authorized(self) -> bool:
        key = self.server.opts.api_key
        if not key:
            return True
        got = self.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {key}".encode())

    def do_GET(self):
        if not self._authorized():
            return self._error(401, "missing or wrong API key (Authorization: Bearer KEY)")
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            return self._send(200, {"object": "list", "data": [
                {"id": self.server.student.name, "object": "model", "owned_by": "mlxdistill"}]})
        if self.path.rstrip("/") in ("/health", "/v1/health"):
            return self._send(200, {"status": "ok"})
        self._error(404, f"no route {self.path}; use /v1/chat/completions, /v1/completions "
                         "or /v1/models")

    def do_POST(self):
        path = self.path.rstrip("/")
        kind = {"/v1/chat/completions": "chat", "/chat/completions": "chat",
                "/v1/completions": "text", "/completions": "text"}.get(path)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length > self.server.opts.max_body:
            self.close_connection = True  # the unread body must not be parsed as a request
            return self._error(413, f"request body of {length} bytes is over the limit of "
                                    f"{self.server.opts.max_body}")
        raw = self.rfile.read(length) if length > 0 else b""
        if not self._authorized():
            return self._error(401, "missing or wrong API key (Authorization: Bearer KEY)")
        if kind is None:
            return self._error(404, f"no route {self.path}; use /v1/chat/completions or "
                                    "/v1/completions")
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return self._error(400, "the request body must be a JSON object")
        try:
            self._complete(kind, body)
        except BadRequest as e:
            self._error(e.status, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception as e:  # noqa: BLE001  a failed generation answers 500, and says why
            self.server.log(f"{kind}: error: {type(e).__name__}: {e}")
            try:
                self._error(500, f"the student failed on this request: {type(e).__name__}: "
                                 f"{str(e)[:200]}")
            except OSError:
                pass

    def _complete(self, kind: str, body: dict) -> None:
        srv, t0 = self.server, time.time()
        req = parse(kind, body, srv.student, srv.opts)
        if not srv.slots.acquire(blocking=False):
            raise BadRequest(429, f"{srv.opts.max_concurrent} generations are running or "
                                  "waiting; retry later")
        try:
            ans = srv.worker.submit(student_answer, srv.student, req).result()
        finally:
            srv.slots.release()
        defer, value = decide(srv.student.rule, ans["signals"])
        rule = srv.student.rule
        conf = {"signal": rule["signal"] if rule else None, "value": value,
                "threshold": rule["threshold"] if rule else None,
                "signals": ans["signals"]}
        answered_by, text, finish, failed = "student", ans["text"], ans["finish"], False
        model, usage = srv.student.name, {"prompt_tokens": len(req["ids"]),
                                          "completion_tokens": ans["tokens"],
                                          "total_tokens": len(req["ids"]) + ans["tokens"]}
        if defer and srv.opts.fallback:
            try:
                # the whole exchange is bounded, not only each socket read: a server that
                # drips bytes must not hold the answer past the timeout
                fb = srv.pool.submit(ask_fallback, srv.opts, kind, body).result(
                    timeout=srv.opts.fallback_timeout)
                answered_by, text, finish = "fallback", fb["text"], fb["finish"]
                model, usage = fb["model"] or model, fb["usage"]
            except FutureTimeout:
                failed = True
                conf["fallback_error"] = f"no answer within {srv.opts.fallback_timeout:g} s"
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
                failed = True  # down or garbled: the student's answer, marked
                conf["fallback_error"] = str(getattr(e, "reason", None) or e)[:200]
        res = response(kind, model, text, finish, answered_by, conf, usage)
        if req["stream"]:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("X-Answered-By", answered_by)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            for c in chunks(res, kind):
                self.wfile.write(f"data: {json.dumps(c)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        else:
            self._send(200, res, answered_by)
        rate = srv.count(answered_by, bool(defer and srv.opts.fallback), failed)
        v = "-" if value is None else f"{value:.4g}"
        srv.log(f"{kind} {answered_by}{' (fallback failed)' if failed else ''}: confidence "
                f"{v}, {1000 * (time.time() - t0):.0f} ms, {ans['tokens']} student tokens; "
                f"{rate}")


def check_options(opts: Options) -> Options:
    """The options checked, with the keys read: the one clients must send (required off the
    loopback interface) and the fallback's, from the variable --fallback-key-env names."""
    key = opts.api_key or os.environ.get(API_KEY_ENV) or None
    if opts.host not in remote.LOOPBACK and not key:
        raise ServeError(f"--host {opts.host} serves beyond this machine: give --api-key or "
                         f"set {API_KEY_ENV}, which clients then send as 'Authorization: "
                         "Bearer KEY'")
    if opts.fallback and not remote.is_url(opts.fallback):
        raise ServeError(f"--fallback {opts.fallback} is not an http(s) URL; give the "
                         "endpoint's base, e.g. https://api.example.com/v1")
    for name in ("max_tokens", "default_max_tokens", "max_body", "max_concurrent"):
        if getattr(opts, name) < 1:
            raise ServeError(f"--{name.replace('_', '-')} must be at least 1")
    if opts.fallback_timeout <= 0:
        raise ServeError("--fallback-timeout must be a positive number of seconds")
    fallback_key = remote.read_key(opts.fallback_key_env, "--fallback-key-env")
    return Options(**{**opts.__dict__, "api_key": key, "fallback_key": fallback_key,
                      "default_max_tokens": min(opts.default_max_tokens, opts.max_tokens)})


def make_server(path: str, opts: Options, log=print) -> Server:
    opts = check_options(opts)
    # the thread that loads the model is the one that runs it, for the server's life
    worker = ThreadPoolExecutor(1, thread_name_prefix="mlx")
    try:
        student = worker.submit(load_student, path).result()
        return Server(student, worker, opts, log)
    except BaseException as e:
        worker.shutdown(wait=False)
        if not isinstance(e, OSError):
            raise
        raise ServeError(f"cannot listen on {opts.host}:{opts.port} ({e.strerror or e}); "
                         "choose another --port") from None


def serve(path: str, opts: Options, log=print) -> None:
    srv = make_server(path, opts, log)
    rule = srv.student.rule
    when = ("always" if rule and rule.get("always_defer") else
            f"when {rule['signal']} < {rule['threshold']:.6g}" if rule else "")
    log(f"serving {path} on http://{srv.server_address[0]}:{srv.server_address[1]}/v1 — "
        + (f"defer to {opts.fallback} {when}" if rule and opts.fallback else
           "the student alone" + ("" if opts.fallback else " (no --fallback)")
           + (f"; {srv.student.note}" if srv.student.note else "")))
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
