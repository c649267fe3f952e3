import os

import pytest

from mlxdistill.config import ConfigError, load_config, parse_overrides


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_default_config_loads_and_is_frozen():
    cfg = load_config()
    assert cfg.cache.mode == "sample" and cfg.cache.n == 16
    assert cfg.loss.name == "forward_kl"
    with pytest.raises(Exception):
        cfg.train.iters = 5  # frozen


def test_overrides_apply_with_types():
    cfg = load_config(None, ["train.iters=7", "train.lr=2e-3", "cache.mode=topk",
                             "data.max_rows=null"])
    assert cfg.train.iters == 7 and cfg.train.lr == pytest.approx(2e-3)
    assert isinstance(cfg.train.lr, float)
    assert cfg.cache.mode == "topk" and cfg.data.max_rows is None


@pytest.mark.parametrize("text,needle", [
    ("train: {iterz: 3}\n", "unknown key train.iterz"),
    ("trainer: {iters: 3}\n", "unknown section 'trainer'"),
    ("train: {mode: qlora}\n", "train.mode='qlora' is not valid"),
    ("cache: {n: 0}\n", "cache.n=0"),
    ("cache: {n: 300}\n", "cache.n=300"),
    ("loss: {name: forward_kll}\n", "loss.name='forward_kll' is not valid"),
    ("loss: {alpha: 1.5}\n", "loss.alpha=1.5"),
    ("train: {batch_size: 6, grad_accum: 4}\n", "divisible"),
    ("train: {lr: fast}\n", "train.lr='fast' must be a number"),
    ("data: {seq_len: 1}\n", "data.seq_len=1"),
    ("train: [1, 2\n", "not valid YAML"),
])
def test_bad_config_names_key_and_value(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_unknown_key_lists_valid_keys(tmp_path):
    # no key is spelt like it, so the valid ones are listed instead of a guess
    with pytest.raises(ConfigError, match="valid keys: .*iters"):
        load_config(write(tmp_path, "train: {speed: 3}\n"))


@pytest.mark.parametrize("text,guess", [
    ("train: {iter: 3}\n", "did you mean train.iters?"),
    ("train: {lora_rnk: 3}\n", "did you mean train.lora_rank"),
    ("train: {seed: 3}\n", "did you mean cache.seed, run.seed or generate.seed?"),
    ("trian: {iters: 3}\n", "unknown section 'trian'; did you mean 'train'?"),
])
def test_misspelt_yaml_key_gets_a_guess(tmp_path, text, guess):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and guess in msg and "valid keys" not in msg, msg


@pytest.mark.parametrize("item,needles", [
    ("train.iter=10", ["unknown key train.iter", "did you mean train.iters?"]),
    ("trian.iters=10", ["unknown section 'trian'", "did you mean train.iters?"]),
])
def test_misspelt_override_names_the_command_line(tmp_path, item, needles):
    path = write(tmp_path, "train: {iters: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.lr=1e-3", item])
    msg = str(e.value)
    assert msg.startswith(f"{item} on the command line: "), msg
    assert path not in msg and all(n in msg for n in needles), msg


def test_bad_override_value_names_the_command_line(tmp_path):
    path = write(tmp_path, "train: {iters: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.iters=abc"])
    assert str(e.value) == ("train.iters='abc' must be an integer "
                            "(train.iters=abc on the command line)")
    with pytest.raises(ConfigError) as e:  # the file's own bad value blames no override
        load_config(write(tmp_path, "train: {iters: 0}\n"), ["train.lr=1e-3"])
    assert "command line" not in str(e.value)


def test_misspelt_override_through_the_cli():
    from click.testing import CliRunner

    from mlxdistill.cli import main

    res = CliRunner().invoke(main, ["train", "train.iter=10"])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in res.output, res.stderr
    assert "did you mean train.iters" in err[0] and "command line" in err[0], err[0]


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["iters=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["train.iters"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_shipped_configs_open_with_their_command():
    import glob
    import os

    from conftest import ROOT

    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert paths
    for p in paths:
        first = open(p).readline()
        assert first.startswith(f"# mlxdistill train -c configs/{os.path.basename(p)}"), p
        load_config(p)  # every shipped recipe validates


def test_configuration_reference_page_is_current():
    """docs/configuration.md is generated from the descriptions in config.py; a key added,
    renamed or redescribed without regenerating it fails here."""
    from mlxdistill import confdoc

    page = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "configuration.md")
    with open(page, encoding="utf-8") as f:
        assert f.read() == confdoc.markdown(), (
            "docs/configuration.md is stale: mlxdistill config --markdown > "
            "docs/configuration.md")


