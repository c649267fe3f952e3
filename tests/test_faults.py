"""Fault injection on real processes: SIGKILL at random moments, truncated, bit-flipped and
lying shards, read-only and full disks, non-finite losses, malformed input, remote code.

Every kill point is random; the seed is printed in the failure message so a failure can be
replayed (MLXDISTILL_FAULT_SEED=...). `pytest -m soak tests/test_faults.py` runs a longer
variant with many more kills (by hand; not part of the default suite).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ROOT, make_model, tiny_overrides
from safetensors.numpy import load_file, save_file

from mlxdistill import cache as cache_mod
from mlxdistill import files, shards
from mlxdistill.cli import main

SEED = int(os.environ.get("MLXDISTILL_FAULT_SEED", random.SystemRandom().randrange(10**6)))
TIMING = ("tok_per_s", "peak_mem_gb")


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def one_line_error(res, *needles, code=2):
    assert res.exit_code == code, (res.exit_code, res.output)
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def start(args, log_path, limit_fsize=None):
    """`mlxdistill ARGS` as a real process (stdout+stderr to log_path)."""

    def limits():
        if limit_fsize is not None:  # a disk that fills up: writes past this size fail
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))

    out = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "mlxdistill.cli", *args], cwd=ROOT,
                            stdout=out, stderr=out, preexec_fn=limits)


def kill_when(proc, ready, rng, timeout=120) -> bool:
    """SIGKILL `proc` a random few milliseconds after `ready()` holds. False if it finished
    first."""
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.time() - t0 < timeout, "the process made no progress"
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.03))
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def lines(path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in f]


def weights(run_dir):
    return load_file(os.path.join(run_dir, "model", "model.safetensors"))


TRAIN = {"train.iters": 14, "train.save_every": 3, "train.report_every": 1,
         "train.eval_every": 5, "train.grad_accum": 2}


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """One uninterrupted run (and its cache, which the killed runs reuse)."""
    tmp = tmp_path_factory.mktemp("ref")
    res = invoke("train", "-q", *tiny_overrides(tiny, tmp, **TRAIN))
    assert res.exit_code == 0, res.output
    return {"tmp": tmp, "run": str(tmp / "run"), "cache": str(tmp / "cache")}


def _kill_and_resume_train(tiny, tmp_path, reference, kills: int):
    rng = random.Random(SEED)
    ov = tiny_overrides(tiny, tmp_path, **TRAIN, **{"cache.dir": reference["cache"]})
    mpath = tmp_path / "run" / "metrics.jsonl"
    landed = []
    for _ in range(kills):
        at = rng.randint(1, TRAIN["train.iters"] - 1)
        proc = start(["train", "-q", *ov], tmp_path / "log.txt")
        if kill_when(proc, lambda: lines(mpath) >= at, rng):
            landed.append(at)
    p = subprocess.run([sys.executable, "-m", "mlxdistill.cli", "train", "-q", *ov], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (SEED, p.stderr)
    assert landed, f"no kill landed (seed {SEED})"
    wa, wb = weights(reference["run"]), weights(str(tmp_path / "run"))
    assert wa.keys() == wb.keys()
    for k in wa:  # bit-identical on CPU
        assert np.array_equal(wa[k], wb[k]), (SEED, landed, k)
    assert metrics(reference["run"]) == metrics(str(tmp_path / "run")), (SEED, landed)
    ckpts = os.listdir(tmp_path / "run" / "checkpoints")
    assert all(".tmp" not in c for c in ckpts), ckpts  # saves cut by a kill are cleaned up


def test_sigkill_train_at_random_moments_resumes_bit_identical(tiny, tmp_path, reference):
    _kill_and_resume_train(tiny, tmp_path, reference, kills=2)


@pytest.mark.soak
def test_soak_many_kills(tiny, tmp_path, reference):
    _kill_and_resume_train(tiny, tmp_path, reference, kills=12)


def test_sigkill_cache_build_resumes_identical(tiny, tmp_path, reference):
    rng = random.Random(SEED + 1)
    ov = tiny_overrides(tiny, tmp_path, **{"cache.shard_rows": 2, "cache.batch_size": 1})
    mpath = tmp_path / "cache" / "manifest.json"

    def shards_written():
        try:
            return len(json.loads(mpath.read_text())["shards"]) >= 1
        except (OSError, ValueError):
            return False

    proc = start(["cache", "-q", *ov], tmp_path / "log.txt")
    landed = kill_when(proc, shards_written, rng)
    p = subprocess.run([sys.executable, "-m", "mlxdistill.cli", "cache", "-q", *ov], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    # the same data cut into 2-row shards as the reference's 16-row ones: compare contents
    ref = cache_mod.ShardReader(reference["cache"])
    got = cache_mod.ShardReader(str(tmp_path / "cache"))
    assert got.rows == ref.rows and landed, (SEED, landed)
    cat = {k: np.concatenate([got.load_shard(i)[k] for i in range(len(got.shards))])
           for k in ("input_ids", "ids", "counts")}
    refcat = {k: np.concatenate([ref.load_shard(i)[k] for i in range(len(ref.shards))])
              for k in ("input_ids", "ids", "counts")}
    assert np.array_equal(cat["input_ids"], refcat["input_ids"])
    assert cache_mod.summary(str(tmp_path / "cache"))["verified"]
    assert not [n for n in os.listdir(tmp_path / "cache") if ".tmp" in n]


def test_sigkill_generate_leaves_valid_jsonl(tiny, tmp_path):
    rng = random.Random(SEED + 2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the king {i}"}) + "\n"
                               for i in range(24)))
    ov = [f"teacher.model={tiny['teacher']}", f"generate.prompts={prompts}",
          "generate.max_tokens=8", "generate.batch_size=2"]
    full = invoke("generate", "-q", *ov, f"generate.out={tmp_path / 'full.jsonl'}")
    assert full.exit_code == 0, full.output
    out = tmp_path / "cut.jsonl"
    proc = start(["generate", "-q", *ov, f"generate.out={out}"], tmp_path / "log.txt")
    landed = kill_when(proc, lambda: lines(str(out) + ".partial") >= rng.randint(2, 12), rng)
    for path in (out, tmp_path / "cut.jsonl.partial"):
        if path.exists():  # whatever a kill leaves, no torn line is ever trusted
            for line in path.read_text().splitlines()[:-1]:
                json.loads(line)
    res = invoke("generate", "-q", *ov, f"generate.out={out}")
    assert res.exit_code == 0, res.output
    assert out.read_text() == (tmp_path / "full.jsonl").read_text(), (SEED, landed)


# ------------------------------------------------------------------ shards that lie

def _rewrite(cache_dir, i, mutate):
    """Apply `mutate` to shard i's file and re-sign it in the manifest, as a faulty producer
    would: sha256 alone cannot catch it."""
    m = json.loads(open(os.path.join(cache_dir, "manifest.json")).read())
    path = os.path.join(cache_dir, m["shards"][i]["file"])
    mutate(path)
    m["shards"][i]["sha256"] = files.sha256_file(path)
    with open(os.path.join(cache_dir, "manifest.json"), "w") as f:
        json.dump(m, f)
    for name in (".verified.json",):
        if os.path.exists(os.path.join(cache_dir, name)):
            os.remove(os.path.join(cache_dir, name))
    return m["shards"][i]["file"]


@pytest.fixture
def cache_copy(reference, tmp_path):
    d = str(tmp_path / "cache")
    shutil.copytree(reference["cache"], d)
    return d


def test_bit_flipped_shard_is_named(cache_copy):
    m = json.loads(open(os.path.join(cache_copy, "manifest.json")).read())
    name = m["shards"][1]["file"]
    with open(os.path.join(cache_copy, name), "r+b") as f:
        f.seek(os.path.getsize(f.name) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    one_line_error(invoke("inspect", cache_copy), name, "sha256")


def test_truncated_shard_is_named(cache_copy):
    def cut(path):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 100)

    name = _rewrite(cache_copy, 0, cut)
    one_line_error(invoke("inspect", cache_copy), name, "truncated")


def test_header_that_lies_is_refused_before_allocation(cache_copy):
    """A header declaring a 10^12-element tensor (sha256 re-signed) is refused from the
    header alone: reading it must not try to allocate terabytes."""

    def lie(path):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            body = f.read()
        header["counts"]["shape"] = [10**6, 10**6, 1]
        raw = json.dumps(header).encode()
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw + body)

    name = _rewrite(cache_copy, 0, lie)
    one_line_error(invoke("inspect", cache_copy), name, "declares")


def test_header_shape_against_manifest(cache_copy):
    """A well-formed shard whose shapes disagree with the manifest (one row short)."""

    def short(path):
        t = load_file(path)
        save_file({k: v[:-1] for k, v in t.items()}, path)

    name = _rewrite(cache_copy, 0, short)
    one_line_error(invoke("inspect", cache_copy), name, "from the manifest")


def test_symlink_out_of_the_cache_is_refused(cache_copy, tmp_path):
    m = json.loads(open(os.path.join(cache_copy, "manifest.json")).read())
    name = m["shards"][0]["file"]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(os.path.join(cache_copy, name), outside)
    os.symlink(outside, os.path.join(cache_copy, name))
    one_line_error(invoke("inspect", cache_copy), name, "outside")


# ------------------------------------------------------------------ disks

def test_full_disk_during_checkpoint_keeps_previous_state(tiny, tmp_path, reference):
    """Writes fail past 20 kB (RLIMIT_FSIZE, the way a full disk fails a write): the
    optimizer state does not fit, so the first checkpoint cannot be saved. The error is one
    line, no partial checkpoint is left, and a rerun with space completes exactly."""
    ov = tiny_overrides(tiny, tmp_path, **TRAIN, **{"cache.dir": reference["cache"]})
    proc = start(["train", "-q", *ov], tmp_path / "log.txt", limit_fsize=20_000)
    assert proc.wait(timeout=300) == 2
    log = (tmp_path / "log.txt").read_text().strip().splitlines()
    assert log[-1].startswith("error: ") and "the previous state is intact" in log[-1], log
    assert "Traceback" not in "\n".join(log), log
    ck = tmp_path / "run" / "checkpoints"
    assert not ck.exists() or os.listdir(ck) == [], os.listdir(ck)
    res = invoke("train", "-q", *ov)
    assert res.exit_code == 0, res.output
    wa, wb = weights(reference["run"]), weights(str(tmp_path / "run"))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_full_disk_during_cache_keeps_finished_shards(tiny, tmp_path, reference):
    ov = tiny_overrides(tiny, tmp_path)
    proc = start(["cache", "-q", *ov], tmp_path / "log.txt", limit_fsize=20_000)
    assert proc.wait(timeout=300) == 2
    assert "error: out of disk space" in (tmp_path / "log.txt").read_text()
    assert not [n for n in os.listdir(tmp_path / "cache") if ".tmp" in n]
    res = invoke("cache", "-q", *ov)
    assert res.exit_code == 0, res.output
    a, b = (json.loads(open(os.path.join(d, "manifest.json")).read())["shards"]
            for d in (reference["cache"], str(tmp_path / "cache")))
    assert [s["sha256"] for s in a] == [s["sha256"] for s in b]


def _mount(tmp_path, opts):
    d = tmp_path / "mnt"
    d.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)],
                       capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.decode().strip()})")
    return d


def test_cache_refuses_to_start_on_a_too_small_disk(tiny, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    d = _mount(tmp_path, "size=256k")
    try:
        res = invoke("cache", "-q", *tiny_overrides(tiny, tmp_path,
                                                     **{"cache.dir": str(d / "cache")}))
        one_line_error(res, "needs about", "free")
        assert os.listdir(d / "cache") == []  # refused before writing anything
    finally:
        subprocess.run(["umount", str(d)])


def test_cache_size_estimate_matches_the_files(reference):
    m = json.loads(open(os.path.join(reference["cache"], "manifest.json")).read())
    est = shards.estimate_bytes(m, m["rows"])
    real = sum(os.path.getsize(os.path.join(reference["cache"], s["file"]))
               for s in m["shards"])
    assert 0.9 * real <= est <= real, (est, real)  # headers are the only difference


def test_read_only_run_dir(tiny, tmp_path, reference):
    if os.geteuid() == 0:
        d = _mount(tmp_path, "ro,size=1m")
    else:
        d = tmp_path / "ro"
        d.mkdir()
        os.chmod(d, 0o555)
    try:
        ov = tiny_overrides(tiny, tmp_path, **{"cache.dir": reference["cache"],
                                               "run.dir": str(d / "run")})
        one_line_error(invoke("train", "-q", *ov), str(d / "run"), "cannot write")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(d)])


# ------------------------------------------------------------------ numbers

def _poison(cache_dir):
    """Infinite teacher log-probabilities in every row of the second shard the first epoch reads
    (re-signed): steps before it are fine, any step drawing from it has an infinite loss."""

    def nan(path):
        t = load_file(path)
        t["logprobs"][:] = np.inf
        save_file(t, path)

    second = cache_mod.ShardReader(cache_dir).order(0, 0)[1][0]
    _rewrite(cache_dir, second, nan)


@pytest.fixture(scope="module")
def topk_cache(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("topk")
    ov = tiny_overrides(tiny, tmp, **{"cache.mode": "topk", "cache.k": 8})
    assert invoke("cache", "-q", *ov).exit_code == 0
    return str(tmp / "cache")


def test_nonfinite_loss_stops_naming_the_step(tiny, tmp_path, topk_cache):
    cache_dir = str(tmp_path / "cache")
    shutil.copytree(topk_cache, cache_dir)
    _poison(cache_dir)
    ov = tiny_overrides(tiny, tmp_path, **TRAIN, **{"cache.mode": "topk", "cache.k": 8})
    err = one_line_error(invoke("train", "-q", *ov), "at step", code=3)
    step = int(err.split("at step ")[1].split(";")[0])
    kept = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert kept and all(int(k.split("-")[1]) < step for k in kept)  # none after the fault
    assert kept[-1] in err
    assert "train.nonfinite_skips" in err


def test_nonfinite_steps_skipped_when_allowed(tiny, tmp_path, topk_cache):
    cache_dir = str(tmp_path / "cache")
    shutil.copytree(topk_cache, cache_dir)
    _poison(cache_dir)
    ov = tiny_overrides(tiny, tmp_path, **TRAIN, **{"cache.mode": "topk", "cache.k": 8,
                                                    "train.nonfinite_skips": 14})
    res = invoke("train", *ov)
    assert res.exit_code == 0, res.output
    recs = metrics(str(tmp_path / "run"))
    assert recs[-1]["skipped"] > 0 and "update skipped" in res.output
    w = weights(str(tmp_path / "run"))
    assert all(np.isfinite(v).all() for v in w.values())


# ------------------------------------------------------------------ input and trust

@pytest.mark.parametrize("text", ["train: {iters: [1, 2}\n",
                                  "train:\n  iters: 10\n bad indent: 1\n",
                                  "- just\n- a list\n", "\x00\x01binary"])
def test_malformed_yaml(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    one_line_error(invoke("train", "-c", str(p)), str(p))


def test_malformed_jsonl_names_the_line(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the king"}\n{"text": "the queen"\n')
    one_line_error(invoke("cache", "-q", *tiny_overrides(tiny, tmp_path,
                                                         **{"data.train": str(bad)})),
                   "bad.jsonl:2:")


def test_remote_code_is_not_run_unless_trusted(tiny, tmp_path):
    d = make_model(str(tmp_path / "evil"), dim=16, layers=1)
    marker = tmp_path / "ran"
    (tmp_path / "evil" / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nfrom mlx_lm.models.llama import Model, "
        "ModelArgs\n")
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    cfg["model_file"] = "evil.py"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    ov = tiny_overrides(tiny, tmp_path, **{"teacher.model": d})
    one_line_error(invoke("cache", "-q", *ov), "teacher", "trust_remote_code")
    assert not marker.exists()


def test_stale_lock_is_taken_over(tiny, tmp_path, reference):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(str(dead.pid))
    ov = tiny_overrides(tiny, tmp_path, **{"cache.dir": reference["cache"], "train.iters": 2})
    res = invoke("train", "-q", *ov)
    assert res.exit_code == 0, res.output
    assert not (run / ".lock").exists()


def test_keep_last_n_checkpoints(tiny, tmp_path, reference):
    ov = tiny_overrides(tiny, tmp_path, **{**TRAIN, "train.keep_checkpoints": 3,
                                           "cache.dir": reference["cache"]})
    assert invoke("train", "-q", *ov).exit_code == 0
    kept = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert kept == ["step-000009", "step-000012", "step-000014"], kept


def test_long_records_are_counted_and_truncated_when_asked(tiny, tmp_path):
    data = tmp_path / "long.jsonl"
    long_text = " ".join(["the king"] * 40)  # 80 words > seq_len 32
    data.write_text("".join(json.dumps({"text": t}) + "\n"
                            for t in [long_text, "the queen .", long_text] * 4))
    for how in ("split", "truncate"):
        ov = tiny_overrides(tiny, tmp_path / how, **{"data.train": str(data),
                                                     "data.long_lines": how})
        res = invoke("cache", *ov)
        assert res.exit_code == 0, res.output
        assert "8 of 12 records are longer than data.seq_len=32" in res.output, res.output
    tokens = {how: json.loads(open(tmp_path / how / "cache" / "manifest.json").read())["tokens"]
              for how in ("split", "truncate")}
    assert tokens["truncate"] < tokens["split"]


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_written_files_follow_the_umask(tiny, tmp_path, monkeypatch, mask):
    """Shards, manifest, checkpoints and exports get the mode the umask gives any file, so a
    cache built by one user is readable by a teammate's run (safetensors writes 0600, MLX
    0644, whatever the umask)."""
    monkeypatch.setenv("MLXDISTILL_HASH_MEMO", str(tmp_path / "memo.json"))
    ov = tiny_overrides(tiny, tmp_path, **{"train.iters": 4, "train.save_every": 2})
    old = os.umask(mask)
    try:
        for args in (["train", "-q", *ov], ["export", str(tmp_path / "run"), "-o",
                                            str(tmp_path / "out")]):
            res = invoke(*args)
            assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    ckpt = max((tmp_path / "run" / "checkpoints").iterdir())
    written = [tmp_path / "cache" / "shard-00000.safetensors", tmp_path / "cache" /
               "manifest.json", *ckpt.iterdir(), tmp_path / "run" / "model" /
               "model.safetensors", tmp_path / "run" / "eval.json",
               tmp_path / "out" / "model.safetensors", tmp_path / "out" / "config.json"]
    modes = {str(p): oct(p.stat().st_mode & 0o777) for p in written}
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes
    for d in (ckpt, tmp_path / "run" / "model", tmp_path / "out"):
        assert d.stat().st_mode & 0o777 == 0o777 & ~mask, d


def test_topk_tail_that_does_not_complete_the_distribution_is_refused(topk_cache, tmp_path):
    d = str(tmp_path / "cache")
    shutil.copytree(topk_cache, d)

    def shrink(path):
        t = load_file(path)
        t["tail_logprob"][:] = np.log(0.9)  # with the top k, well over 1
        save_file(t, path)

    name = _rewrite(d, 0, shrink)
    one_line_error(invoke("inspect", d), name, "do not sum to 1")
