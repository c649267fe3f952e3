"""Data parallel with mx.distributed: 2 ring processes on this machine equal 1 process, for
training, the teacher cache and generation; a rank that dies or hangs stops the other."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import ROOT, prompt_completion, tiny_overrides
from test_generate import TEMPLATE, cfg_for, prompts_file

from mlxdistill import api
from mlxdistill import cache as cache_mod
from mlxdistill import generate as gen_mod
from mlxdistill import trainer
from mlxdistill.config import load_config
from mlxdistill.distributed import EXIT_CODE

CLI = [sys.executable, "-m", "mlxdistill.cli"]


def launch(args, timeout=300):
    """`mlx.launch -n 2 --backend ring -- mlxdistill ARGS` on this machine."""
    launcher = shutil.which("mlx.launch")
    assert launcher, "mlx.launch ships with mlx; it must be on PATH"
    p = subprocess.run([launcher, "-n", "2", "--backend", "ring", "--", *CLI, *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def spawn_ranks(tmp_path, argv, ranks=(0, 1)):
    """Two ranks started without mlx.launch (which would kill the survivor itself), with the
    environment it sets: a ring hostfile of two local ports and MLX_RANK."""
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    hostfile = tmp_path / "ring.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    procs = []
    for r in ranks:
        env = {**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile),
               "PYTHONPATH": ROOT}
        out = open(tmp_path / f"rank{r}.log", "w+")
        procs.append((subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, text=True), out))
    return procs


def finish(proc, out, timeout):
    """(exit status, output) of a rank given `timeout` seconds to end; killed after that."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out.seek(0)
    return proc.returncode, out.read()


def rank0_outcome(rank0, rank1, timeout=60):
    """(exit status, output, seconds) of rank 0 given `timeout` seconds to end; both ranks
    are reaped and their logs closed whatever happens."""
    r0, out0 = rank0
    t0 = time.time()
    try:
        code, text = finish(r0, out0, timeout=timeout)
    finally:
        for p, f in (rank0, rank1):
            finish(p, f, timeout=0)
            f.close()
    return code, text, time.time() - t0


def checkpoint(run_dir, step):
    """(weights, optimizer state) of a run's checkpoint at `step`, as numpy arrays."""
    d = os.path.join(run_dir, "checkpoints", f"step-{step:06d}")
    return tuple({k: np.array(v) for k, v in mx.load(os.path.join(d, name)).items()}
                 for name in ("weights.safetensors", "optimizer.safetensors"))