def test_every_key_has_a_description_and_config_prints_it():
    import dataclasses

    from click.testing import CliRunner

    from mlxdistill.cli import main
    from mlxdistill.config import SECTIONS

    keys = [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)]
    assert all(len(dataclasses.fields(c)) for c in SECTIONS.values())
    out = CliRunner().invoke(main, ["config"]).output
    for key in keys:
        assert f"\n{key} = " in "\n" + out, key
    res = CliRunner().invoke(main, ["config", "train.lr"])
    assert res.exit_code == 0 and res.output.startswith("train.lr = 0.0003")
    assert "AdamW peak learning rate" in res.output
    bad = CliRunner().invoke(main, ["config", "trian"])
    assert bad.exit_code == 2 and "no config key" in bad.output


# ---------------------------------------------------------------- data.dir (mlx_lm --data)

def data_folder(tmp_path, splits=("train", "valid", "test")):
    d = tmp_path / "mydata"
    d.mkdir(exist_ok=True)
    for s in splits:
        (d / f"{s}.jsonl").write_text('{"text": "the king"}\n')
    return str(d)


def test_data_dir_supplies_the_splits_and_reads_back(tmp_path):
    from mlxdistill.config import from_dict

    d = data_folder(tmp_path)
    cfg = load_config(None, [f"data.dir={d}"])  # the embedded default names data/*.jsonl
    assert (cfg.data.train, cfg.data.valid, cfg.data.test) == tuple(
        os.path.join(d, f"{s}.jsonl") for s in ("train", "valid", "test"))
    assert from_dict(cfg.to_dict()) == cfg  # a run's config.yaml holds the resolved splits
    # given beside it, a split wins: in the same file, or on the command line
    path = write(tmp_path, f"data: {{dir: {d}, valid: null}}\n")
    assert load_config(path).data.valid is None and load_config(path).data.test.startswith(d)
    cfg = load_config(None, [f"data.dir={d}", "data.test=data/test.jsonl"])
    assert cfg.data.test.endswith(os.path.join("data", "test.jsonl"))
    assert cfg.data.train == os.path.join(d, "train.jsonl")


def test_data_dir_missing_splits(tmp_path, caplog):
    d = data_folder(tmp_path, ("train",))
    with caplog.at_level("WARNING", logger="mlxdistill.config"):
        cfg = load_config(None, [f"data.dir={d}"])
    assert cfg.data.valid is None and cfg.data.test is None
    notes = [r.getMessage() for r in caplog.records]
    assert any("has no valid.jsonl" in n and "no periodic validation" in n for n in notes)
    assert any("has no test.jsonl" in n and "eval --data" in n for n in notes)
    os.remove(os.path.join(d, "train.jsonl"))
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"data.dir={d}"])
    assert "has no train.jsonl" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="is not a folder"):
        load_config(None, [f"data.dir={tmp_path / 'nope'}"])


def test_a_folder_as_data_train_says_data_dir(tmp_path):
    d = data_folder(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"data.train={d}"])
    msg = str(e.value)
    assert f"data.train={d} is a folder" in msg and f"set data.dir={d}" in msg
    assert "\n" not in msg


def test_a_runs_chat_template_file_is_found_from_anywhere(tmp_path, monkeypatch):
    """A run's config.yaml names data.chat_template as given (relative to where `train`
    ran); eval and export from elsewhere find the file, as they find the data."""
    from mlxdistill.config import from_dict, save_config
    from mlxdistill.rundir import RunDir

    (tmp_path / "t.jinja").write_text("{{ messages }}")
    os.makedirs(tmp_path / "runs" / "x")
    save_config(from_dict({"run": {"dir": "runs/x"}, "data": {"chat_template": "t.jinja"}}),
                str(tmp_path / "runs" / "x" / "config.yaml"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = RunDir(str(tmp_path / "runs" / "x")).load_config()
    assert cfg.data.chat_template == str(tmp_path / "t.jinja")


def test_a_parameter_budget_in_e_notation_is_a_number():
    # YAML 1.1 reads 1e9 (no dot) as a string; the budget takes it as the number it means
    assert load_config(None, ["prune.target_params=1e9"]).prune.target_params == 1e9
    with pytest.raises(ConfigError, match=r"prune.target_params='many' must be a number"):
        load_config(None, ["prune.target_params=many"])
