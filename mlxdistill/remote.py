"""A small client of OpenAI-compatible HTTP endpoints (mlx_lm.server, vLLM, llama.cpp's
server, cloud APIs): JSON over the standard library, requests run concurrently on a thread
pool, retried with exponential backoff and jitter (or the server's Retry-After) when the
failure is one a later try can fix, and one-line errors when it is not.

Retried: HTTP 408, 429 and 5xx, timeouts, refused or dropped connections, and a 200 whose
body is cut short or not the JSON asked for. Not retried: other 4xx (a wrong key, model or
URL stays wrong), a host name that does not resolve, a TLS failure.

The API key is read from the environment variable the config names and only ever goes into
the Authorization header: never into a message, a repr or a file (a server that echoes it
back in an error has it masked). No mlx here: the client serves any command that asks a
remote teacher, and imports in a blink.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import queue
from concurrent.futures import Future
from typing import Callable, Optional

from .errors import Error

_log = logging.getLogger(__name__)

# Seconds before the first retry, doubled each try up to the cap; each wait is drawn from
# [half, all] of that (jitter), so clients that failed together do not return together.
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
# A Retry-After longer than this is a quota, not a hiccup: stop and say so instead of
# holding the run for an hour.
RETRY_AFTER_CAP = 300.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")
RETRY_STATUS = (408, 429)  # and every 5xx
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class RemoteError(Error):
    """An endpoint that refused, failed or went away; the message is one line and names the
    endpoint and what to do. `status`: the HTTP status of a refusal (4xx), else None."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class Stopped(Exception):
    """A request given up because another one failed first (the pool is closing)."""


def is_url(value) -> bool:
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


def redact(url: str) -> str:
    """`url` without any user:password@ part, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def url_problem(url: str) -> Optional[str]:
    """Why `url` cannot be a teacher endpoint, or None."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return "an endpoint URL needs a host, e.g. http://127.0.0.1:8080/v1"
    if parts.username is not None or parts.password is not None:
        return ("a key in the URL would be recorded with the outputs; put it in an "
                "environment variable and name that in teacher.api_key_env")
    if parts.query or parts.fragment:
        return "give the base URL without ?query or #fragment, e.g. https://HOST/v1"
    return None


def need_local(model: str, command: str) -> None:
    """Refuse an HTTP teacher in a command that needs the teacher's weights."""
    if is_url(model):
        raise RemoteError(f"teacher.model={redact(model)} is an HTTP endpoint, which only "
                          f"`mlxdistill generate` uses (and `cache`/`train` through the "
                          f"top-k cache it allows, docs/sequence-level.md); `{command}` needs "
                          "the teacher's weights (its distributions, or the model itself): "
                          "set teacher.model to a local mlx_lm folder or a hub id")


def read_key(env: Optional[str], setting: str = "teacher.api_key_env") -> Optional[str]:
    """The API key from the environment variable `env` (None: no key is sent); `setting`
    is what named the variable, for the message."""
    if env is None:
        return None
    if not ENV_NAME.match(env):
        raise RemoteError(f"{setting} must be the name of an environment variable "
                          "(e.g. OPENAI_API_KEY), not the key itself")
    key = os.environ.get(env, "").strip()
    if not key:
        raise RemoteError(f"{setting}={env}: the environment variable {env} is not "
                          f"set; export {env}=<your key> (it is read only from there)")
    return key


def opener(url: str) -> urllib.request.OpenerDirector:
    """urllib's opener for requests to `url`. A proxy from the environment must not see
    requests to this machine (nor could it reach them); elsewhere urllib's own proxy
    settings apply."""
    host = urllib.parse.urlsplit(url).hostname
    return urllib.request.build_opener(
        *([urllib.request.ProxyHandler({})] if host in LOOPBACK else []))


def backoff(attempt: int) -> float:
    """The wait before retry number `attempt` (0 for the first)."""
    full = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt)
    return random.uniform(full / 2, full)


def retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds a Retry-After header asks for (a number or an HTTP date), None if absent or
    unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def server_message(raw: bytes) -> str:
    """What an error body says: OpenAI's {"error": {"message"}}, {"error": "..."},
    {"detail": ...}, {"message": ...}, or the text itself."""
    text = raw.decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        return _one_line(text) or "no message"
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            val = body.get(key)
            if isinstance(val, dict):
                val = val.get("message") or json.dumps(val)
            if val:
                return _one_line(str(val))
    return _one_line(text)


