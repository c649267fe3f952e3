"""`mlxdistill plan`: the memory estimate made from config.json alone agrees with the peak MLX
memory measured around a real training step and teacher batch, on the embedded pair and on
every family of the matrix; cache size and the fits / does-not-fit advice."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_overrides
from test_families import CASES, family_pair

from mlxdistill import cache, plan
from mlxdistill.cli import main
from mlxdistill.config import load_config

TOLERANCE = 0.25


def assert_close(est: int, measured: int, what: str) -> None:
    assert abs(est / measured - 1) <= TOLERANCE, \
        f"{what}: estimated {est:,} B, measured {measured:,} B ({est / measured:.2f}x)"


def test_embedded_pair_full_estimate_matches_measured_peak():
    cfg = load_config(None, ["data.seq_len=128"])
    p = plan.plan(cfg, probe=True)
    for name in ("training", "teacher_pass"):
        est = p[name]
        assert_close(est["mlx_bytes"], est["measured_peak_bytes"], f"embedded {name}")
        assert est["fits"] and est["seconds"] > 0
    # The float32 logits and their gradient are the largest part for a 4096-token vocab.
    parts = p["training"]["parts"]
    assert parts["logits"] == max(parts.values())


def test_embedded_pair_lora_estimate_matches_measured_peak():
    cfg = load_config(None, ["data.seq_len=128", "train.mode=lora"])
    s = plan.model_shape(plan.read_config(cfg.student.model, "student"), "student")
    est = plan.training_total(cfg, s, plan.cache_bytes_per_token(cfg, s.vocab, 0))
    assert_close(est["mlx_bytes"], plan.probe_training(cfg)["peak_bytes"], "embedded lora")


@pytest.mark.parametrize("case,family,tkw,skw,mode", CASES, ids=[c[0] for c in CASES])
def test_family_estimates_match_measured_peak(case, family, tkw, skw, mode, tmp_path):
    teacher, student = family_pair(tmp_path, family, tkw, skw)
    cfg = load_config(None, [f"teacher.model={teacher}", f"student.model={student}",
                             f"train.mode={mode}", "train.batch_size=4", "data.seq_len=32",
                             "train.lora_rank=4", "cache.batch_size=4", "train.eval_rows=4"])
    ss = plan.model_shape(plan.read_config(student, "student"), "student")
    ts = plan.model_shape(plan.read_config(teacher, "teacher"), "teacher")
    assert (ts.bits, ss.bits) == (tkw.get("bits"), skw.get("bits"))
    bpt = plan.cache_bytes_per_token(cfg, min(ts.vocab, ss.vocab), ts.hidden)
    assert_close(plan.training_total(cfg, ss, bpt)["mlx_bytes"],
                 plan.probe_training(cfg)["peak_bytes"], f"{case} training")
    assert_close(plan.teacher_total(cfg, ts, bpt, None)["mlx_bytes"],
                 plan.probe_teacher(cfg)["peak_bytes"], f"{case} teacher pass")


def test_parameter_count_and_quantized_size_from_config_alone(tmp_path):
    """Exact parameters of a real-size config without allocating its weights, and the 4-bit
    size mlx_lm's packing gives (4 bits + a float16 scale and bias per 64 weights)."""
    import mlx.core as mx

    qwen7b = dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28,
                  intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                  rms_norm_eps=1e-6, vocab_size=152064, tie_word_embeddings=False,
                  rope_theta=1e6, torch_dtype="bfloat16")
    before = mx.get_active_memory()
    s = plan.model_shape(qwen7b, "teacher")
    assert mx.get_active_memory() - before < 1 << 20  # nothing materialized
    assert s.params == 7_615_616_512  # Qwen2.5-7B's published count
    q = plan.model_shape(qwen7b, "teacher", quantize=(4, 64))
    fb = plan.dtype_bytes(qwen7b)
    linear = s.params - 28 * 2 * 3584 - 3584 - 28 * (3584 + 2 * 512)  # norms and biases
    assert q.weight_bytes == linear // 2 + 2 * (linear // 64) * fb + (s.params - linear) * fb


def test_cache_size_matches_written_shards(tiny, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny, tmp_path))
    m = cache.build(cfg, quiet=True, log=lambda m: None)
    p = plan.plan(cfg)
    assert p["cache"]["rows"] == m["rows"] and p["cache"]["rows_from"] == "tokenized"
    shard = cache.ShardReader(cfg.cache.dir).load_shard(0)
    per_token = sum(v.nbytes for k, v in shard.items() if k != "next_ids") / \
        shard["input_ids"].size
    assert p["cache"]["bytes_per_token"] == per_token
    on_disk = sum(os.path.getsize(os.path.join(cfg.cache.dir, s["file"])) for s in m["shards"])
    assert p["cache"]["disk_bytes"] <= on_disk < 1.2 * p["cache"]["disk_bytes"] + 4096


def test_plan_cli_fits_and_knobs(tiny, tmp_path):
    ov = tiny_overrides(tiny, tmp_path, **{"data.seq_len": 64, "train.batch_size": 8})
    res = CliRunner().invoke(main, ["plan", *ov, "--json"])
    assert res.exit_code == 0, res.output
    p = json.loads(res.output)
    assert p["training"]["fits"] and p["teacher_pass"]["fits"]
    need = p["training"]["peak_bytes"]
    # A machine with 80 % of the training peak: told it does not fit, and what would.
    gb = 0.8 * need / (1 << 30)
    res = CliRunner().invoke(main, ["plan", *ov, "--memory-gb", f"{gb:.6f}"])
    assert res.exit_code == 0, res.output
    assert "training:" in res.output and "does NOT fit" in res.output
    lines = res.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("training:"))
    knobs = [line for line in lines[start + 1:] if "to fit:" in line]
    assert any("train.grad_accum=" in k for k in knobs), res.output
    # ... and each advertised setting really brings the estimate under the budget.
    budget = int(float(f"{gb:.6f}") * (1 << 30))
    for k in knobs:
        setting = k.split("to fit:")[1].split()[0]
        if "=" in setting:
            cfg = load_config(None, ov + [setting])
            s = plan.model_shape(plan.read_config(cfg.student.model, "s"), "s")
            bpt = plan.cache_bytes_per_token(cfg, s.vocab, 48)
            assert plan.training_total(cfg, s, bpt)["peak_bytes"] <= budget, setting

