"""`mlxdistill serve`: a real HTTP client against the server on 127.0.0.1, with a real
`mlx_lm.server` serving the embedded teacher as the fallback ("the cloud"), a fallback that
is down and one that is too slow. Every wait is bounded."""

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import mlxdistill  # noqa: F401  (OpenBLAS before mlx)
from mlxdistill import confidence, remote, serve

ROOT = os.path.join(os.path.dirname(__file__), "..")
STUDENT = os.path.join(ROOT, "weights", "student")
TEACHER = os.path.join(ROOT, "weights", "teacher")
PROMPT = "To be, or not to be, that is"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_with_rule(tmp_path, threshold):
    """weights/student with an export.json whose rule defers below `threshold`."""
    dest = tmp_path / f"student-{threshold}"
    if dest.exists():
        return str(dest)
    shutil.copytree(STUDENT, dest)
    rule = {"signal": confidence.DEFAULT, "threshold": threshold, "defer_when": "below"}
    (dest / "export.json").write_text(json.dumps({"fallback": {"rule": rule}}))
    return str(dest)


class Running:
    """A serve.Server on a free loopback port, in a thread; stopped on exit."""

    def __init__(self, path, **opts):
        self.lines = []
        self.srv = serve.make_server(path, serve.Options(port=0, **opts), self.lines.append)
        self.port = self.srv.server_address[1]
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.srv.shutdown()
        self.srv.server_close()
        self.thread.join(10)

    def post(self, path, body, headers=None, raw=None, timeout=60):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = raw if raw is not None else json.dumps(body).encode()
        c.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        out = r.status, dict(r.getheaders()), r.read()
        c.close()
        return out

    def ask(self, body=None, path="/v1/completions", **kw):
        status, headers, data = self.post(path, body or {"prompt": PROMPT, "max_tokens": 8},
                                          **kw)
        return status, headers, json.loads(data) if data[:1] == b"{" else data