class _Retry(Exception):
    """A failure a later try may fix: `what` for the final message, `wait` a server's
    Retry-After in seconds (None: back off)."""

    def __init__(self, what: str, kind: str, wait: Optional[float] = None):
        super().__init__(what)
        self.what, self.kind, self.wait = what, kind, wait


class Client:
    """Requests to one OpenAI-compatible base URL (`.../v1`). `post` and `get` retry;
    `submit` runs a call on the pool (`concurrency` at once); `close` (or leaving a `with`)
    stops every retry still waiting and drops the calls not started."""

    def __init__(self, base_url: str, key_env: Optional[str] = None, timeout: float = 300.0,
                 max_retries: int = 6, concurrency: int = 8):
        problem = url_problem(base_url)
        if problem is not None:
            raise RemoteError(f"teacher.model={redact(base_url)}: {problem}")
        self.base = base_url.rstrip("/")
        self.key_env = key_env
        self._key = read_key(key_env)
        self.timeout, self.max_retries, self.concurrency = timeout, max_retries, concurrency
        self.stop = threading.Event()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._noted: set = set()
        # what the endpoint turned out to refuse (remote_teacher adapts on a 400 saying so)
        self.takes_n = True
        self.max_tokens_key = "max_tokens"
        self._lock = threading.Lock()
        host = urllib.parse.urlsplit(self.base).hostname
        self._opener = opener(self.base)
        if self._key and self.base.lower().startswith("http://") and host not in LOOPBACK:
            _log.warning(f"the key in ${key_env} goes to {host} over plain http, readable on "
                         "the way; use https unless the network is yours")

    def __repr__(self) -> str:  # the key stays out of any repr, log or traceback
        return f"Client({self.base!r}, key_env={self.key_env!r})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.stop.set()
        while True:  # calls not started are dropped
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in self._workers:
            self._jobs.put(None)
        self._workers = []

    def submit(self, fn: Callable, *args) -> Future:
        """fn(*args) on one of `concurrency` worker threads. They are daemon threads (not
        concurrent.futures' pool, whose threads the interpreter waits for at exit): after an
        error or Ctrl-C the process ends at once, not when the last request times out."""
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        if len(self._workers) < self.concurrency:
            w = threading.Thread(target=self._work, name=f"remote-{len(self._workers)}",
                                 daemon=True)
            w.start()
            self._workers.append(w)
        return fut

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # the caller's future.result() raises it
                fut.set_exception(e)

    def scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def get(self, path: str) -> dict:
        return self._call("GET", path, None, None)

    def post(self, path: str, body: dict, check: Optional[Callable[[dict], None]] = None
             ) -> dict:
        """The JSON answer to `body` at base + `path`; `check` raises ValueError on an answer
        of the wrong shape, which counts as a broken answer and is retried."""
        return self._call("POST", path, body, check)

    def models(self) -> list[str]:
        """The ids GET /models lists."""
        data = self.get("/models").get("data")
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)] \
            if isinstance(data, list) else []

    def resolve_model(self, wanted: Optional[str]) -> str:
        """`wanted`, or the one model the endpoint serves."""
        if wanted:
            return wanted
        try:
            ids = self.models()
        except RemoteError as e:
            raise RemoteError(f"teacher.api_model is not set and asking {self.base}/models "
                              f"for the model failed ({e}); set teacher.api_model") from None
        if len(ids) != 1:
            listed = ", ".join(ids[:5]) + (", …" if len(ids) > 5 else "")
            raise RemoteError(f"teacher.api_model is not set and {self.base}/models lists "
                              f"{len(ids)} models ({listed or 'none'}); set teacher.api_model "
                              "to the one to use")
        return ids[0]

    # -- one request, then the retry loop --------------------------------------------

    def _once(self, method: str, url: str, body: Optional[dict],
              check: Optional[Callable[[dict], None]]) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self._key:
            req.add_header("Authorization", f"Bearer {self._key}")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                raw = e.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            status = e.code
            msg = self.scrub(server_message(raw))
            if status in RETRY_STATUS or status >= 500:
                raise _Retry(f"HTTP {status}: {msg}", f"HTTP {status}",
                             retry_after(e.headers.get("Retry-After"))) from None
            raise RemoteError(self._refusal(url, status, msg, body), status) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, socket.gaierror):
                host = urllib.parse.urlsplit(url).hostname
                raise RemoteError(f"{self.base}: cannot resolve the host {host} ({reason}); "
                                  "check teacher.model") from None
            if isinstance(reason, ssl.SSLError):
                raise RemoteError(f"{self.base}: TLS failed ({_one_line(str(reason))}); check "
                                  "the URL's scheme and the server's certificate") from None
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retry(f"no answer within teacher.timeout={self.timeout:g} s",
                             "timeout") from None
            raise _Retry(f"connection failed ({_one_line(str(reason))})", "connection") from None
        except (TimeoutError, socket.timeout):
            raise _Retry(f"no answer within teacher.timeout={self.timeout:g} s",
                         "timeout") from None
        except (http.client.HTTPException, ConnectionError) as e:
            raise _Retry(f"connection dropped ({type(e).__name__})", "connection") from None
        try:
            out = json.loads(raw.decode("utf-8"))
            if not isinstance(out, dict):
                raise ValueError("not a JSON object")
            if check is not None:
                check(out)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _Retry(f"a broken answer ({_one_line(self.scrub(str(e)), 80)})",
                         "broken answer") from None
        return out

    def _call(self, method: str, path: str, body: Optional[dict],
              check: Optional[Callable[[dict], None]]) -> dict:
        url = self.base + path
        for attempt in range(self.max_retries + 1):
            if self.stop.is_set():
                raise Stopped()
            try:
                return self._once(method, url, body, check)
            except _Retry as r:
                if attempt == self.max_retries:
                    raise RemoteError(self._gave_up(url, r)) from None
                if r.wait is not None and r.wait > RETRY_AFTER_CAP:
                    raise RemoteError(f"{url}: {r.what}, and the server asks to wait "
                                      f"{r.wait:,.0f} s (Retry-After): a quota, not a hiccup; "
                                      "run again later or lower teacher.concurrency") from None
                self.note(r.kind, f"{url}: {r.what}; retrying (up to teacher.max_retries="
                                  f"{self.max_retries}; this note once per kind of failure)")
                if self.stop.wait(r.wait if r.wait is not None else backoff(attempt)):
                    raise Stopped() from None
        raise AssertionError("unreachable")

    def note(self, kind: str, message: str) -> None:
        """One warning per kind of event, so a user sees why a run slows down without a
        line per request."""
        with self._lock:
            if kind in self._noted:
                return
            self._noted.add(kind)
        _log.warning(self.scrub(message))

    def _gave_up(self, url: str, r: _Retry) -> str:
        hint = {"HTTP 429": "the endpoint's rate limit: lower teacher.concurrency or raise "
                            "teacher.max_retries",
                "timeout": "raise teacher.timeout (long answers, a busy server) or lower "
                           "teacher.concurrency",
                "broken answer": "the server or a proxy in between cuts its answers; check "
                                 "its logs"}.get(r.kind, "check that the server is up and "
                                                         "reachable")
        return f"{url}: {r.what} after {self.max_retries + 1} tries; {hint}"

    def _refusal(self, url: str, status: int, msg: str, body: Optional[dict]) -> str:
        """The one line for a 4xx that another try would not change."""
        head = f"{url}: HTTP {status} ({msg})"
        model = (body or {}).get("model")
        if status in (401, 403):
            if self.key_env is None:
                return (f"{head}: the endpoint wants an API key; put it in an environment "
                        "variable and set teacher.api_key_env to that variable's name")
            if status == 401:
                return (f"{head}: the endpoint refused the key in ${self.key_env}; set "
                        f"{self.key_env} to a valid key")
            return (f"{head}: the key in ${self.key_env} may not use this endpoint or model "
                    f"{model!r}; check the key's permissions or teacher.api_model")
        if status == 404:
            return (f"{head}: no such path or model; check teacher.model (the base URL, "
                    f"usually ending in /v1) and teacher.api_model ({model!r})")
        if status == 413:
            return f"{head}: the request is too large for the endpoint; shorten the prompts"
        hint = "check the generate.* sampling settings and teacher.api_model"
        if (body or {}).get("prompt") is not None:
            hint += ("; an endpoint without /completions needs teacher.api_endpoint=chat")
        return f"{head}: the endpoint rejected the request; {hint}"


def choices(chat: bool) -> Callable[[dict], None]:
    """A `check` for a (chat) completion answer: a non-empty list of choices, each with its
    text where the API puts it."""

    def check(out: dict) -> None:
        got = out.get("choices")
        if not isinstance(got, list) or not got:
            raise ValueError("no choices")
        for c in got:
            if not isinstance(c, dict):
                raise ValueError("a choice is not an object")
            if chat:
                m = c.get("message")
                if not isinstance(m, dict) or not isinstance(m.get("content"), (str, type(None))):
                    raise ValueError("a choice without message.content")
            elif not isinstance(c.get("text"), str):
                raise ValueError("a choice without text")

    return check