def test_two_ranks_match_one_process(tiny, tmp_path, monkeypatch):
    # Prompt/completion records with the prompt masked, never straddling rows: the two
    # halves of a batch train unequal numbers of tokens, so ranks that averaged their own
    # means instead of weighting by tokens would be caught below.
    data = prompt_completion(tiny["train"], str(tmp_path / "pc.jsonl"), 3)
    iters = 4
    common = {"data.train": data, "train.iters": iters, "train.batch_size": 4,
              "train.save_every": 1, "train.keep_checkpoints": iters, "train.report_every": 1,
              "train.grad_accum": 1}
    logs = []
    one = load_config(None, tiny_overrides(tiny, tmp_path / "one", **common))
    api.train(one, quiet=True, log=logs.append)
    assert "ranks: 1 (single process)" in logs
    recs = [json.loads(x) for x in open(os.path.join(one.run.dir, "metrics.jsonl"))]
    assert max(r["grad_norm"] for r in recs) > one.train.grad_clip  # clipping takes part
    reader = cache_mod.ShardReader(one.cache.dir)
    halves = [reader.batches(4, one.run.seed, rank=r, size=2) for r in (0, 1)]
    ntok = [[int(next(h).loss_mask.sum()) for _ in range(iters)] for h in halves]
    for h in halves:
        h.close()
    assert ntok[0] != ntok[1], ntok
    # One process splitting each batch into the ranks' halves (grad_accum=2), same cache.
    accum = load_config(None, tiny_overrides(tiny, tmp_path / "accum", **{
        **common, "train.grad_accum": 2, "cache.dir": one.cache.dir}))
    trainer.fit(accum, quiet=True, log=lambda m: None)

    # One process writes 2 shards of the second cache and is stopped; the two ranks that
    # train from it first finish it together.
    two_ov = tiny_overrides(tiny, tmp_path / "two", **common)
    real, merged = cache_mod._merge_records, []

    def stop_after_two(*a):
        real(*a)
        merged.append(1)
        if len(merged) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "_merge_records", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        cache_mod.build(load_config(None, two_ov), quiet=True, log=lambda m: None)
    monkeypatch.setattr(cache_mod, "_merge_records", real)

    p = launch(["train", *two_ov])
    assert "ranks: 2 (mx.distributed" in p.stdout
    assert re.search(r"resuming cache \S+: 2/\d+ shards already written", p.stdout), p.stdout
    assert "teacher pass split over 2 ranks" in p.stdout
    assert "data parallel: 2 ranks, 2 rows each" in p.stdout
    assert p.stdout.count("evaluation on") == 1  # rank 0 alone evaluates and writes

    # The cache the two ranks finished is the one a single process built: the same shards
    # (sha256), the same manifest but for the measured speed.
    m1 = cache_mod.read_manifest(str(tmp_path / "one" / "cache"))
    m2 = cache_mod.read_manifest(str(tmp_path / "two" / "cache"))
    assert len(m2["shards"]) >= 6  # both ranks wrote shards
    for m in (m1, m2):
        m.pop("pass_tok_per_s")
    assert m1 == m2
    assert cache_mod.ShardReader(str(tmp_path / "two" / "cache")).rows == m1["rows"]

    # The ranks add each other's token-weighted gradient sums, which for two ranks is the
    # one float32 addition the accumulating process does (and halving, then doubling, is
    # exact); the clipping norm is summed in logical order, whatever layout the all-reduce
    # returns. So weights and AdamW state are bitwise those of one process with
    # grad_accum=2 at every step. Per-rank means or per-rank clipping would differ here.
    two_dir = str(tmp_path / "two" / "run")
    for step in range(1, iters + 1):
        for a, b in zip(checkpoint(accum.run.dir, step), checkpoint(two_dir, step)):
            for k in a:
                assert np.array_equal(a[k], b[k]), (step, k)

    # Against one process with the whole batch only the float32 summation order differs.
    # After one step AdamW's first moment is m = (1 - beta1) g: the gradients agree to a
    # few float32 roundings, far below the difference between the halves' token counts.
    (w1, o1), (w2, o2) = checkpoint(one.run.dir, 1), checkpoint(two_dir, 1)
    f32 = np.finfo(np.float32).eps
    dm = {k: np.abs(o1[f"{k}.m"].astype(np.float64) - o2[f"{k}.m"]) for k in w1}

    def norm(arrays):
        return np.sqrt(sum(float(np.square(x, dtype=np.float64).sum()) for x in arrays))

    assert norm(dm.values()) <= 100 * f32 * norm(o1[f"{k}.m"] for k in w1)
    # AdamW (no bias correction) moves a weight by lr m / (sqrt(v) + eps) with sqrt(v)
    # proportional to |m|: a slope of at most lr / eps in m, reached where the gradient is
    # near eps. There a float32 difference in m becomes a weight difference lr / eps times
    # larger; the first update differs by no more than that (plus rounding), parameter by
    # parameter.
    lr, eps = float(o1["learning_rate"]), optim.AdamW(learning_rate=0.0).eps
    for k in w1:
        m_ulp = np.spacing(np.maximum(np.abs(o1[f"{k}.m"]), np.abs(o2[f"{k}.m"])))
        w_ulp = np.spacing(np.maximum(np.abs(w1[k]), np.abs(w2[k])))
        bound = lr / eps * (dm[k] + m_ulp) + w_ulp + 16 * f32 * lr
        assert np.all(np.abs(w1[k] - w2[k].astype(np.float64)) <= bound), k

    # The saved students. Later steps feed these differences back through the gradients,
    # and AdamW's lr-sized steps make them grow once the learning rate is high enough
    # (scripts/dp_check.py measures that on the default student, results/dp_check.json).
    # Over these few steps of the tiny student they stay at the first update's size: no
    # weight differs by more than the 1e-5 that dp_check counts.
    a = mx.load(os.path.join(one.run.dir, "model", "model.safetensors"))
    b = mx.load(os.path.join(two_dir, "model", "model.safetensors"))
    for k in a:
        assert np.abs(np.array(a[k]) - np.array(b[k])).max() <= 1e-5, k
    kl = [[r["val_kl"] for r in map(json.loads, open(os.path.join(d, "metrics.jsonl")))
           if "val_kl" in r] for d in (one.run.dir, two_dir)]
    assert len(kl[0]) >= 1 and np.allclose(*kl, atol=1e-4)


