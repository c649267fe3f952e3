"""The shipped recipes (the YAML files in embedded/configs/): `mlxdistill recipes` lists them,
`mlxdistill init` writes an editable copy whose inputs resolve from wherever it is written.

The copy points at the embedded weights and data inside the installed package (absolute
paths) instead of copying them: they are ~50 MB of read-only inputs, and one installed copy
serves every recipe a user writes. Outputs (cache.dir, run.dir, generate.out) stay relative,
so they land in the directory where the user runs `mlxdistill train`."""

from __future__ import annotations

import os
import re
from typing import Optional

from . import __version__
from .config import CONFIGS_DIR, EMBEDDED_DIR
from .errors import Error
from .files import atomic_path, check_file, ensure_dir

SUMMARY_CHARS = 80  # one line of `mlxdistill recipes` next to the name

# A `key: value` line (not a comment) whose value names an embedded input, such as
# `  model: weights/teacher` or `  train: data/train.jsonl   # your JSONL`.
_INPUT = re.compile(r"^(\s*[\w-]+:[ \t]+)((?:weights|data)/[^\s#'\"]+)")
_PLAIN = re.compile(r"[\w./+-]+")  # a path YAML reads back unquoted


class RecipeError(Error):
    """An unknown recipe name or a copy that would overwrite a file; one line."""


def names() -> list[str]:
    return sorted(n[:-len(".yaml")] for n in os.listdir(CONFIGS_DIR) if n.endswith(".yaml"))


def path(name: str) -> str:
    """The shipped file of recipe `name` (with or without .yaml)."""
    stem = name[:-len(".yaml")] if name.endswith(".yaml") else name
    if stem not in names():
        raise RecipeError(f"no recipe named {name!r}; the shipped ones are "
                          f"{', '.join(names())} (`mlxdistill recipes`)")
    return os.path.join(CONFIGS_DIR, stem + ".yaml")


def summary(text: str) -> str:
    """A recipe's one line: the first sentence of its description, which is the first
    paragraph of the header comment that is neither the command running it nor the memory
    `plan` computed for it (every recipe opens with those), cut to SUMMARY_CHARS."""
    paragraphs, current = [], []
    for line in text.splitlines() + [""]:
        if not line.startswith("#"):
            if current:
                paragraphs.append(" ".join(current))
            break
        words = line.lstrip("#").strip()
        if words:
            current.append(words)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    for p in paragraphs:
        if p.startswith(("mlxdistill ", "memory ")):
            continue
        sentence = re.split(r"(?<=\.)\s", p, maxsplit=1)[0]
        if len(sentence) <= SUMMARY_CHARS:
            return sentence
        return sentence[:SUMMARY_CHARS - 3].rsplit(" ", 1)[0] + "..."
    return ""


def list_all() -> list[dict]:
    """Every shipped recipe: name, one-line summary and the file's path."""
    out = []
    for name in names():
        p = os.path.join(CONFIGS_DIR, name + ".yaml")
        with open(p, encoding="utf-8") as f:
            out.append({"name": name, "summary": summary(f.read()), "path": p})
    return out


def _absolute(value: str) -> str:
    """`value` (weights/… or data/…) as an absolute path into the package when the package
    has it; anything else (a path the user is meant to supply) stays as written."""
    p = os.path.join(EMBEDDED_DIR, value)
    if not os.path.exists(p):
        return value
    p = os.path.abspath(p)
    return p if _PLAIN.fullmatch(p) else '"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"'


def rewrite(text: str, stem: str, shown: str) -> str:
    """The recipe's text as its copy at `shown`: embedded inputs made absolute, its header's
    `-c configs/STEM.yaml` pointed at the copy, comments and layout otherwise kept."""
    lines = [f"# An editable copy of the {stem} recipe, by `mlxdistill init` (mlxdistill "
             f"{__version__}).",
             "# Its weights/ and data/ inputs point into the installed package; outputs "
             "(cache.dir,",
             f"# run.dir) go under the directory you run `mlxdistill train -c {shown}` from.",
             "#"]
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            lines.append(line.replace(f"-c configs/{stem}.yaml", f"-c {shown}"))
        else:
            lines.append(_INPUT.sub(lambda m: m.group(1) + _absolute(m.group(2)), line))
    return "\n".join(lines) + "\n"


def init(name: str, dest: Optional[str] = None, force: bool = False) -> str:
    """Write an editable copy of recipe `name` into the folder `dest` (default: the working
    directory; made if missing) as NAME.yaml, or to `dest` itself when it names a .yaml
    file. Refuses to overwrite an existing file unless `force`. Returns the copy's path."""
    src = path(name)
    stem = os.path.basename(src)[:-len(".yaml")]
    if dest and dest.endswith((".yaml", ".yml")) and not os.path.isdir(dest):
        out = dest
        ensure_dir(os.path.dirname(out) or ".", "the copy's folder")
    else:
        folder = ensure_dir(dest or ".", "the copy's folder")
        out = os.path.join(folder, stem + ".yaml") if dest else stem + ".yaml"
    check_file(out, "the copy")
    if os.path.lexists(out) and not force:
        raise RecipeError(f"{out} exists; edit it, or pass --force to replace it with a "
                          f"fresh copy of {stem}")
    rel = os.path.relpath(out)
    shown = rel if not rel.startswith(os.pardir) else os.path.abspath(out)
    with open(src, encoding="utf-8") as f:
        text = rewrite(f.read(), stem, shown)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return out
