"""Write models and adapters the way mlx_lm reads them back: adapters with their
adapter_config.json, full model folders with the source's tokenizer files, and mlx_lm's
quantization (with the one set of quantization settings the commands accept)."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import tempfile
from typing import Iterable, Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from . import files
from .config import ConfigError

GROUP_SIZES = (32, 64, 128)  # what mx.quantize accepts


def check_quant(bits: Union[int, Iterable[int]], group_size: int, allowed_bits: tuple,
                pick: str = "one") -> None:
    """Refuse `--bits` (one width, or each of several) outside `allowed_bits` and a
    `--group-size` MLX's quantization does not support, before any work. `pick` words the
    hint: "one" for a command that takes one width, "some" for one that takes a list."""
    for b in [bits] if isinstance(bits, int) else bits:
        if b not in allowed_bits:
            raise ConfigError(f"--bits {b} is not supported; use {pick} of "
                              f"{', '.join(map(str, allowed_bits))}")
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size {group_size} is not supported by MLX's quantization; "
                          f"use one of {', '.join(map(str, GROUP_SIZES))}")


def adapter_base(base_model: str) -> str:
    """The base model as adapter_config.json records it: a local folder as an absolute path,
    valid from any directory (a relative one holds only where the run started); a hub id
    as itself."""
    return os.path.abspath(base_model) if os.path.isdir(base_model) else base_model


def save_adapters(model, adapter_config: dict, base_model: str, out_dir: str) -> None:
    """adapters.safetensors + adapter_config.json, as `mlx_lm.lora` writes them."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    with files.atomic_path(os.path.join(out_dir, "adapters.safetensors")) as tmp:
        mx.save_safetensors(tmp, weights)
    cfg = {**adapter_config, "model": adapter_base(base_model)}
    files.atomic_json(os.path.join(out_dir, "adapter_config.json"), cfg)


TOKENIZER_FILES = ("tokenizer*", "*.model", "special_tokens_map.json", "added_tokens.json",
                   "chat_template*", "vocab.json", "merges.txt")


def local_folder(path: str) -> Optional[str]:
    """A model folder on disk: `path` itself, or a hub id's cached snapshot (no network)."""
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:  # not cached, not a hub id, or no huggingface_hub
        return None


def copy_tokenizer(tokenizer, src_path: str, dst: str,
                   chat_template: Optional[str] = None) -> None:
    """The source model's tokenizer files into `dst`, byte for byte. Saving through the
    installed transformers would rewrite tokenizer_config.json (transformers 5 writes
    tokenizer_class "TokenizersBackend" and drops add_bos_token), which transformers 4 and
    swift-transformers, MLX Swift's loader, refuse; transformers writes only the
    tokenizer.json / tokenizer_config.json that the source lacks. `chat_template` (the run's
    data.chat_template, which training rendered with) replaces the source's template, so an
    app renders prompts as the student was trained."""
    src = local_folder(src_path)
    for pattern in TOKENIZER_FILES if src else ():
        for f in glob.glob(os.path.join(src, pattern)):
            if os.path.isfile(f):
                shutil.copyfile(f, os.path.join(dst, os.path.basename(f)))
    if not all(os.path.isfile(os.path.join(dst, f)) for f in ("tokenizer.json",
                                                               "tokenizer_config.json")):
        with tempfile.TemporaryDirectory(dir=dst) as scratch:
            tokenizer.save_pretrained(scratch)
            for name in os.listdir(scratch):
                if not os.path.exists(os.path.join(dst, name)):
                    shutil.copyfile(os.path.join(scratch, name), os.path.join(dst, name))
    if chat_template is not None:
        _set_chat_template(dst, chat_template)


def _set_chat_template(folder: str, template: str) -> None:
    """tokenizer_config.json's `chat_template` set to `template`; a separate template file
    (chat_template.jinja / .json), which transformers would read first, is removed."""
    for name in glob.glob(os.path.join(folder, "chat_template*")):
        os.remove(name)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        tc = json.load(f)
    tc["chat_template"] = template
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)


def save_full_model(model, tokenizer, config: dict, src_path: str, out_dir: str,
                    chat_template: Optional[str] = None) -> None:
    """An mlx_lm-loadable folder (weights, config.json, tokenizer), written under a temp name
    and renamed so a half-written model/ never exists."""
    from mlx_lm.utils import save_config, save_model

    with files.atomic_dir(out_dir) as tmp:
        save_model(tmp, model)
        save_config(dict(config), os.path.join(tmp, "config.json"))
        copy_tokenizer(tokenizer, src_path, tmp, chat_template)


def quantize(model, config: dict, group_size: int, bits: int):
    """mlx_lm's affine quantization, without its print to stdout (which would corrupt
    `--json` output)."""
    from mlx_lm.utils import quantize_model

    with contextlib.redirect_stdout(io.StringIO()):
        return quantize_model(model, config, group_size, bits)
