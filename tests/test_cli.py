"""Bad input gets one line naming the problem and a non-zero exit, never a traceback."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import ROOT, make_model, tiny_overrides

from mlxdistill.cli import main


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(res, *needles):
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    for n in needles:
        assert n in err[0], err[0]


def test_missing_dataset(tiny, tmp_path):
    ov = tiny_overrides(tiny, tmp_path, **{"data.train": str(tmp_path / "nope.jsonl")})
    assert_one_line_error(invoke("train", "-q", *ov), "nope.jsonl", "not found")


def test_empty_dataset(tiny, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    ov = tiny_overrides(tiny, tmp_path, **{"data.train": str(empty)})
    assert_one_line_error(invoke("cache", "-q", *ov), "empty.jsonl", "empty")


def test_bad_jsonl_line(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the king"}\n{"text": oops}\n')
    ov = tiny_overrides(tiny, tmp_path, **{"data.train": str(bad)})
    assert_one_line_error(invoke("cache", "-q", *ov), "bad.jsonl:2")


def test_seq_len_above_context(tiny, tmp_path):
    ov = tiny_overrides(tiny, tmp_path, **{"data.seq_len": 4096})
    assert_one_line_error(invoke("train", "-q", *ov), "data.seq_len=4096", "512")
    assert not os.path.exists(tmp_path / "cache" / "manifest.json")


def test_mismatched_tokenizer(tiny, tmp_path):
    other = make_model(str(tmp_path / "other"), dim=16, layers=1,
                       words=[w[::-1] for w in "alpha beta gamma delta".split()])
    ov = tiny_overrides(tiny, tmp_path, **{"student.model": other})
    assert_one_line_error(invoke("train", "-q", *ov), "tokenizers differ")
    assert not os.path.exists(tmp_path / "cache" / "manifest.json")  # refused before compute


def test_missing_model_folder(tiny, tmp_path):
    ov = tiny_overrides(tiny, tmp_path, **{"teacher.model": str(tmp_path / "no_teacher")})
    assert_one_line_error(invoke("cache", "-q", *ov), "teacher model folder", "not found")


def test_unknown_key_on_command_line(tiny, tmp_path):
    assert_one_line_error(invoke("train", "train.iterz=3"), "unknown key train.iterz")


def test_eval_and_inspect_on_wrong_dirs(tmp_path):
    assert_one_line_error(invoke("eval", str(tmp_path)), "not a run directory")
    assert_one_line_error(invoke("inspect", str(tmp_path)), "not a teacher cache")


def test_cache_inspect_train_eval_end_to_end(tiny, tmp_path):
    ov = tiny_overrides(tiny, tmp_path, **{"cache.mode": "topk", "cache.k": 8})
    res = invoke("cache", "-q", *ov)
    assert res.exit_code == 0, res.output
    res = invoke("inspect", "--json", str(tmp_path / "cache"))
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["bytes_per_token"] == 36.0 and info["verified"] is True
    res = invoke("train", *ov)
    assert res.exit_code == 0, res.output
    assert "KL(teacher‖student)" in res.stdout
    res = invoke("eval", str(tmp_path / "run"), "--json", "--data", tiny["valid"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["data"] == tiny["valid"]


def test_real_process_exit_code(tiny, tmp_path):
    """The console entry point itself: exit 2 and one stderr line."""
    p = subprocess.run([sys.executable, "-m", "mlxdistill.cli", "train", "loss.name=kl"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "loss.name='kl'" in p.stderr


def test_diverging_loss_stops_with_one_line(tiny, tmp_path):
    ov = tiny_overrides(tiny, tmp_path, **{"train.lr": 1e30, "train.warmup": 0,
                                           "train.iters": 6, "train.save_every": 2})
    res = invoke("train", "-q", *ov)
    assert res.exit_code == 3, res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: loss "), err
    assert "at step" in err[0] and "lower train.lr" in err[0]
    assert "Traceback" not in res.output
    assert not os.path.exists(tmp_path / "run" / "model")  # nothing final written


def _output_case(name, tiny, tmp_path):
    """(command line, the path it must name, what the message says of it), the output path
    being a file where a folder belongs or a folder where a file belongs."""
    from mlxdistill.config import load_config, save_config

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    a_dir = tmp_path / "a-folder"
    a_dir.mkdir()
    if name == "train":
        return ["train", "-q", *tiny_overrides(tiny, tmp_path, **{"run.dir": a_file})], \
            a_file, "is a file"
    if name == "train-parent":
        return ["train", "-q", *tiny_overrides(tiny, tmp_path, **{"run.dir": a_file / "r"})], \
            a_file / "r", "is a file"
    if name == "cache":
        return ["cache", "-q", *tiny_overrides(tiny, tmp_path, **{"cache.dir": a_file})], \
            a_file, "is a file"
    if name == "generate":
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text('{"prompt": "the king"}\n')
        ov = tiny_overrides(tiny, tmp_path, **{"generate.prompts": prompts,
                                               "generate.out": a_dir, "generate.max_tokens": 4})
        return ["generate", "-q", *ov], a_dir, "is a folder"
    if name == "export":
        return ["export", str(tmp_path), "-o", str(a_file), "--force"], a_file, "is a file"
    if name == "profile":
        return ["profile", tiny["student"], "--bits", "16", "--repeats", "1", "-o",
                str(a_file)], a_file, "is a file"
    run = tmp_path / "run"  # eval: a run whose eval.json is a folder
    run.mkdir()
    save_config(load_config(None, tiny_overrides(tiny, tmp_path)), str(run / "config.yaml"))
    (run / "eval.json").mkdir()
    return ["eval", str(run)], run / "eval.json", "is a folder"


@pytest.mark.parametrize("name", ["train", "train-parent", "cache", "generate", "export",
                                  "profile", "eval"])
def test_output_path_of_the_wrong_kind(tiny, tmp_path, name):
    """Every command's output path, a file where a folder goes (or the reverse): one line
    naming it, exit 2, before any work."""
    args, path, says = _output_case(name, tiny, tmp_path)
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    assert_one_line_error(res, str(path), says)


# ---------------------------------------------------------------- mlxdistill data

def test_data_shows_the_packed_rows_as_the_cache_holds_them(tiny, tmp_path):
    """--json rows are the cache's input_ids and loss_mask; the text marks the untrained
    prompt in [[ ]]."""
    from conftest import prompt_completion

    pc = prompt_completion(tiny["train"], str(tmp_path / "pc.jsonl"), 3, 4)
    ov = tiny_overrides(tiny, tmp_path, **{"data.train": pc})
    res = invoke("data", *ov, "--rows", "3", "--json")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2] and set(rows[0]) == {"row", "ids", "mask"}
    assert invoke("cache", "-q", *ov).exit_code == 0
    from mlxdistill.cache import ShardReader

    shard = ShardReader(str(tmp_path / "cache")).load_shard(0)
    assert [r["ids"] for r in rows] == shard["input_ids"][:3].tolist()
    assert [r["mask"] for r in rows] == shard["loss_mask"][:3].tolist()
    res = invoke("data", *ov)
    assert res.exit_code == 0, res.output
    first = json.loads(open(pc).readline())
    assert f"-- row 0 ({32} tokens" in res.stdout and "-- row 2" not in res.stdout
    assert f"[[{first['prompt']}]]{first['completion']}" in res.stdout
    assert "teacher's tokenizer" in res.stdout
    res = invoke("data", *ov, "--split", "test", "--json", "--rows", "1")
    from pathlib import Path

    from mlx_lm.utils import load_tokenizer

    from mlxdistill.data import pack

    want = pack(tiny["test"], load_tokenizer(Path(tiny["teacher"])), 32).input_ids[0]
    assert json.loads(res.stdout)["ids"] == want.tolist()


def test_data_bad_input_is_one_line(tiny, tmp_path):
    ov = tiny_overrides(tiny, tmp_path, **{"data.valid": None})
    assert_one_line_error(invoke("data", *ov, "--split", "valid"), "data.valid is null")
    ov = tiny_overrides(tiny, tmp_path, **{"data.train": str(tmp_path)})
    assert_one_line_error(invoke("data", *ov), f"set data.dir={tmp_path}")
    arr = tmp_path / "arr.jsonl"
    arr.write_text(json.dumps([{"text": "the king"}, {"text": "the queen"}]) + "\n")
    ov = tiny_overrides(tiny, tmp_path, **{"data.train": str(arr)})
    assert_one_line_error(invoke("data", *ov), "arr.jsonl:1", "one JSON object per line")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "the king"},
                                             {"role": "assistant", "content": "sleep"}]}))
    ov = tiny_overrides(tiny, tmp_path, **{"data.train": str(chat)})
    assert_one_line_error(invoke("data", *ov), "chat.jsonl: record 1", "data.chat_template")
