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
    with pytest.raises(ConfigError, match="valid keys: .*iters"):
        load_config(write(tmp_path, "train: {iterz: 3}\n"))


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
    from mlxdistill.config import _CLASSES

    keys = [f"{s}.{f.name}" for s, c in _CLASSES.items() for f in dataclasses.fields(c)]
    assert all(len(dataclasses.fields(c)) for c in _CLASSES.values())
    out = CliRunner().invoke(main, ["config"]).output
    for key in keys:
        assert f"\n{key} = " in "\n" + out, key
    res = CliRunner().invoke(main, ["config", "train.lr"])
    assert res.exit_code == 0 and res.output.startswith("train.lr = 0.0003")
    assert "AdamW peak learning rate" in res.output
    bad = CliRunner().invoke(main, ["config", "trian"])
    assert bad.exit_code == 2 and "no config key" in bad.output
