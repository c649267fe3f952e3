"""The shipped recipes: where they live (inside the package, linked from a clone), how their
inputs resolve from any directory, `mlxdistill recipes` and `mlxdistill init`."""

import os
import subprocess

import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT

from mlxdistill import recipes
from mlxdistill.cli import main
from mlxdistill.config import CONFIGS_DIR, DEFAULT_CONFIG, EMBEDDED_DIR, load_config

NAMES = sorted(n[:-5] for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".yaml"))
INPUTS = [("teacher", "model"), ("student", "model"), ("data", "train"), ("data", "valid"),
          ("data", "test"), ("generate", "prompts")]


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def value(cfg, section, key):
    return getattr(getattr(cfg, section), key)


@pytest.mark.parametrize("name", ["configs", "weights", "data"])
def test_clone_links_into_the_package(name):
    """A clone's configs/, weights/ and data/ are links to the package's embedded folders
    (so every documented path works from the root), committed as links, not copies."""
    path = os.path.join(ROOT, name)
    assert os.path.islink(path)
    assert os.readlink(path) == os.path.join("mlxdistill", "embedded", name)
    assert os.path.realpath(path) == os.path.realpath(os.path.join(EMBEDDED_DIR, name))
    staged = subprocess.run(["git", "ls-files", "-s", "--", name], cwd=ROOT,
                            capture_output=True, text=True)
    if staged.returncode == 0 and staged.stdout.strip():  # tracked (not in an export)
        assert staged.stdout.startswith("120000 "), staged.stdout


def test_embedded_recipes_resolve_from_anywhere(tmp_path, monkeypatch):
    """From a clone's root an embedded recipe's inputs stay the strings it names (a cache or
    run dir recorded them so); from any other directory they resolve into the package."""
    monkeypatch.chdir(ROOT)
    here = load_config(os.path.join("configs", "lora.yaml"))
    assert here.teacher.model == "weights/teacher" and here.data.train == "data/train.jsonl"
    assert load_config().data.train == "data/train.jsonl"
    monkeypatch.chdir(tmp_path)
    for path in (os.path.join(ROOT, "configs", "specialist.yaml"), None):
        cfg = load_config(path)
        for section, key in INPUTS:
            v = value(cfg, section, key)
            if v and os.path.exists(os.path.join(EMBEDDED_DIR, v.split("embedded/")[-1])):
                assert os.path.isabs(v) and os.path.exists(v), (section, key, v)
        assert not os.path.isabs(cfg.cache.dir) and not os.path.isabs(cfg.run.dir)


def test_default_cache_identity_is_the_same_from_anywhere(tmp_path, monkeypatch):
    """A cache of the default built from a clone serves the default run from elsewhere (and
    from an installed wheel): identity is by content, not by the path strings."""
    from mlxdistill import cache

    monkeypatch.chdir(ROOT)
    here = cache.config_identity(load_config())
    monkeypatch.chdir(tmp_path)
    assert cache.config_identity(load_config()) == here


