"""Export: fused, quantized, MLX-Swift-shaped folders that reload with the same behaviour."""

import json
import os

import pytest
from click.testing import CliRunner
from conftest import make_model, tiny_overrides

from mlxdistill import trainer
from mlxdistill.cli import main
from mlxdistill.config import load_config


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    # width 64 so that 4/8-bit quantization (group size 32) applies to every linear layer
    student = make_model(str(d / "student64"), dim=64, layers=1, seed=3)
    cfg = load_config(None, tiny_overrides(tiny, d, **{
        "student.model": student, "train.mode": "lora", "train.iters": 6, "train.lr": 1e-2,
        "train.lora_rank": 4}))
    trainer.train(cfg, quiet=True, log=lambda m: None)
    return cfg.run.dir, d


@pytest.mark.parametrize("bits", ["16", "8", "4"])
def test_export_round_trip_and_file_set(lora_run, bits):
    run_dir, d = lora_run
    out = str(d / f"out{bits}")
    res = CliRunner().invoke(main, ["export", run_dir, "-o", out, "--bits", bits,
                                    "--group-size", "32"])
    assert res.exit_code == 0, res.output
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md", "export.json"} <= files
    assert not any(f.endswith(".tmp") for f in files)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "llama"
    report = json.load(open(os.path.join(out, "export.json")))
    rt = report["round_trip"]
    assert report["fused_layers"] > 0
    if bits == "16":
        assert "quantization" not in cfg
        assert rt["top1_agreement"] == 1.0 and rt["max_abs_logit_diff"] < 0.05
    else:
        assert cfg["quantization"]["bits"] == int(bits)
        assert cfg["quantization"]["group_size"] == 32
        assert rt["top1_agreement"] > 0.5  # reported; quantization may flip near-ties
    import mlx.core as mx

    weights = mx.load(os.path.join(out, "model.safetensors"))
    assert not any("lora" in k for k in weights)  # adapters fused away
    # MLX Swift fails on extra or missing keys: exactly the parameters of the model that
    # config.json describes (quantized where it says so), and float16 where not packed
    from pathlib import Path

    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(out))
    assert set(weights) == {k for k, _ in tree_flatten(model.parameters())}
    assert {str(v.dtype) for v in weights.values()} <= {"mlx.core.float16", "mlx.core.uint32"}
    assert cfg["torch_dtype"] == "float16"
    assert any(k.endswith(".scales") for k in weights) == (bits != "16")