@pytest.fixture(scope="module")
def cloud():
    """A real mlx_lm.server serving weights/teacher on 127.0.0.1."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", TEACHER,
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/v1/models")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("mlx_lm.server did not start within 90 s")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


class Slow(BaseHTTPRequestHandler):
    def do_POST(self):
        time.sleep(5)

    def log_message(self, *a):
        pass


def test_student_alone_answers_and_says_so(tmp_path):
    with Running(folder_with_rule(tmp_path, -1e9)) as s:
        status, headers, res = s.ask()
        assert status == 200 and headers["X-Answered-By"] == "student"
        assert res["answered_by"] == "student" and res["object"] == "text_completion"
        assert isinstance(res["choices"][0]["text"], str)
        assert res["usage"]["completion_tokens"] >= 1
        c = res["confidence"]
        assert c["signal"] == confidence.DEFAULT and c["value"] == c["signals"][c["signal"]]
        assert s.lines and "student" in s.lines[-1] and "deferral rate 0.0%" in s.lines[-1]


def test_defers_to_a_real_mlx_lm_server(tmp_path, cloud):
    with Running(folder_with_rule(tmp_path, 1e9), fallback=cloud) as s:
        status, headers, res = s.ask({"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
        assert status == 200 and headers["X-Answered-By"] == "fallback"
        assert res["answered_by"] == "fallback" and res["choices"][0]["text"]
        assert res["confidence"]["value"] < 1e9
        # streaming: decided before the first chunk, every chunk says who answered
        status, headers, data = s.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 6,
                                                           "stream": True})
        events = [line[6:] for line in data.decode().split("\n\n") if line]
        assert status == 200 and headers["X-Answered-By"] == "fallback"
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["answered_by"] == "fallback" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] is not None
        assert "deferral rate 100.0% of 2" in s.lines[-1]


def test_fallback_down_or_slow_returns_the_student_marked(tmp_path):
    down = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with Running(folder_with_rule(tmp_path, 1e9), fallback=down) as s:
        status, headers, res = s.ask()
        assert status == 200 and res["answered_by"] == "student"
        assert headers["X-Answered-By"] == "student" and res["confidence"]["fallback_error"]
        assert "fallback failed" in s.lines[-1]
    slow = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{slow.server_address[1]}/v1"
        with Running(folder_with_rule(tmp_path, 1e9), fallback=url, fallback_timeout=1) as s:
            t0 = time.time()
            status, _, res = s.ask()
            assert status == 200 and res["answered_by"] == "student"
            assert "within 1 s" in res["confidence"]["fallback_error"]
            assert time.time() - t0 < 4.5  # the timeout, not the fallback's 5 s
    finally:
        slow.shutdown()
        slow.server_close()


def test_bad_requests_get_clear_4xx(tmp_path):
    with Running(folder_with_rule(tmp_path, -1e9), max_tokens=64, max_body=4096) as s:
        status, _, res = s.ask(raw=b"{not json")
        assert status == 400 and "JSON object" in res["error"]["message"]
        status, _, res = s.ask({"max_tokens": 4})
        assert status == 400 and "'prompt'" in res["error"]["message"]
        status, _, res = s.ask({"prompt": "x", "max_tokens": 65})
        assert status == 400 and "'max_tokens'" in res["error"]["message"]
        status, _, res = s.ask({"prompt": "x", "temperature": "hot"})
        assert status == 400 and "'temperature'" in res["error"]["message"]
        status, _, res = s.ask({"prompt": "word " * 3000, "max_tokens": 8})
        assert status == 413
        status, _, res = s.ask({"messages": [{"role": "user", "content": "hi"}]},
                               path="/v1/chat/completions")
        assert status == 400 and "chat template" in res["error"]["message"]
        status, _, res = s.ask({"prompt": "x"}, path="/v1/embeddings")
        assert status == 404
    with Running(folder_with_rule(tmp_path, -1e9), max_tokens=64) as s:
        s.srv.student.context = 40  # a prompt past the model's context is a 400, not a crash
        status, _, res = s.ask({"prompt": "word " * 60, "max_tokens": 8})
        assert status == 400 and "context is 40 tokens" in res["error"]["message"]


def test_a_failed_generation_is_a_500_and_the_server_goes_on(tmp_path, monkeypatch):
    def boom(student, req):
        raise RuntimeError("out of memory")

    with Running(folder_with_rule(tmp_path, -1e9)) as s:
        monkeypatch.setattr(serve, "student_answer", boom)
        status, _, res = s.ask()
        assert status == 500 and "out of memory" in res["error"]["message"]
        assert "error: RuntimeError" in s.lines[-1]
        monkeypatch.undo()
        assert s.ask()[0] == 200


def test_concurrent_requests_and_the_limit(tmp_path):
    with Running(folder_with_rule(tmp_path, -1e9), max_concurrent=3) as s:
        results = []

        def one():
            results.append(s.ask()[0])

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [200, 200, 200]
        # with every slot taken, one more is a 429 at once, not a hidden queue
        for _ in range(3):
            s.srv.slots.acquire()
        try:
            status, _, res = s.ask()
            assert status == 429 and "retry later" in res["error"]["message"]
        finally:
            for _ in range(3):
                s.srv.slots.release()


def test_api_key_and_binding(tmp_path, monkeypatch):
    path = folder_with_rule(tmp_path, -1e9)
    monkeypatch.delenv(serve.API_KEY_ENV, raising=False)
    with pytest.raises(serve.ServeError, match="--api-key"):
        serve.check_options(serve.Options(host="0.0.0.0"))
    assert serve.check_options(serve.Options(host="0.0.0.0", api_key="k")).api_key == "k"
    with pytest.raises(serve.ServeError, match="not an http"):
        serve.check_options(serve.Options(fallback="ftp://x"))
    # the fallback's key: read once at start, from the variable named, never shown
    monkeypatch.delenv("FALLBACK_KEY", raising=False)
    with pytest.raises(remote.RemoteError, match="--fallback-key-env=FALLBACK_KEY"):
        serve.check_options(serve.Options(fallback="http://127.0.0.1:1/v1",
                                          fallback_key_env="FALLBACK_KEY"))
    monkeypatch.setenv("FALLBACK_KEY", "fb-sekret")
    o = serve.check_options(serve.Options(fallback="http://127.0.0.1:1/v1",
                                          fallback_key_env="FALLBACK_KEY", api_key="k"))
    assert o.fallback_key == "fb-sekret" and "sekret" not in repr(o) and "'k'" not in repr(o)
    monkeypatch.setenv(serve.API_KEY_ENV, "sekret")
    with Running(path) as s:
        assert s.ask()[0] == 401
        assert s.ask(headers={"Authorization": "Bearer wrong"})[0] == 401
        assert s.ask(headers={"Authorization": "Bearer sekret"})[0] == 200


def test_rule_reading_and_decision(tmp_path):
    rule, note = serve.read_rule(STUDENT)  # a plain folder: never defers, and says why
    assert rule is None and "no deferral rule" in note
    path = folder_with_rule(tmp_path, 0.5)
    assert serve.read_rule(path)[0]["threshold"] == 0.5
    # a rule fitted on reference text cannot judge one answer: refused with the reason
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "eval.json").write_text(json.dumps(
        {"fallback": {"rule": {"signal": "confidence", "threshold": -1.0}}}))
    rule, note = serve.read_rule(str(tmp_path / "text"))
    assert rule is None and "'confidence'" in note and "reference text" in note
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "export.json").write_text("{not json")
    with pytest.raises(serve.ServeError, match="export.json"):
        serve.read_rule(str(tmp_path / "bad"))
    assert serve.decide(None, {"x": 0.1}) == (False, None)
    assert serve.decide({"signal": "x", "threshold": 0.5}, {"x": 0.1}) == (True, 0.1)
    assert serve.decide({"signal": "x", "threshold": 0.5}, {"x": 0.9}) == (False, 0.9)
    # a target only reached by deferring everything: no threshold, always defer
    assert serve.decide({"signal": "x", "threshold": None, "always_defer": True},
                        {"x": 0.9}) == (True, 0.9)