def test_own_config_is_not_anchored(tmp_path, monkeypatch):
    """A config of the user's own names its inputs relative to where it runs: a missing
    weights/teacher there is an error, not a silent switch to the embedded teacher."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("teacher:\n  model: weights/teacher\n")
    assert load_config("mine.yaml").teacher.model == "weights/teacher"


def test_recipes_lists_every_shipped_config():
    res = invoke("recipes")
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line.split(None, 1)[1] for line in res.stdout.splitlines()
            if line.strip() and not line.startswith("`")}
    assert sorted(rows) == NAMES and "mlxdistill init NAME" in res.stdout
    for name, summary in rows.items():  # a description, not the command that runs it
        assert summary and not summary.startswith(("mlxdistill", "memory")), (name, summary)
        assert len(summary) <= recipes.SUMMARY_CHARS
    assert rows["qwen2.5-7b-to-0.5b"].startswith("Qwen2.5-7B-Instruct (4-bit) into")


def test_summary_of_a_header():
    text = ("# mlxdistill train -c configs/x.yaml\n#\n# memory (Mac GPU): 1 GB\n#   plan\n#\n"
            "# A into B with LoRA. More\n# words.\nteacher:\n  model: a\n# not the header\n")
    assert recipes.summary(text) == "A into B with LoRA."
    assert recipes.summary("teacher:\n  model: a\n") == ""
    long = "# " + "word " * 40 + "\n"
    assert recipes.summary(long).endswith("...")
    assert len(recipes.summary(long)) <= recipes.SUMMARY_CHARS


@pytest.mark.parametrize("name", NAMES)
def test_init_copy_matches_the_recipe(name, tmp_path, monkeypatch):
    """The copy, loaded from an unrelated folder, is the recipe as it loads from a clone's
    root, except that its embedded inputs are absolute paths to the same files; comments
    are kept and its header names the copy."""
    monkeypatch.chdir(tmp_path)
    res = invoke("init", name)
    assert res.exit_code == 0, res.output
    assert f"mlxdistill train -c {name}.yaml" in res.stdout
    copy = load_config(f"{name}.yaml")
    monkeypatch.chdir(ROOT)
    orig = load_config(os.path.join("configs", f"{name}.yaml"))
    for section, key in INPUTS:
        was, now = value(orig, section, key), value(copy, section, key)
        if was and os.path.exists(was):
            assert os.path.isabs(now) and os.path.samefile(was, now), (section, key, now)
            assert os.path.realpath(now).startswith(os.path.realpath(EMBEDDED_DIR))
        else:  # outputs, hub ids and paths the user supplies stay as written
            assert now == was, (section, key)
    rest = [orig.to_dict(), copy.to_dict()]
    for d in rest:
        for section, key in INPUTS:
            d[section].pop(key)
    assert rest[0] == rest[1]
    text = (tmp_path / f"{name}.yaml").read_text()
    assert text.startswith(f"# An editable copy of the {name} recipe")
    assert f"-c configs/{name}.yaml" not in text
    with open(os.path.join(CONFIGS_DIR, f"{name}.yaml")) as f:
        comments = [line for line in f if line.lstrip().startswith("#")]
    assert len([line for line in text.splitlines() if line.lstrip().startswith("#")]) == \
        len(comments) + 4


def test_init_refuses_to_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("init", "default").exit_code == 0
    (tmp_path / "default.yaml").write_text("my edits\n")
    res = invoke("init", "default")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.output
    assert "default.yaml exists" in res.stderr and "--force" in res.stderr
    assert (tmp_path / "default.yaml").read_text() == "my edits\n"
    assert invoke("init", "default.yaml", "--force").exit_code == 0
    assert load_config("default.yaml").run.dir == "runs/default"


def test_init_destinations(tmp_path, monkeypatch):
    """DEST: a folder (made if missing) that gets RECIPE.yaml, or a .yaml file name."""
    monkeypatch.chdir(tmp_path)
    res = invoke("init", "lora", "a/b")
    assert res.exit_code == 0 and (tmp_path / "a" / "b" / "lora.yaml").is_file(), res.output
    assert "-c a/b/lora.yaml" in (tmp_path / "a" / "b" / "lora.yaml").read_text()
    assert invoke("init", "lora", "mine.yaml").exit_code == 0
    assert yaml.safe_load((tmp_path / "mine.yaml").read_text())["train"]["mode"] == "lora"
    (tmp_path / "file").write_text("")
    res = invoke("init", "lora", "file/sub")
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "file" in res.stderr


def test_init_unknown_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("init", "qwen-typo")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.output
    assert "no recipe named 'qwen-typo'" in res.stderr and "qwen2.5-7b-to-0.5b" in res.stderr
    assert os.listdir(tmp_path) == []


def test_quoted_path_when_yaml_needs_it(monkeypatch, tmp_path):
    """An install path YAML would misread unquoted (a ': ' or ' #') is written quoted."""
    odd = tmp_path / "site: packages #1"
    (odd / "weights").mkdir(parents=True)
    (odd / "weights" / "teacher").mkdir()
    monkeypatch.setattr(recipes, "EMBEDDED_DIR", str(odd))
    text = recipes.rewrite("teacher:\n  model: weights/teacher  # note\n", "x", "x.yaml")
    assert yaml.safe_load(text)["teacher"]["model"] == str(odd / "weights" / "teacher")


def test_default_config_is_the_embedded_one():
    assert os.path.samefile(DEFAULT_CONFIG, os.path.join(ROOT, "configs", "default.yaml"))
