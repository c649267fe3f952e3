"""config.json of a hub model for `plan`: the local Hugging Face cache, the hub, or, when
neither answers, the copy shipped in hub_configs/.

hub_configs/ holds, for each model a recipe in configs/ names, the published config.json
fields the memory estimate reads (widths, counts, vocabulary, tying, dtype, quantization,
Gemma-2's soft-caps) and the few more mlx_lm's model classes are built from (norm epsilon,
RoPE base, context length); nothing else. A file is named after its hub id, the slash as `--`. With them the recipes' memory figures
can be recomputed offline, and for gated repos (Llama, Gemma) without a token.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Optional

from .models import ModelError

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hub_configs")


def shipped_path(hub_id: str) -> Optional[str]:
    """The shipped file of a hub id, matched without case as the hub matches ids."""
    want = hub_id.replace("/", "--").lower() + ".json"
    for name in sorted(os.listdir(SHIPPED_DIR)):
        if name.lower() == want:
            return os.path.join(SHIPPED_DIR, name)
    return None


def _offline() -> bool:
    from huggingface_hub import constants

    # The hub client reads HF_HUB_OFFLINE once, at import; a later setting still counts here.
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return env or bool(constants.HF_HUB_OFFLINE)


def fetch(hub_id: str) -> dict:
    """config.json from the local Hugging Face cache, else from the hub (the file alone)."""
    from huggingface_hub import hf_hub_download

    try:
        cpath = hf_hub_download(hub_id, "config.json", local_files_only=True)
    except Exception:
        if _offline():
            raise ConnectionError("HF_HUB_OFFLINE is set and config.json is not in the local "
                                  "Hugging Face cache") from None
        # Offline, the hub client retries for half a minute; a failed lookup says so now.
        socket.getaddrinfo("huggingface.co", 443)
        hub_log = logging.getLogger("huggingface_hub")
        level, hub_log.level = hub_log.level, logging.ERROR
        try:
            cpath = hf_hub_download(hub_id, "config.json")
        finally:
            hub_log.setLevel(level)
    with open(cpath) as f:
        return json.load(f)


def hub_config(hub_id: str, what: str) -> tuple[dict, Optional[str]]:
    """(config, note): the fetched config.json and None, or the shipped copy and why it was
    used."""
    try:
        return fetch(hub_id), None
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    path = shipped_path(hub_id)
    if path is None:
        raise ModelError(f"cannot read config.json of the {what} model {hub_id} (not a local "
                         f"folder, and the hub fetch failed: {msg}); set {what}.model to a "
                         "local mlx_lm model folder, or plan where the hub is reachable")
    with open(path) as f:
        return json.load(f), f"the hub fetch failed: {msg}"
