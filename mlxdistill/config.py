"""Loading the run configuration: YAML and `KEY=VALUE` overrides -> the frozen sections of
sections.py, validated on load; `data.dir` and the embedded recipes' paths resolved.

Unknown keys are an error (a misspelt key silently ignored is a run wasted; a close spelling
is suggested), and every error names the key, the bad value, where it came from (the file or
the command line) and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from dataclasses import fields
from typing import Any, Optional

import yaml

from .files import atomic_path
from .remote import is_url, redact
from .sections import SECTIONS, Config, ConfigError, check

# The embedded recipes, weights and data live inside the package so that a wheel carries
# them (`pip install` then `mlxdistill train` anywhere); a clone reaches them through its
# top-level links configs/, weights/ and data/.
EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")
CONFIGS_DIR = os.path.join(EMBEDDED_DIR, "configs")
DEFAULT_CONFIG = os.path.join(CONFIGS_DIR, "default.yaml")
_log = logging.getLogger(__name__)


def _coerce(key: str, value: Any, default: Any, kind: str = "") -> Any:
    """YAML reads `3e-4` as a string and users write ints for floats: accept the obvious.
    kind: the key's annotation, which says what a null-default key holds."""
    if default is None and kind == "Optional[float]" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # the section's own check names the key and what it wants
    if isinstance(default, bool):
        check(isinstance(value, bool), f"{key}={value!r} must be true or false")
        return value
    if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} must be a number") from None
    if isinstance(default, int) and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} must be an integer") from None
    if isinstance(default, tuple):
        check(isinstance(value, (list, tuple)), f"{key}={value!r} must be a list")
        return tuple(value)
    return value


def _keys(section: str) -> list[str]:
    return [f.name for f in fields(SECTIONS[section])]


def unknown(section: str, key: Optional[str] = None) -> Optional[str]:
    """None if `section` (and `key` in it) exist, else what is wrong and what was probably
    meant: a close spelling (difflib), the same key in another section, or the valid names."""
    if section not in SECTIONS:
        what = f"unknown section {section!r}"
        close = difflib.get_close_matches(section, SECTIONS, n=1)
        if not close:
            return f"{what}; valid sections: {', '.join(SECTIONS)}"
        if key is not None and key in _keys(close[0]):
            return f"{what}; did you mean {close[0]}.{key}?"
        return f"{what}; did you mean {close[0]!r}?"
    if key is None or key in _keys(section):
        return None
    what = f"unknown key {section}.{key}"
    close = [f"{section}.{k}" for k in difflib.get_close_matches(key, _keys(section), n=2)]
    # a key of another section (train.seed for run.seed) when no spelling is close
    close = close or [f"{s}.{key}" for s in SECTIONS if key in _keys(s)]
    if close:
        guess = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
        return f"{what}; did you mean {guess}?"
    return f"{what}; valid keys: {', '.join(sorted(_keys(section)))}"


DATA_SPLITS = ("train", "valid", "test")


def _from_data_dir(body: dict) -> dict:
    """The data section with data.dir's train/valid/test.jsonl in place of the splits not
    given beside it. A run's config.yaml names every split, so it reads back unchanged."""
    d = body.get("dir")
    missing = [s for s in DATA_SPLITS if s not in body]
    if d is None or not missing:
        return body
    check(isinstance(d, str) and os.path.isdir(d),
          f"data.dir={d!r} is not a folder; give a folder holding train.jsonl (and "
          "optionally valid.jsonl, test.jsonl), as for `mlx_lm.lora --data`")
    body = dict(body)
    for split in missing:
        path = os.path.join(d, f"{split}.jsonl")
        body[split] = path if os.path.isfile(path) else None
    check(body["train"] is not None,
          f"data.dir={d} has no train.jsonl; mlx_lm's layout is DIR/train.jsonl with "
          "optional valid.jsonl and test.jsonl (or set data.train to the training file)")
    why = {"valid": "no periodic validation",
           "test": "the final evaluation uses data.valid" if body.get("valid") else
           "no held-out data: `train` cannot evaluate at the end; add test.jsonl or run "
           "`eval --data PATH`"}
    for split in missing:
        if body[split] is None:
            _log.warning(f"data.dir={d} has no {split}.jsonl: data.{split} is null "
                         f"({why[split]})")
    return body


