"""`generate` with an HTTP teacher (teacher.model a URL): a stub OpenAI-compatible server on
127.0.0.1 that fails on chosen requests (429 with Retry-After, 500, a timeout, truncated
JSON, dropped connections), a permanent failure then a resume, refusals, the key kept out
of every file and log; then a real `mlx_lm server` on the embedded specialist teacher."""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from mlxdistill import api, remote
from mlxdistill import generate as gen_mod
from mlxdistill.cli import main
from mlxdistill.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-0123456789abcdefSECRET"
QUIET = dict(quiet=True, log=lambda m: None)
REASONING = "{reasoning}\nAnswer: {answer}\n"


class Stub:
    """An OpenAI-compatible server whose answers are a function of the request: prompt,
    seed and choice number. `faults[prompt]` lists what its successive requests get."""

    def __init__(self, key=None, models=("stub-model",)):
        self.key, self.models = key, list(models)
        self.faults: dict[str, list[str]] = {}
        self.fail_after = None  # POSTs answered before every later one gets a 503
        self.ignore_n = self.refuse_n = self.new_max = False
        self.delay = 0.02
        self.attempts: Counter = Counter()
        self.answered: Counter = Counter()
        self.times: dict[str, list[float]] = {}
        self.bodies: list[dict] = []
        self.posts = 0
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def send(self, code, obj, headers=()):
                raw = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                if self.path == "/v1/models":
                    return self.send(200, {"data": [{"id": m} for m in stub.models]})
                self.send(404, {"error": {"message": "no route"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.inflight += 1
                    stub.max_inflight = max(stub.max_inflight, stub.inflight)
                try:
                    self.answer(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with stub.lock:
                        stub.inflight -= 1

            def answer(self, body):
                if stub.key is not None and self.headers.get("Authorization") != \
                        f"Bearer {stub.key}":
                    got = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                    return self.send(401, {"error": {"message": f"Incorrect API key "
                                                                f"provided: {got}"}})
                if body.get("model") not in stub.models:
                    return self.send(404, {"error": {"message": f"model {body.get('model')} "
                                                                "does not exist"}})
                chat = self.path == "/v1/chat/completions"
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                with stub.lock:
                    stub.posts += 1
                    stub.bodies.append(body)
                    k = stub.attempts[prompt]
                    stub.attempts[prompt] += 1
                    stub.times.setdefault(prompt, []).append(time.time())
                    plan = stub.faults.get(prompt, [])
                    fault = plan[k] if k < len(plan) else None
                    if stub.fail_after is not None and stub.posts > stub.fail_after:
                        fault = "503"
                time.sleep(stub.delay)
                if fault == "429":
                    return self.send(429, {"error": {"message": "slow down"}},
                                     [("Retry-After", "1")])
                if fault in ("500", "503"):
                    return self.send(int(fault), {"error": {"message": "boom"}})
                if fault == "timeout":  # longer than teacher.timeout: the client has gone
                    time.sleep(3.5)
                    return
                if fault == "drop":  # the connection closes with no answer at all
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if stub.new_max and "max_tokens" in body:  # as OpenAI's reasoning models do
                    return self.send(400, {"error": {"message": "Unsupported parameter: "
                                                     "'max_tokens' is not supported with this "
                                                     "model. Use 'max_completion_tokens' "
                                                     "instead."}})
                if stub.refuse_n and body.get("n", 1) > 1:  # as llama.cpp's server does
                    return self.send(400, {"error": {"message": "Only one completion choice "
                                                                "is allowed"}})
                n = 1 if stub.ignore_n else body.get("n", 1)
                seed = body.get("seed", -1)
                texts = [stub.text(prompt, seed, i) for i in range(n)]
                key = "message" if chat else "text"
                out = {"choices": [{"index": i, key: {"role": "assistant", "content": t}
                                    if chat else t, "finish_reason": "stop"}
                                   for i, t in enumerate(texts)],
                       "usage": {"completion_tokens": 5 * n}}
                raw = json.dumps(out).encode()
                if fault in ("truncated", "cut"):
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    # truncated: a short body that says so; cut: the connection dies mid-body
                    self.send_header("Content-Length",
                                     str(len(raw) // 2 if fault == "truncated" else len(raw)))
                    self.end_headers()
                    self.wfile.write(raw[:len(raw) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    if fault == "cut":
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                with stub.lock:
                    stub.answered[prompt] += 1
                self.send(200, out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def text(prompt, seed, i):
        right = int(re.search(r"q(\d+)", prompt).group(1))
        q = f"q{right}"
        # answer 1 of every third seed is wrong: the verifier has something to reject
        ans = right + 1 if (i == 1 and seed % 3 == 0) else right
        return f"{q} seed {seed} choice {i}\nAnswer: {ans}\n"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_BASE", 0.01)


def prompts_file(tmp_path, n=10):
    p = tmp_path / "prompts.jsonl"
    recs = [{"prompt": f"solve q{i}", "answer": str(i)} for i in range(n)]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(p)


def cfg_for(url, tmp_path, out="gen.jsonl", **extra):
    ov = {"teacher.model": url, "generate.prompts": prompts_file(tmp_path),
          "generate.out": str(tmp_path / out), "generate.n": 2, "generate.batch_size": 3,
          "generate.temperature": 0.7, "generate.reasoning": json.dumps(REASONING),
          "generate.verifier": "exact", "teacher.timeout": 10, "teacher.concurrency": 4,
          "teacher.max_retries": 4, **extra}
    return load_config(None, [f"{k}={v}" for k, v in ov.items() if v is not None])


def records(path):
    return [json.loads(x) for x in open(path)]


def test_faults_are_retried_and_every_prompt_answered_once_in_order(stub, tmp_path):
    stub.faults = {"solve q1": ["429"], "solve q2": ["500", "500"], "solve q4": ["timeout"],
                   "solve q5": ["truncated"], "solve q7": ["drop"], "solve q8": ["cut", "503"]}
    # a timeout well above what an answer takes on a loaded machine, and well below the stub's
    m = gen_mod.generate(cfg_for(stub.url, tmp_path, **{"generate.verifier": None,
                                                        "teacher.timeout": 1.5}), **QUIET)
    recs = records(tmp_path / "gen.jsonl")
    # every prompt, n=2 answers each, in prompt order, none twice
    assert [r["prompt"] for r in recs] == [f"solve q{i}" for i in range(10) for _ in range(2)]
    assert [r["completion"].split(" seed")[0] for r in recs] == \
        [f"q{i}" for i in range(10) for _ in range(2)]
    assert [r["completion"].split("choice ")[1][0] for r in recs] == ["0", "1"] * 10
    assert len({r["completion"] for r in recs}) == 20
    assert all(stub.attempts[p] == len(plan) + 1 for p, plan in stub.faults.items())
    assert all(stub.answered[f"solve q{i}"] == 1 for i in range(10))
    t = stub.times["solve q1"]
    assert t[1] - t[0] >= 0.9  # Retry-After: 1 honoured
    assert 1 < stub.max_inflight <= 4  # concurrent, within teacher.concurrency
    assert m["lines"] == 20 and m["settings"]["teacher"] == stub.url
    assert m["settings"]["api_model"] == "stub-model"  # the one /models lists
    assert recs[0]["final_answer"] == "0" and recs[0]["reasoning"].startswith("q0 seed")
    assert not (tmp_path / "gen.jsonl.partial").exists()


def test_verifier_seeds_and_the_same_file_twice(stub, tmp_path):
    a = gen_mod.generate(cfg_for(stub.url, tmp_path, "a.jsonl"), **QUIET)
    gen_mod.generate(cfg_for(stub.url, tmp_path, "a2.jsonl"), **QUIET)
    # seeds are functions of the position: the same requests, the same file
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "a2.jsonl").read_text()
    assert a["rejected"] > 0 and a["kept"] + a["rejected"] == 20
    assert all(r["final_answer"] == r["answer"] for r in records(tmp_path / "a.jsonl"))
    stub.ignore_n, stub.bodies = True, []  # an endpoint ignoring `n` is asked for the rest
    b = gen_mod.generate(cfg_for(stub.url, tmp_path, "b.jsonl", **{"generate.verifier": None}),
                         **QUIET)
    assert b["kept"] == 20 and len(stub.bodies) == 20
    assert sorted(x.get("n", 1) for x in stub.bodies) == [1] * 10 + [2] * 10
    assert [r["completion"].split(" seed")[0] for r in records(tmp_path / "b.jsonl")] == \
        [f"q{i}" for i in range(10) for _ in range(2)]
    # an endpoint refusing `n`: one answer per request after the first refusal
    stub.ignore_n, stub.refuse_n, stub.bodies = False, True, []
    r = gen_mod.generate(cfg_for(stub.url, tmp_path, "r.jsonl", **{"generate.verifier": None}),
                         **QUIET)
    assert r["kept"] == 20 and sum(x.get("n", 1) == 1 for x in stub.bodies) == 20
    assert (tmp_path / "r.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    # an endpoint that wants max_completion_tokens gets it
    stub.refuse_n, stub.new_max, stub.bodies = False, True, []
    gen_mod.generate(cfg_for(stub.url, tmp_path, "t.jsonl", **{"generate.verifier": None}),
                     **QUIET)
    assert len(records(tmp_path / "t.jsonl")) == 20
    assert stub.bodies[-1]["max_completion_tokens"] == 256 and "max_tokens" not in \
        stub.bodies[-1]
    stub.new_max = False
    # api_n=false: one answer per request from the start
    stub.ignore_n, stub.bodies = False, []
    gen_mod.generate(cfg_for(stub.url, tmp_path, "c.jsonl", **{"teacher.api_n": False}),
                     **QUIET)
    assert len(stub.bodies) == 20 and all("n" not in b for b in stub.bodies)
    # greedy: no seed is sent
    stub.bodies = []
    gen_mod.generate(cfg_for(stub.url, tmp_path, "d.jsonl", **{"generate.temperature": 0}),
                     **QUIET)
    assert stub.bodies and all("seed" not in b for b in stub.bodies)


def test_permanent_failure_then_resume_matches_an_uninterrupted_run(stub, tmp_path):
    gen_mod.generate(cfg_for(stub.url, tmp_path, "full.jsonl"), **QUIET)
    stub.fail_after = stub.posts + 5  # the endpoint dies part-way through the next run
    cfg = cfg_for(stub.url, tmp_path, "cut.jsonl", **{"teacher.max_retries": 2,
                                                      "teacher.api_model": "stub-model"})
    with pytest.raises(remote.RemoteError) as e:
        gen_mod.generate(cfg, **QUIET)
    msg = str(e.value)
    assert "\n" not in msg and stub.url in msg and "HTTP 503" in msg and "3 tries" in msg
    assert "run the same command again to resume" in msg
    prog = json.loads((tmp_path / "cut.jsonl.progress.json").read_text())
    assert prog["done"] % 3 == 0 and prog["done"] < 10  # whole batches only
    partial = records(tmp_path / "cut.jsonl.partial")
    assert len(partial) == prog["kept"] and not (tmp_path / "cut.jsonl").exists()
    stub.fail_after = None
    # another model (or endpoint) is another teacher: its answers do not continue the file
    stub.models.append("other")
    with pytest.raises(ConfigError, match=r"cut.jsonl.partial was started with other "
                       r"settings \(api_model: 'stub-model' then, 'other' now\)"):
        gen_mod.generate(cfg_for(stub.url, tmp_path, "cut.jsonl",
                                 **{"teacher.api_model": "other"}), **QUIET)
    logs = []
    gen_mod.generate(cfg, quiet=True, log=logs.append)
    assert any("resuming" in m and f"{prog['done']}/10" in m for m in logs)
    assert (tmp_path / "cut.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()


def test_other_endpoint_is_not_the_finished_run(stub, tmp_path):
    gen_mod.generate(cfg_for(stub.url, tmp_path), **QUIET)
    other = Stub()
    try:
        posts = other.posts
        notes = []
        gen_mod.generate(cfg_for(other.url, tmp_path), quiet=True, log=notes.append)
        assert other.posts > posts  # regenerated, not "done", and the user is told why
        assert any(f"was generated with teacher='{stub.url}'; generating it again with "
                   f"'{other.url}'" in n for n in notes), notes
        m = json.loads((tmp_path / "gen.jsonl.manifest.json").read_text())
        assert m["settings"]["teacher"] == other.url
    finally:
        other.close()


def test_refusals_are_one_line(stub, tmp_path, monkeypatch):
    # 404: the model name is wrong
    with pytest.raises(remote.RemoteError, match=r"HTTP 404 \(model nope does not exist\): "
                       r"no such path or model; check teacher.model .*teacher.api_model"):
        gen_mod.generate(cfg_for(stub.url, tmp_path, **{"teacher.api_model": "nope"}), **QUIET)
    # the URL without /v1
    with pytest.raises(remote.RemoteError, match="HTTP 404"):
        gen_mod.generate(cfg_for(stub.url[:-3], tmp_path, **{"teacher.api_model": "m"}),
                         **QUIET)
    # two models served, none named
    stub.models.append("second")
    with pytest.raises(remote.RemoteError, match="lists 2 models .*set teacher.api_model"):
        gen_mod.generate(cfg_for(stub.url, tmp_path), **QUIET)
    # nothing listening: retried, then named
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(remote.RemoteError, match="connection failed.* after 2 tries; check "
                       "that the server is up"):
        gen_mod.generate(cfg_for(dead, tmp_path, **{"teacher.api_model": "m",
                                                    "teacher.max_retries": 1}), **QUIET)
    # a key named but not set
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(remote.RemoteError, match="NO_SUCH_KEY_VAR is not set"):
        gen_mod.generate(cfg_for(stub.url, tmp_path, **{"teacher.api_key_env":
                                                        "NO_SUCH_KEY_VAR"}), **QUIET)
    # config checks: a key in the URL, bad values
    with pytest.raises(ConfigError, match="a key in the URL") as e:
        cfg_for("https://user:sk-secret@example.com/v1", tmp_path)
    assert "sk-secret" not in str(e.value)
    with pytest.raises(ConfigError, match="teacher.api_key_env must name"):
        cfg_for(stub.url, tmp_path, **{"teacher.api_key_env": "sk-123"})
    with pytest.raises(ConfigError, match="teacher.concurrency"):
        cfg_for(stub.url, tmp_path, **{"teacher.concurrency": 0})


def test_commands_that_need_weights_refuse_an_http_teacher(stub, tmp_path):
    cfg = cfg_for(stub.url, tmp_path)
    with pytest.raises(remote.RemoteError, match=r"only `mlxdistill generate` uses .*"
                       r"`plan` needs the teacher's weights"):
        api.plan(cfg)
    # cache and train take an endpoint only as the source of a top-k cache (api_cache.py)
    for fn in (api.build_cache, api.train):
        with pytest.raises(ConfigError, match="needs cache.mode=topk"):
            fn(cfg)
    from mlxdistill import models
    with pytest.raises(models.ModelError, match="student.model=http.* is an HTTP endpoint"):
        models.load(stub.url, "student")


def test_chat_records_completions_endpoint_and_split_reasoning(stub, tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "solve q3"}],
                             "answer": "3"}) + "\n"
                 + json.dumps({"prompt": "solve q4", "answer": "4"}) + "\n")
    cfg = cfg_for(stub.url, tmp_path, "m.jsonl", **{
        "generate.prompts": str(p), "teacher.api_endpoint": "completions",
        "generate.system": "be brief", "generate.reasoning": "think", "generate.n": 1,
        "generate.verifier": None})
    gen_mod.generate(cfg, **QUIET)
    chat, text = stub.bodies[-2:] if "messages" in stub.bodies[-2] else stub.bodies[-2:][::-1]
    assert chat["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "solve q3"}]
    assert text["prompt"] == "be brief\n\nsolve q4<think>\n"  # the opener ends the prompt
    recs = records(tmp_path / "m.jsonl")
    assert recs[0]["messages"][-1]["content"].startswith("<think>\n")
    assert recs[1]["completion"].startswith("<think>\nq4 seed")
    # a chat answer whose reasoning comes apart, or starts with the opener itself
    rt = gen_mod.remote_teacher
    tmpl = gen_mod.reasoning_parts("think")
    msg = {"message": {"content": "\n42", "reasoning_content": "add them\n"}}
    assert rt.text_of(msg, True, tmpl) == "add them\n</think>\n42"
    assert rt.text_of({"message": {"content": "<think>\nhm\n</think>\n7"}}, True, tmpl) == \
        "hm\n</think>\n7"
    assert rt.text_of({"message": {"content": None}}, True, None) == ""


def test_key_never_on_disk_nor_in_logs_and_401_is_one_line(tmp_path):
    stub = Stub(key=KEY)
    stub.faults = {"solve q1": ["429"], "solve q6": ["500"]}  # retry notes get logged
    try:
        cfg = tmp_path / "c.yaml"
        out = tmp_path / "out" / "gen.jsonl"
        cfg.write_text(json.dumps({
            "teacher": {"model": stub.url, "api_key_env": "MY_TEACHER_KEY",
                        "concurrency": 3, "timeout": 5, "max_retries": 3},
            "generate": {"prompts": prompts_file(tmp_path), "out": str(out), "n": 2,
                         "batch_size": 4, "reasoning": REASONING, "verifier": "exact"}}))
        env = {**os.environ, "MY_TEACHER_KEY": KEY}
        run = subprocess.run([sys.executable, "-m", "mlxdistill", "generate", "-c", str(cfg)],
                             env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert "retrying" in run.stderr  # the notes are there, the key is not
        seen = run.stdout + run.stderr
        for root, _, names in os.walk(tmp_path):
            for name in names:
                seen += open(os.path.join(root, name), errors="replace").read()
        assert KEY not in seen and "0123456789abcdef" not in seen
        assert len(records(out)) > 0
        # the wrong key: one line, naming the variable; the server's echo of it masked
        env["MY_TEACHER_KEY"] = "sk-wrong-key-987654"
        res = CliRunner().invoke(main, ["generate", "-c", str(cfg),
                                        "generate.out=" + str(tmp_path / "g2.jsonl")], env=env)
        assert res.exit_code == 2
        err = res.stderr.strip()
        assert "\n" not in err and "HTTP 401" in err and "refused the key in $MY_TEACHER_KEY" \
            in err and "sk-wrong-key-987654" not in err and "***" in err
    finally:
        stub.close()


# -- a real mlx_lm.server ---------------------------------------------------------------

SPECIALIST = os.path.join(ROOT, "weights", "specialist", "teacher")


@pytest.fixture(scope="module")
def mlx_server(tmp_path_factory):
    """`mlx_lm server` on the embedded specialist teacher, on a free port of 127.0.0.1,
    offline (an empty hub cache: /models lists the served model alone)."""
    yield from serve(SPECIALIST, tmp_path_factory)


def serve(model, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub = tmp_path_factory.mktemp("hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub),
           "HF_HOME": str(hub)}
    log = open(hub / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", model,
                             "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlx_lm server exited: {open(hub / 'server.log').read()}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("mlx_lm server did not start within 60 s")
            time.sleep(0.2)
        yield url + "/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def test_mlx_lm_server_writes_what_a_local_teacher_writes(mlx_server, tmp_path):
    prompts = tmp_path / "task.jsonl"
    with open(os.path.join(ROOT, "data", "task", "prompts.jsonl")) as f:
        prompts.write_text("".join(next(f) for _ in range(3)))

    def cfg(teacher, out):
        return load_config(os.path.join(ROOT, "configs", "specialist.yaml"), [
            f"teacher.model={teacher}", f"generate.prompts={prompts}",
            f"generate.out={tmp_path / out}", "generate.n=2", "generate.batch_size=2",
            "teacher.timeout=60"])

    m = gen_mod.generate(cfg(mlx_server, "http.jsonl"), **QUIET)
    local = gen_mod.generate(cfg(SPECIALIST, "local.jsonl"), **QUIET)
    h, lo = records(tmp_path / "http.jsonl"), records(tmp_path / "local.jsonl")
    assert m["kept"] + m["rejected"] == 6 and m["kept"] >= 4  # n=2 from a server ignoring n
    assert [sorted(r) for r in h] == [sorted(r) for r in lo[:len(h)]]
    assert sorted(h[0]) == ["answer", "completion", "final_answer", "prompt", "reasoning"]
    assert all(r["final_answer"] == r["answer"] for r in h)
    s = m["settings"]
    assert s["teacher"] == mlx_server and s["api_model"] == os.path.realpath(SPECIALIST)
    assert "teacher_fingerprint" in local["settings"]
    assert {k: v for k, v in s.items() if k not in ("teacher", "api_model", "api_endpoint")} \
        == {k: v for k, v in local["settings"].items()
            if k not in ("teacher", "teacher_fingerprint", "teacher_weights_sha256")}


def test_top_k_cache_from_the_servers_logprobs_matches_the_local_teachers(mlx_server, tmp_path):
    """generate keeps mlx_lm.server's top-5 log-probabilities of every answer token; `cache`
    builds a top-k cache from them (no teacher pass) whose rows are the local teacher's and
    whose targets are the local teacher's top-5 on the answers; `train` trains from it."""
    from safetensors.numpy import load_file
    prompts = tmp_path / "task.jsonl"
    with open(os.path.join(ROOT, "data", "task", "prompts.jsonl")) as f:
        prompts.write_text("".join(next(f) for _ in range(8)))
    out = tmp_path / "chains.jsonl"

    def cfg(teacher, cache_dir, *extra):
        return load_config(os.path.join(ROOT, "configs", "specialist.yaml"), [
            f"teacher.model={teacher}", f"generate.prompts={prompts}", f"generate.out={out}",
            "generate.batch_size=4", "teacher.timeout=60", "teacher.api_top_logprobs=5",
            f"teacher.tokenizer={SPECIALIST}", f"data.train={out}", "cache.mode=topk",
            "cache.k=5", f"cache.dir={tmp_path / cache_dir}", *extra])

    http = cfg(mlx_server, "http-cache")
    m = gen_mod.generate(http, **QUIET)
    assert m["settings"]["api_top_logprobs"] == 5 and m["kept"] >= 6
    recs = records(out)
    assert all(len(r["teacher_logprobs"]) >= 10 and all(1 <= len(p) <= 5 for p in
                                                        r["teacher_logprobs"]) for r in recs)
    got = api.build_cache(http, **QUIET)
    assert got["api_records_lined_up"] == len(recs) and got["api_records_not_lined_up"] == 0
    local = api.build_cache(cfg(SPECIALIST, "local-cache"), **QUIET)
    assert local["rows"] == got["rows"]
    a = load_file(str(tmp_path / "http-cache" / "shard-00000.safetensors"))
    b = load_file(str(tmp_path / "local-cache" / "shard-00000.safetensors"))
    for key in ("input_ids", "loss_mask", "next_ids"):
        assert (a[key] == b[key]).all(), key
    trained = a["loss_mask"].astype(bool)
    from_api = trained & (a["logprobs"][..., 1] > -1e4)  # a top list, not the text's token
    assert from_api.sum() >= 0.8 * trained.sum()
    top1 = (a["ids"][..., 0] == b["ids"][..., 0])[from_api].mean()
    assert top1 >= 0.98, top1
    gap = abs(a["logprobs"][..., 0].astype(float) - b["logprobs"][..., 0])[from_api]
    assert gap.mean() < 0.05, gap.mean()
    same_set = [len(set(x) & set(y)) / 5 for x, y in zip(a["ids"][from_api], b["ids"][from_api])]
    assert sum(same_set) / len(same_set) >= 0.8
    # the second call finds it complete; train reads it with no teacher weights
    assert api.build_cache(http, **QUIET)["complete"]
    notes = []
    res = api.train(cfg(mlx_server, "http-cache", "train.iters=2", "train.batch_size=4",
                        "train.eval_every=2", "train.save_every=2", "train.eval_rows=4",
                        f"run.dir={tmp_path / 'run'}"), quiet=True, log=notes.append)
    assert res is None and any("not evaluated" in n and "--teacher" in n for n in notes)
    assert os.path.isfile(tmp_path / "run" / "model" / "model.safetensors")
    # the comparison with a local copy of the endpoint's model
    with pytest.raises(Exception, match="eval RUN --teacher PATH"):
        api.evaluate(str(tmp_path / "run"), records=4, quiet=True)
    ev = api.evaluate(str(tmp_path / "run"), records=4, quiet=True, teacher=SPECIALIST)
    assert ev["task"]["teacher"]["accuracy"] >= 0.75
    # more log-probabilities than the server gives: the refusal names the key
    with pytest.raises(remote.RemoteError, match=r"at most 11.*teacher.api_top_logprobs=15"):
        gen_mod.generate(load_config(os.path.join(ROOT, "configs", "specialist.yaml"), [
            f"teacher.model={mlx_server}", f"generate.prompts={prompts}",
            f"generate.out={tmp_path / 'wide.jsonl'}", "teacher.api_top_logprobs=15",
            "teacher.max_retries=0"]), **QUIET)


def test_a_student_of_another_tokenizer_trains_from_an_endpoints_top_k(tmp_path_factory,
                                                                       tmp_path):
    """The embedded SentencePiece teacher served by mlx_lm.server (/completions: it has no
    chat template), its top-5 kept by generate, and weights/student-xtok (another
    tokenizer) trained across tokenizers from the cache built of them."""
    teacher = os.path.join(ROOT, "weights", "teacher")
    lines = [x.strip() for x in open(os.path.join(ROOT, "data", "valid.jsonl"))][:6]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": json.loads(x)["text"][:60]}) + "\n"
                               for x in lines))
    out = tmp_path / "gen.jsonl"
    server = serve(teacher, tmp_path_factory)
    url = next(server)
    try:
        cfg = load_config(None, [
            f"teacher.model={url}", "teacher.api_endpoint=completions",
            "teacher.api_top_logprobs=5", f"teacher.tokenizer={teacher}", "teacher.timeout=60",
            f"generate.prompts={prompts}", f"generate.out={out}", "generate.max_tokens=24",
            "generate.temperature=0", f"data.train={out}", "data.seq_len=64",
            f"student.model={os.path.join(ROOT, 'weights', 'student-xtok')}",
            "cache.mode=topk", "cache.k=5", f"cache.dir={tmp_path / 'cache'}",
            "train.iters=2", "train.batch_size=2", "train.eval_every=2", "train.save_every=2",
            "train.eval_rows=2", f"run.dir={tmp_path / 'run'}", "train.mode=full"])
        gen_mod.generate(cfg, **QUIET)
    finally:
        next(server, None)
    assert all(len(r["teacher_logprobs"]) == 24 for r in records(out))
    notes = []
    api.train(cfg, quiet=True, log=notes.append)
    api.inspect_cache(str(tmp_path / "cache"))  # every shard's contents checked
    m = json.load(open(tmp_path / "cache" / "manifest.json"))
    assert m["api_records_lined_up"] == 6 and m["api_unknown_tokens"] == 0, m
    assert any("another tokenizer" in n for n in notes), notes
    steps = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in x]
    assert steps and all(math.isfinite(r["loss"]) for r in steps)
    assert os.path.isfile(tmp_path / "run" / "model" / "model.safetensors")
