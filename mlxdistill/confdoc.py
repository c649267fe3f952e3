"""The configuration reference, generated from the one description each key carries in
sections.py: `docs/configuration.md` and `mlxdistill config` print the same text, and a test
fails when the page is stale (regenerate it with `mlxdistill config --markdown >
docs/configuration.md`)."""

from __future__ import annotations

import dataclasses
import textwrap

import yaml

from .config import DEFAULT_CONFIG
from .sections import SECTIONS

INTRO = """# Configuration

A run is one YAML file of sections (`teacher`, `student`, `data`, `cache`, `loss`, `train`,
`run`, `generate`) plus `KEY=VALUE` overrides on the command line (`mlxdistill train -c
my.yaml train.iters=200`). A key not listed here is an error that names the valid ones;
every value is checked when the file is loaded, before any model is. `configs/default.yaml`
is the embedded default; where it sets a key, its value is shown beside the built-in one.
Every recipe in `configs/` opens with the command that runs it.

This page is generated from the descriptions in `mlxdistill/sections.py`; `mlxdistill config`
prints the same text.
"""


def _show(value) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def rows() -> list[tuple[str, str, str, str]]:
    """(key, built-in default, value in the embedded default config or "", description)."""
    with open(DEFAULT_CONFIG, encoding="utf-8") as f:
        embedded = yaml.safe_load(f) or {}
    out = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default
            emb = (embedded.get(section) or {}).get(f.name, default)
            if isinstance(default, tuple) and isinstance(emb, list):
                emb = tuple(emb)
            out.append((f"{section}.{f.name}", _show(default),
                        "" if emb == default else _show(emb), f.metadata["doc"]))
    return out


def markdown() -> str:
    parts = [INTRO.rstrip("\n")]
    section = None
    for key, default, emb, doc in rows():
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            parts.append(f"\n## {section}\n\n| key | default | meaning |\n|---|---|---|")
        shown = f"`{default}`" + (f" (`{emb}` in the embedded default)" if emb else "")
        parts.append(f"| `{key}` | {shown} | {doc.replace('|', chr(92) + '|')} |")
    return "\n".join(parts) + "\n"


def text(prefix: str = "", width: int = 88) -> str:
    """The reference as plain text, keys starting with `prefix` only."""
    lines = []
    for key, default, emb, doc in rows():
        if not key.startswith(prefix):
            continue
        lines.append(f"{key} = {default}" + (f"   (embedded default: {emb})" if emb else ""))
        lines += textwrap.wrap(doc.replace("`", ""), width, initial_indent="    ",
                               subsequent_indent="    ")
    return "\n".join(lines)