def from_dict(raw: dict, source: str = "config") -> Config:
    check(isinstance(raw, dict), f"{source}: top level must be a mapping of sections")
    sections = {}
    for name, body in raw.items():
        if (bad := unknown(name)) is not None:
            raise ConfigError(f"{source}: {bad}")
        cls = SECTIONS[name]
        body = body or {}
        check(isinstance(body, dict), f"{source}: section {name!r} must be a mapping")
        if name == "data":
            body = _from_data_dir(body)
        defaults = cls()
        kinds = {f.name: str(f.type) for f in fields(cls)}
        kwargs = {}
        for key, value in body.items():
            if (bad := unknown(name, key)) is not None:
                raise ConfigError(f"{source}: {bad}")
            kwargs[key] = _coerce(f"{name}.{key}", value, getattr(defaults, key), kinds[key])
        sections[name] = cls(**kwargs)
    return Config(**sections)


def parse_overrides(overrides: list[str]) -> dict:
    """`train.lr=1e-3 cache.hidden_layers=[2,4]` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        check(bool(sep) and len(parts) == 2 and all(parts),
              f"override {item!r} must look like section.key=value (e.g. train.iters=200)")
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            parsed = value
        out.setdefault(parts[0], {})[parts[1]] = parsed
    return out


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config (default: the embedded one) and apply KEY=VALUE overrides."""
    path = path or DEFAULT_CONFIG
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found; pass an existing YAML with -c")
    overrides = list(overrides or [])
    changes = parse_overrides(overrides)
    # Checked before the merge into the file's sections, after which an error could only
    # blame the file.
    for item in overrides:
        if (bad := unknown(*item.partition("=")[0].split("."))) is not None:
            raise ConfigError(f"{item} on the command line: {bad}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        why = " ".join(str(getattr(e, "problem", None) or e).split())  # one line
        raise ConfigError(f"{path}{where}: not valid YAML ({why}); fix the file") from None
    check(isinstance(raw, dict), f"{path}: top level must be a mapping of sections")
    for section, body in changes.items():
        if isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **body}
        else:
            raw[section] = body
    given = changes.get("data") or {}
    if given.get("dir") is not None:
        # data.dir on the command line points the config at another dataset, as
        # `mlx_lm.lora --data DIR` does: the file's splits give way to it.
        raw["data"] = {k: v for k, v in raw["data"].items()
                       if k not in DATA_SPLITS or k in given}
    try:
        cfg = from_dict(raw, source=path)
    except ConfigError as e:
        # A bad value's message starts "section.key=value": name the override that set it.
        item = next((i for i in reversed(overrides)
                     if str(e).startswith(i.partition("=")[0] + "=")), None)
        if item is None:
            raise
        key, _, value = item.partition("=")
        if is_url(value):  # credentials a URL may carry stay out of the message
            item = f"{key}={redact(value)}"
        raise ConfigError(f"{e} ({item} on the command line)") from None
    if os.path.dirname(os.path.realpath(path)) == os.path.realpath(CONFIGS_DIR):
        cfg = _anchor_embedded_paths(cfg)
    return cfg


def _anchor_embedded_paths(cfg: Config) -> Config:
    """The embedded recipes name weights/ and data/ relatively; let them run from any
    directory, installed or cloned, by resolving those inputs against the embedded folder
    when they are not found from the current one. A path found from the current directory
    (a clone's root) is kept as written, so the strings recorded in caches and run dirs do
    not change. Outputs (cache, run dir) stay relative to where the user is."""

    def anchor(p):
        if p is None or os.path.isabs(p) or os.path.exists(p):
            return p
        candidate = os.path.join(EMBEDDED_DIR, p)
        return candidate if os.path.exists(candidate) else p

    return dataclasses.replace(
        cfg,
        teacher=dataclasses.replace(cfg.teacher, model=anchor(cfg.teacher.model),
                                    tokenizer=anchor(cfg.teacher.tokenizer)),
        student=dataclasses.replace(cfg.student, model=anchor(cfg.student.model)),
        data=dataclasses.replace(cfg.data, train=anchor(cfg.data.train),
                                 valid=anchor(cfg.data.valid), test=anchor(cfg.data.test)),
        generate=dataclasses.replace(cfg.generate, prompts=anchor(cfg.generate.prompts)),
    )


def save_config(cfg: Config, path: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