def test_two_ranks_generate_the_same_file_and_resume(tiny, tmp_path, monkeypatch):
    (tmp_path / "p").mkdir()
    prompts = prompts_file(tmp_path / "p", n=7)  # cfg_for writes its own 5 in tmp_path
    extra = {"generate.prompts": prompts}
    gen_mod.generate(cfg_for(tiny, tmp_path, "one.jsonl", **extra), quiet=True,
                     log=lambda m: None)

    # One process stops after its first batch; two ranks resume it.
    real = gen_mod._atomic_json

    def dying(path, obj):
        real(path, obj)
        raise KeyboardInterrupt

    monkeypatch.setattr(gen_mod, "_atomic_json", dying)
    with pytest.raises(KeyboardInterrupt):
        gen_mod.generate(cfg_for(tiny, tmp_path, "two.jsonl", **extra), quiet=True,
                         log=lambda m: None)
    monkeypatch.setattr(gen_mod, "_atomic_json", real)
    ov = {"teacher.model": tiny["teacher"], "generate.prompts": prompts,
          "generate.out": str(tmp_path / "two.jsonl"), "generate.max_tokens": 6,
          "generate.batch_size": 2, "generate.n": 2, "generate.temperature": 1.0,
          "data.chat_template": json.dumps(TEMPLATE)}
    p = launch(["generate", *[f"{k}={v}" for k, v in ov.items()]])
    assert "resuming" in p.stdout and "2/7" in p.stdout
    assert p.stdout.count("generated ") == 1  # rank 0 alone writes
    # Rounds of 2 batches: rank 1 answers prompts 4-5, then nothing while rank 0 does 6.
    one, two = (tmp_path / "one.jsonl").read_text(), (tmp_path / "two.jsonl").read_text()
    assert one == two and len(one.splitlines()) == 14


def test_dead_rank_stops_the_other(tiny, tmp_path):
    run = tmp_path / "run"
    ov = tiny_overrides(tiny, tmp_path, **{"train.iters": 100000, "train.save_every": 2,
                                           "train.eval_every": 100000})
    ranks = spawn_ranks(tmp_path, [*CLI, "train", *ov])
    (r0, _), (r1, _) = ranks
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints").is_dir() and time.time() < deadline:
            assert r0.poll() is None and r1.poll() is None, open(tmp_path / "rank0.log").read()
            time.sleep(0.2)
        assert (run / "checkpoints").is_dir(), "training never started"
        r1.send_signal(signal.SIGKILL)  # rank 1 dies mid-training
    except BaseException:
        rank0_outcome(*ranks, timeout=0)
        raise
    code, text, took = rank0_outcome(*ranks)
    assert code == EXIT_CODE, text
    assert "error: rank 0: lost contact with another rank during" in text, text
    assert "Traceback" not in text
    assert took < 30, took


HANG = """
import mlxdistill, time
from mlxdistill.distributed import World
w = World(timeout=2.0)
w.barrier("the first barrier")
if w.rank == 1:
    time.sleep(120)  # hangs without dying: its sockets stay open
w.barrier("the second barrier")
"""


def test_hung_rank_times_out(tmp_path):
    code, text, took = rank0_outcome(*spawn_ranks(tmp_path, [sys.executable, "-c", HANG]))
    assert code == EXIT_CODE, text
    assert "rank 0: no answer from the other ranks for 2 s during the second barrier" in text
    assert took < 30, took


def test_missing_rank_times_out_while_connecting(tmp_path):
    # Rank 1 never starts: rank 0 must not wait forever to connect.
    (r0, out0), = spawn_ranks(tmp_path, [sys.executable, "-c", HANG], ranks=(0,))
    t0 = time.time()
    code, text = finish(r0, out0, timeout=60)
    out0.close()
    assert code != 0 and time.time() - t0 < 30
    assert "rank 0: the other ranks did not connect within 2 s" in text, text
