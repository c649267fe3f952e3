"""Data parallel with mx.distributed: 2 ring processes on this machine equal 1 process."""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
from conftest import ROOT, tiny_overrides

from mlxdistill import trainer
from mlxdistill.config import load_config


def test_two_ranks_match_one_process(tiny, tmp_path):
    common = {"train.iters": 4, "train.batch_size": 4, "train.save_every": 2,
              "train.grad_accum": 1}
    one = load_config(None, tiny_overrides(tiny, tmp_path / "one", **common))
    trainer.train(one, quiet=True, log=lambda m: None)

    launcher = shutil.which("mlx.launch")
    assert launcher, "mlx.launch ships with mlx; it must be on PATH"
    ov = tiny_overrides(tiny, tmp_path / "two", **common)
    p = subprocess.run([launcher, "-n", "2", "--backend", "ring", "--", sys.executable, "-m",
                        "mlxdistill.cli", "train", *ov], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "data parallel: 2 ranks, 2 rows each" in p.stdout
    assert p.stdout.count("evaluation on") == 1  # rank 0 alone evaluates and writes

    two_dir = str(tmp_path / "two" / "run")
    a = mx.load(os.path.join(one.run.dir, "model", "model.safetensors"))
    b = mx.load(os.path.join(two_dir, "model", "model.safetensors"))
    # The same global batch split in two: equal up to float32 summation order.
    for k in a:
        assert np.allclose(np.array(a[k]), np.array(b[k]), atol=2e-5), k
    la = [json.loads(x)["val_kl"] for x in open(os.path.join(one.run.dir, "metrics.jsonl"))]
    lb = [json.loads(x)["val_kl"] for x in open(os.path.join(two_dir, "metrics.jsonl"))]
    assert np.allclose(la, lb, atol=1e-4)
