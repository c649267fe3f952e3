"""Hidden-state distillation: teacher states in the cache, projected student states trained
towards them, and a student that still saves and loads as plain mlx_lm."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_overrides
from safetensors.numpy import load_file

from mlxdistill import api
from mlxdistill import cache as cache_mod
from mlxdistill import surgery
from mlxdistill.cli import main
from mlxdistill.config import ConfigError, load_config


def test_cached_states_are_the_teachers_block_outputs(tiny, tmp_path):
    from mlx_lm.utils import load

    cfg = load_config(None, tiny_overrides(tiny, tmp_path, **{"cache.hidden_layers": "[0,-1]"}))
    m = cache_mod.build(cfg, quiet=True, log=lambda s: None)
    assert m["hidden_resolved"] == [0, 1] and m["hidden_size"] == 48
    shard = load_file(os.path.join(cfg.cache.dir, m["shards"][0]["file"]))
    assert shard["hidden.1"].dtype == np.float16 and shard["hidden.1"].shape[-1] == 48
    teacher, _ = load(tiny["teacher"])
    teacher.set_dtype(mx.float32)
    store = surgery.capture_layers(teacher, [1])
    teacher(mx.array(shard["input_ids"][:2]))
    want = np.array(store[1].astype(mx.float16))
    assert np.allclose(want, shard["hidden.1"][:2], atol=1e-2)
    assert cache_mod.summary(cfg.cache.dir)["hidden_layers"] == [0, 1]


def test_hidden_training_lowers_hidden_loss_and_saves_clean(tiny, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny, tmp_path, **{
        "cache.hidden_layers": "[1]", "train.iters": 20, "train.lr": 1e-2,
        "train.report_every": 2, "train.mode": "lora", "train.lora_rank": 4}))
    res = api.train(cfg, quiet=True, log=lambda s: None)
    recs = [json.loads(x) for x in open(os.path.join(cfg.run.dir, "metrics.jsonl"))]
    hid = [r["hidden"] for r in recs if "hidden" in r]
    assert len(hid) >= 5 and hid[-1] < hid[0]
    assert os.path.isfile(os.path.join(cfg.run.dir, "hidden_projector.safetensors"))
    w = mx.load(os.path.join(cfg.run.dir, "adapters.safetensors"))
    assert w and not any("distill_proj" in k for k in w)
    assert np.isfinite(res["student_after"]["kl"])


def test_hidden_layer_out_of_range_fails_before_compute(tiny, tmp_path):
    ov = tiny_overrides(tiny, tmp_path, **{"cache.hidden_layers": "[7]"})
    res = CliRunner().invoke(main, ["cache", "-q", *ov])
    assert res.exit_code == 2 and "cache.hidden_layers: layer 7 is out of range" in res.stderr
    assert not os.path.exists(tmp_path / "cache" / "manifest.json")
    with pytest.raises(ConfigError, match="teacher.mode=cache"):
        load_config(None, ["cache.hidden_layers=[1]", "teacher.mode=online"])
    with pytest.raises(ConfigError, match="hidden_loss"):
        load_config(None, ["loss.hidden_loss=l1"])


def test_default_layer_map_spreads_evenly():
    assert surgery.default_layer_map([0, 5, 11], 12, 4) == [0, 1, 3]
    assert surgery.default_layer_map([5], 6, 4) == [3]
