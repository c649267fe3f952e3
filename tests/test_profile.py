"""`mlxdistill profile`: report schema, projection maths, per-precision fidelity."""

import json
import os

import pytest
from click.testing import CliRunner
from conftest import make_model

from mlxdistill import profile as prof
from mlxdistill.cli import main


def test_projection_math():
    rec = {"peak_memory_bytes": 2 * 2**30, "decode_tok_s": {"median": 10.0}}
    devices = [{"name": "small", "app_memory_gb": 1.5, "bandwidth_gbs": 50.0},
               {"name": "big", "app_memory_gb": 8.0, "bandwidth_gbs": 200.0,
                "bandwidth_is_estimate": True}]
    small, big = prof.project(rec, devices, local_bw_gbs=100.0)
    assert not small["fits"] and small["headroom_gb"] == -0.5
    assert big["fits"] and big["headroom_gb"] == 6.0
    assert small["est_decode_tok_s"] == 5.0 and big["est_decode_tok_s"] == 20.0
    assert big["bandwidth_is_estimate"] and not small["bandwidth_is_estimate"]
    # a CPU measurement does not scale to a phone's GPU: fit only, no speed estimate
    for d in prof.project(rec, devices, local_bw_gbs=100.0, speed=False):
        assert d["est_decode_tok_s"] is None and d["needs_gb"] == 2.0


def test_devices_file_is_complete():
    devs = prof.load_devices()
    assert len(devs) >= 5
    for d in devs:
        assert d["app_memory_gb"] < d["ram_gb"] and d["bandwidth_gbs"] > 0


STAT_KEYS = ("ttft_s", "prefill_tok_s", "decode_tok_s")
RESULT_KEYS = {"model", "role", "bits", "load_s", "disk_bytes", "weight_bytes",
               "peak_memory_bytes", *STAT_KEYS, "kl_to_reference", "top1_agreement"}


def test_profile_model_folder(tmp_path):
    # wide enough (256) that the weights, not the runtime, dominate the peak memory
    model = make_model(str(tmp_path / "m"), dim=256, layers=2, seed=4)
    out = tmp_path / "prof"
    res = CliRunner().invoke(main, ["profile", model, "--bits", "32,16,4", "--prompt-tokens",
                                    "16", "--gen-tokens", "4", "--repeats", "2",
                                    "--group-size", "32", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep == {**json.load(open(out / "profile.json")), "written": str(out)}
    assert set(rep) == {"hardware", "settings", "results", "projection", "written"}
    assert rep["hardware"]["backend"] in ("cpu", "metal")
    assert rep["hardware"]["measured_bandwidth_gbs"] > 0
    assert rep["settings"] == {"prompt_tokens": 16, "gen_tokens": 4, "repeats": 2,
                               "group_size": 32,
                               "fidelity_rows": "random token ids (2 x 64, fixed seed)"}
    r32, r16, r4 = rep["results"]
    for r in (r32, r16, r4):
        assert set(r) == RESULT_KEYS and r["role"] == "model"
        for key in STAT_KEYS:
            assert set(r[key]) == {"median", "min", "max"}
            assert r[key]["min"] <= r[key]["median"] <= r[key]["max"] and r[key]["median"] > 0
        assert r["load_s"] > 0 and r["peak_memory_bytes"] >= r["weight_bytes"]
    assert r32["kl_to_reference"] == 0.0 and r32["top1_agreement"] == 1.0
    assert r4["kl_to_reference"] > 0
    # each precision is measured as stored: smaller files, smaller weights, smaller peak
    for key in ("disk_bytes", "weight_bytes", "peak_memory_bytes"):
        assert r4[key] < r16[key] < r32[key], key
    assert r32["disk_bytes"] > 4 * 2 * (4 * 256 * 256) and r4["disk_bytes"] < r32["disk_bytes"] / 4
    assert os.path.isfile(out / "profile.png") and os.path.isfile(out / "profile.md")
    per = rep["projection"]["per_model"]
    assert [(p["bits"]) for p in per] == [32, 16, 4]
    for p, r in zip(per, rep["results"]):
        d = p["devices"][0]
        assert d["needs_gb"] == round(r["peak_memory_bytes"] / 2**30, 4)
        assert (d["est_decode_tok_s"] is None) == (rep["hardware"]["backend"] == "cpu")
    md = (out / "profile.md").read_text()
    assert "cpu backend" in md or "metal backend" in md
    assert md.count("| model | bits |") == 1 and md.count("| model | 4 |") == 1


@pytest.mark.parametrize("args,needle", [(["--bits", "3"], "--bits 3"),
                                         (["--bits", "x"], "comma-separated"),
                                         (["--gen-tokens", "1"], "--gen-tokens"),
                                         (["--group-size", "16"], "--group-size 16")])
def test_profile_bad_input(tmp_path, args, needle):
    model = make_model(str(tmp_path / "m"), dim=32, layers=1)
    res = CliRunner().invoke(main, ["profile", model, *args])
    assert res.exit_code == 2 and needle in res.stderr
    res = CliRunner().invoke(main, ["profile", str(tmp_path)])
    assert res.exit_code == 2 and "neither a model folder" in res.stderr


def test_profile_bad_folders(tmp_path):
    model = make_model(str(tmp_path / "m"), dim=32, layers=1)
    os.remove(os.path.join(model, "config.json"))  # weights without config.json
    res = CliRunner().invoke(main, ["profile", model])
    assert res.exit_code == 2 and "config.json" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    model = make_model(str(tmp_path / "n"), dim=32, layers=1)
    os.remove(os.path.join(model, "model.safetensors"))  # config.json without weights
    res = CliRunner().invoke(main, ["profile", model])
    assert res.exit_code == 2 and "no *.safetensors" in res.stderr
    model = make_model(str(tmp_path / "o"), dim=32, layers=1)
    (tmp_path / "file").write_text("x")
    res = CliRunner().invoke(main, ["profile", model, "--bits", "32", "--prompt-tokens", "4",
                                    "--gen-tokens", "2", "--repeats", "1", "-o",
                                    str(tmp_path / "file" / "out")])
    assert res.exit_code == 2 and "cannot write the profile" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_profile_run_puts_teacher_and_student_side_by_side(tiny, tmp_path):
    from conftest import tiny_overrides

    from mlxdistill import api
    from mlxdistill.config import load_config

    cfg = load_config(None, tiny_overrides(tiny, tmp_path, **{"train.iters": 2}))
    api.train(cfg, quiet=True, log=lambda m: None)
    res = CliRunner().invoke(main, ["profile", cfg.run.dir, "--bits", "32,4", "--group-size",
                                    "32", "--prompt-tokens", "8", "--gen-tokens", "2",
                                    "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert [(r["role"], r["bits"]) for r in rep["results"]] == [
        ("teacher", 32), ("teacher", 4), ("student", 32), ("student", 4)]
    assert rep["settings"]["fidelity_rows"].startswith(tiny["test"])  # held-out text
    assert os.path.isfile(os.path.join(cfg.run.dir, "profile", "profile.json"))
