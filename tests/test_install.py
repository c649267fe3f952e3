"""The package as a user installs it: a wheel (not the editable checkout) runs the embedded
default from an empty folder, `python -m mlxdistill` works, and the shipped recipes can be
listed and copied. Also the `cuda` extra and the backend's compute dtype, tested on the CPU."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import mlx.core as mx
import pytest
import yaml
from conftest import ROOT

from mlxdistill import models
from mlxdistill.config import EMBEDDED_DIR

EMBEDDED_REL = os.path.relpath(EMBEDDED_DIR, ROOT)  # mlxdistill/embedded


def _can_build_wheels() -> bool:
    """setuptools builds wheels by itself from 70.1 on; older ones need the `wheel`
    package (in the dev extra). Without either, building offline is impossible."""
    import importlib.util

    import setuptools

    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _run(args, cwd, timeout=180):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the repo
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(wheel, venv) : the wheel built from the working tree, installed into a fresh venv
    that sees the already-installed dependencies (no network: --no-deps --no-index)."""
    if not _can_build_wheels():
        pytest.skip("cannot build a wheel offline: setuptools < 70.1 and no `wheel` package "
                    "(pip install -e '.[dev]' installs it)")
    base = tmp_path_factory.mktemp("install")
    # Built from a copy: building in place would write build/ and an egg-info into the
    # checkout, which the editable install and concurrent runs share.
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "mlxdistill"), src / "mlxdistill",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp*"))
    out = base / "wheels"
    res = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "--no-index", "-q", "-w", str(out), str(src)], cwd=base)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = out.glob("mlxdistill-*.whl")
    venv = base / "venv"
    # --without-pip: the system's pip (visible through --system-site-packages) installs into
    # the venv, and creating the venv takes no time.
    res = _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                str(venv)], cwd=base)
    assert res.returncode == 0, res.stderr
    # --ignore-installed: the editable mlxdistill in the system site-packages must neither
    # satisfy the requirement nor be uninstalled.
    res = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                "--no-index", "--ignore-installed", str(wheel)], cwd=base)
    assert res.returncode == 0, res.stdout + res.stderr
    return wheel, venv


def test_wheel_holds_the_embedded_files(wheel_venv):
    """Every embedded config, weight and data file is in the wheel as a regular file of
    the same size (a link, or a tree missed by package-data, would fail here)."""
    wheel, _ = wheel_venv
    with zipfile.ZipFile(wheel) as z:
        entries = {i.filename: i for i in z.infolist()}
    wanted = []
    for root, _, names in os.walk(EMBEDDED_DIR):
        wanted += [os.path.join(root, n) for n in names if "__pycache__" not in root]
    assert len(wanted) > 40
    for path in wanted:
        name = os.path.relpath(path, ROOT).replace(os.sep, "/")
        assert name in entries, name
        info = entries[name]
        assert (info.external_attr >> 16) & 0o170000 != 0o120000, f"{name} is a link"
        assert info.file_size == os.path.getsize(path), name


def test_wheel_trains_the_embedded_default_in_an_empty_folder(wheel_venv, tmp_path):
    """`mlxdistill train` with no config in an empty folder: the wheel's own config, weights
    and data; the cache and the run dir land in that folder."""
    _, venv = wheel_venv
    where = _run([str(venv / "bin" / "python"), "-c",
                  "import mlxdistill; print(mlxdistill.__file__)"], cwd=tmp_path)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    # A two-record held-out file keeps the final evaluation to a moment.
    with open(tmp_path / "test.jsonl", "w") as f:
        for t in ("HAMLET. To be, or not to be, that is the question.",
                  "OPHELIA. Good my lord, how does your honour for this many a day?"):
            f.write(json.dumps({"text": t}) + "\n")
    tiny = ["data.seq_len=64", "data.max_rows=4", "train.batch_size=4", "train.iters=2",
            "train.eval_rows=2", "cache.shard_rows=4", "train.save_every=2",
            "train.eval_every=2", "data.test=test.jsonl"]
    res = _run([str(venv / "bin" / "mlxdistill"), "train", "-q", *tiny], cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    with open(tmp_path / "caches" / "default" / "manifest.json") as f:
        manifest = json.load(f)
    installed = os.path.join(str(venv), "lib")
    assert manifest["teacher"].startswith(installed) and manifest["dataset"].startswith(installed)
    assert (tmp_path / "runs" / "default" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "default" / "eval.json").is_file()


def test_wheel_python_m_recipes_and_init(wheel_venv, tmp_path):
    _, venv = wheel_venv
    res = _run([str(venv / "bin" / "python"), "-m", "mlxdistill", "--help"], cwd=tmp_path)
    assert res.returncode == 0 and "Usage: mlxdistill" in res.stdout, res.stdout + res.stderr
    assert "recipes" in res.stdout and "init" in res.stdout
    res = _run([str(venv / "bin" / "mlxdistill"), "recipes"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert {line.split()[0] for line in res.stdout.splitlines() if line.strip()} >= {
        "default", "lora", "specialist", "qwen2.5-7b-to-0.5b"}
    res = _run([str(venv / "bin" / "mlxdistill"), "init", "lora"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with open(tmp_path / "lora.yaml") as f:
        copy = yaml.safe_load(f)
    for value in (copy["teacher"]["model"], copy["student"]["model"], copy["data"]["train"]):
        assert value.startswith(str(venv)) and os.path.exists(value), value
    assert copy["run"]["dir"] == "runs/lora"  # outputs stay where the user runs it


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="Python 3.10 without tomli: no TOML "
                                      "parser to read pyproject.toml")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_cuda_extra_is_declared():
    """`pip install "mlxdistill[cuda]"` asks for MLX's CUDA backend, on Linux only (a Mac
    has Metal)."""
    extras = _pyproject()["project"]["optional-dependencies"]
    (req,) = extras["cuda"]
    name, _, marker = req.partition(";")
    assert name.replace(" ", "").startswith("mlx[cuda]>=")
    assert "sys_platform == 'linux'" in marker


@pytest.fixture
def backend(monkeypatch):
    """Pretend MLX reports a GPU backend: backend('metal'), backend('cuda') or backend(None)."""

    def set_to(name):
        monkeypatch.setattr(mx.metal, "is_available", lambda: name == "metal")
        monkeypatch.setattr(mx.cuda, "is_available", lambda: name == "cuda")

    return set_to


@pytest.mark.parametrize("gpu", [None, "metal", "cuda"])
def test_compute_dtype_is_float32_on_the_cpu_only(backend, gpu):
    """The CPU has no fast bf16/fp16 matmul, so models are widened to float32 there; on a
    GPU, Metal or CUDA, the model's own dtype (float16 for the embedded student) is kept."""
    backend(gpu)
    assert models.gpu_backend() == gpu
    assert models.compute_dtype() == (mx.float32 if gpu is None else None)
    model, _, _ = models.load(os.path.join(ROOT, "weights", "student"), "student")
    assert model.model.embed_tokens.weight.dtype == (mx.float32 if gpu is None else mx.float16)


def test_compute_dtype_without_a_cuda_module(backend, monkeypatch):
    """MLX before 0.27 has no mx.cuda: the CPU."""
    backend(None)
    monkeypatch.delattr(mx, "cuda")
    assert models.gpu_backend() is None and models.compute_dtype() == mx.float32