def test_export_refuses_nonempty_out_and_bad_run(lora_run, tmp_path):
    run_dir, d = lora_run
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x").write_text("keep me")
    res = CliRunner().invoke(main, ["export", run_dir, "-o", str(out)])
    assert res.exit_code == 2 and "--force" in res.stderr
    assert (out / "x").read_text() == "keep me"
    res = CliRunner().invoke(main, ["export", str(tmp_path), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not a run directory" in res.stderr
    res = CliRunner().invoke(main, ["export", run_dir, "-o", str(tmp_path / "o"), "--bits", "3"])
    assert res.exit_code != 0


def test_distillation_aware_quantization_lowers_kl(lora_run):
    run_dir, d = lora_run
    res = CliRunner().invoke(main, ["export", run_dir, "-o", str(d / "tuned"), "--bits", "4",
                                    "--group-size", "32", "--tune-iters", "30",
                                    "--tune-lr", "1e-3"])
    assert res.exit_code == 0, res.output
    tuning = json.load(open(d / "tuned" / "export.json"))["tuning"]
    assert tuning["kl_to_teacher_after"] < tuning["kl_to_teacher_before"], tuning
    assert tuning["loss_last"] < tuning["loss_first"]


def test_gguf_float16_llama(lora_run):
    import mlx.core as mx

    run_dir, d = lora_run
    out = d / "gguf"
    res = CliRunner().invoke(main, ["export", run_dir, "-o", str(out), "--gguf"])
    assert res.exit_code == 0, res.output
    rep = json.load(open(out / "export.json"))["gguf"]
    path = out / rep["file"]
    assert path.is_file() and rep["architecture"] == "llama" and rep["embedding_identical"]
    tensors, meta = mx.load(str(path), return_metadata=True)
    st = mx.load(str(out / "model.safetensors"))
    assert len(tensors) == len(st) == rep["tensors"]  # every weight, under its GGUF name
    assert str(meta["general.architecture"]) == "llama"
    assert int(meta["llama.block_count"].item()) == 1
    assert all(v.dtype in (mx.float16, mx.float32) for v in tensors.values())
    assert rep["file"] in json.load(open(out / "export.json"))["files"] or path.is_file()


def test_gguf_refuses_what_mlx_lm_cannot_write(lora_run, tmp_path):
    from mlxdistill.config import ConfigError
    from mlxdistill.export import check_gguf

    run_dir, _ = lora_run
    res = CliRunner().invoke(main, ["export", run_dir, "-o", str(tmp_path / "q"), "--bits", "4",
                                    "--gguf"])
    assert res.exit_code == 2 and "float16 only" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "q").exists()
    with pytest.raises(ConfigError, match="model_type 'qwen2'"):
        check_gguf({"model_type": "qwen2"}, 16)
    check_gguf({"model_type": "mistral"}, 16)  # accepted


def _one_line_error(args, needle):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_export_bad_input_one_line_errors(lora_run, tmp_path):
    import shutil

    import yaml

    run_dir, d = lora_run
    _one_line_error(["export", run_dir, "-o", str(tmp_path / "a"), "--bits", "3"], "--bits 3")
    _one_line_error(["export", run_dir, "-o", str(tmp_path / "a"), "--target-quality", "1.5"],
                    "--target-quality")
    _one_line_error(["export", run_dir, "-o", str(tmp_path / "a"), "--bits", "4",
                     "--group-size", "16"], "--group-size 16")
    # a run directory whose training never wrote weights
    empty = tmp_path / "unfinished"
    empty.mkdir()
    shutil.copy(os.path.join(run_dir, "config.yaml"), empty)
    _one_line_error(["export", str(empty), "-o", str(tmp_path / "b")], "neither model/ nor")
    # OUT that cannot be written: under a file, and in a folder the OS refuses
    (tmp_path / "file").write_text("x")
    _one_line_error(["export", run_dir, "-o", str(tmp_path / "file" / "out")],
                    "not an existing folder")
    res = CliRunner().invoke(main, ["export", run_dir, "-o", "/proc/mlxdistill-export"])
    assert res.exit_code == 2 and ("not writable" in res.stderr or "cannot write" in res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1
    # a run whose student model folder has no config.json
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    student = tmp_path / "student-no-config"
    shutil.copytree(yaml.safe_load(open(broken / "config.yaml"))["student"]["model"], student)
    os.remove(student / "config.json")
    cfg = yaml.safe_load(open(broken / "config.yaml"))
    cfg["student"]["model"] = str(student)
    yaml.safe_dump(cfg, open(broken / "config.yaml", "w"))
    _one_line_error(["export", str(broken), "-o", str(tmp_path / "c")], "no config.json")


def test_export_writes_fallback_threshold(lora_run):
    run_dir, d = lora_run
    reports = {}
    for target in ("0.5", "1.0"):
        out = d / f"fb{target}"
        res = CliRunner().invoke(main, ["export", run_dir, "-o", str(out),
                                        "--target-quality", target])
        assert res.exit_code == 0, res.output
        reports[target] = json.load(open(out / "export.json"))["fallback"]
        card = (out / "README.md").read_text()
        assert "## Cloud fallback" in card and reports[target]["rule"] in card
    lo, hi = reports["0.5"], reports["1.0"]
    for fb in (lo, hi):
        assert fb["signal"] == "confidence" and fb["examples"] == 10
        assert fb["expected_quality"] >= fb["target"] - 1e-6
        assert fb["target"] == pytest.approx(fb["target_fraction_of_teacher"]
                                             * fb["teacher_quality"], abs=1e-6)
    assert hi["deferred_fraction"] >= lo["deferred_fraction"]
