"""train.report_to: wandb gets every metrics.jsonl record (checked in wandb's offline mode,
read back from the run's .wandb file, no network); a missing wandb fails before any work."""

import glob
import json
import os
import struct
import sys

import pytest
from click.testing import CliRunner
from conftest import tiny_overrides

from mlxdistill import tracking, trainer
from mlxdistill.cli import main
from mlxdistill.config import ConfigError, load_config

QUIET = dict(quiet=True, log=lambda m: None)


def wandb_records(path: str):
    """The protobuf records of an offline run's .wandb file: a 7-byte header (":W&B", magic,
    version), then LevelDB's log format (32 KiB blocks; 7-byte record headers of crc32,
    length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        buf = f.read()
    assert buf[:4] == b":W&B"
    pos, part = 7, b""
    while pos + 7 <= len(buf):
        if (room := 32768 - pos % 32768) < 7:
            pos += room  # a block's tail too short for a header is padding
            continue
        _, n, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        data, pos = buf[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0:
            continue
        part = data if kind in (1, 2) else part + data
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            yield rec


def test_report_to_wandb_logs_every_metrics_record(tiny, tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the dev extra installs it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    os.makedirs(tmp_path / "wb")
    cfg = load_config(None, tiny_overrides(tiny, tmp_path, **{
        "train.iters": 6, "train.report_every": 2, "train.eval_every": 3,
        "train.report_to": "wandb", "train.final_eval": False}))
    trainer.fit(cfg, **QUIET)

    with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert [r["step"] for r in metrics] == [2, 3, 4, 6]
    (path,) = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    logged, run, kinds = [], None, set()
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        kinds.add(kind)
        if kind == "run":
            run = rec.run
        elif kind == "history":
            logged.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                           for i in rec.history.item})
    assert "exit" in kinds  # the trainer finished the wandb run
    assert run.display_name == os.path.basename(cfg.run.dir)
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["train"]["report_to"] == "wandb" and config["train"]["iters"] == 6
    assert [h["_step"] for h in logged] == [r["step"] for r in metrics]
    for h, r in zip(logged, metrics):
        assert {k: h[k] for k in r if k != "step"} == {k: v for k, v in r.items()
                                                        if k != "step"}


def test_missing_wandb_is_a_one_line_error_before_any_work(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    args = ["train", *tiny_overrides(tiny, tmp_path, **{"train.report_to": "wandb"})]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert res.output.strip() == ('error: train.report_to=wandb needs the wandb package: '
                                  'pip install "mlxdistill[wandb]"')
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(tmp_path / "run")


def test_report_to_takes_known_trackers_only(tiny, tmp_path):
    with pytest.raises(ConfigError, match="train.report_to='tensorboard'.*none, wandb"):
        load_config(None, tiny_overrides(tiny, tmp_path, **{"train.report_to": "tensorboard"}))


def test_only_rank_0_tracks(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # a rank that tried would fail here
    cfg = load_config(None, tiny_overrides(tiny, tmp_path, **{"train.report_to": "wandb"}))
    assert isinstance(tracking.open_tracker(cfg, main=False), tracking.Null)
    with pytest.raises(ConfigError, match="mlxdistill\\[wandb\\]"):
        tracking.open_tracker(cfg, main=True)
