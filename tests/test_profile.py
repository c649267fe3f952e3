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


def test_devices_file_is_complete():
    devs = prof.load_devices()
    assert len(devs) >= 5
    for d in devs:
        assert d["app_memory_gb"] < d["ram_gb"] and d["bandwidth_gbs"] > 0


def test_profile_model_folder(tmp_path):
    model = make_model(str(tmp_path / "m"), dim=64, layers=1, seed=4)
    out = tmp_path / "prof"
    res = CliRunner().invoke(main, ["profile", model, "--bits", "32,16,4", "--prompt-tokens",
                                    "16", "--gen-tokens", "4", "--repeats", "2",
                                    "--group-size", "32", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert set(rep) >= {"hardware", "settings", "results", "projection"}
    assert rep["hardware"]["backend"] in ("cpu", "metal")
    r32, r16, r4 = rep["results"]
    for r in (r32, r16, r4):
        for key in ("ttft_s", "prefill_tok_s", "decode_tok_s"):
            assert r[key]["min"] <= r[key]["median"] <= r[key]["max"] and r[key]["median"] > 0
        assert r["peak_memory_bytes"] > 0
    assert r32["kl_to_reference"] == 0.0 and r32["top1_agreement"] == 1.0
    assert r4["weight_bytes"] < r16["weight_bytes"] < r32["weight_bytes"]
    assert r4["kl_to_reference"] > 0
    assert os.path.isfile(out / "profile.json") and os.path.isfile(out / "profile.png")
    assert len(rep["projection"]["per_model"]) == 3


@pytest.mark.parametrize("args,needle", [(["--bits", "3"], "--bits 3"),
                                         (["--bits", "x"], "comma-separated"),
                                         (["--gen-tokens", "1"], "--gen-tokens")])
def test_profile_bad_input(tmp_path, args, needle):
    model = make_model(str(tmp_path / "m"), dim=32, layers=1)
    res = CliRunner().invoke(main, ["profile", model, *args])
    assert res.exit_code == 2 and needle in res.stderr
    res = CliRunner().invoke(main, ["profile", str(tmp_path)])
    assert res.exit_code == 2 and "neither a model folder" in res.stderr
