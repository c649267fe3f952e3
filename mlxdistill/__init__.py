"""mlxdistill: knowledge distillation on Apple's MLX, from a cached teacher."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__version__ = "0.1.0"

_log = logging.getLogger("mlxdistill")
_OPENBLAS = [f"/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0"
             for arch in ("x86_64", "aarch64")]


def _preload_blas() -> str:
    """On Linux, load Debian's OpenBLAS before mlx so mlx[cpu] binds its BLAS symbols to it.

    mlx[cpu]'s bundled BLAS is ~30x slower for float32 matmul. The library must be loaded
    with RTLD_GLOBAL before the first `import mlx`; afterwards it is too late. Macs use Metal
    and never need this. mlx[cuda]'s libmlx.so links the same bundled BLAS for the ops it
    runs on the CPU, so there the preload only speeds those up; the GPU's matmuls are
    cuBLAS's either way. MLXDISTILL_NO_OPENBLAS=1 turns it off (to compare, or to debug).
    """
    if not sys.platform.startswith("linux"):
        return "metal/accelerate"
    if "mlx.core" in sys.modules:
        return "bundled (mlx imported before mlxdistill)"
    found = [p for p in _OPENBLAS if os.path.exists(p)]
    if os.environ.get("MLXDISTILL_NO_OPENBLAS") == "1" or not found:
        return "bundled"
    try:
        ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return "bundled"
    return f"openblas ({found[0]})"


BLAS = _preload_blas()
_log.debug("BLAS in use: %s", BLAS)
