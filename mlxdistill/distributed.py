"""Ranks under `mlx.launch`: the mx.distributed group, and collectives that cannot hang.

One process is a group of size 1 and every helper here is then a no-op, so `train`, `cache`
and `generate` run the same code with or without `mlx.launch`.

Failure handling. A rank that dies closes its sockets, and the ring backend fails the other
ranks' pending collective ("connection to a peer was lost"); that becomes one clear line
and a non-zero exit. A rank that hangs instead (deadlock, swapping, a Mac that dropped off
the network) leaves the others blocked inside a collective, where no Python code of theirs
runs: a watchdog thread then ends the process after `run.dist_timeout` seconds, naming what
it waited for. `mx.eval` releases the GIL while it waits, which is what lets the watchdog
run. Only the wait for other ranks is timed: local work is evaluated before each collective.
Connecting is guarded too: `mx.distributed.init()` holds the GIL while it waits for peers
that never come (an unreachable host, a rank that failed to start), so a small separate
watchdog process ends this one after the same timeout, saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from .errors import Error

DEFAULT_TIMEOUT = 600.0  # seconds; must exceed rank 0's longest solo work (a checkpoint, eval)
EXIT_CODE = 4  # a rank stopped because another failed (2 is a user error, 3 a diverged loss)


class DistributedError(Error, RuntimeError):
    """Another rank died or stopped answering; the message is one line. Still a
    RuntimeError (what a failed collective raises), and exits with EXIT_CODE, not 2."""

    exit_code = EXIT_CODE


# Launchers' environment variables: only then can init() wait for other processes.
_LAUNCH_ENV = ("MLX_RANK", "MLX_HOSTFILE", "MLX_IBV_DEVICES", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_CONNECT_WATCHDOG = """
import os, select, signal, sys
pid, timeout, msg = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
# stdin reaches EOF when the rank has connected (or died): then there is nothing to do.
if not select.select([sys.stdin], [], [], timeout)[0]:
    sys.stderr.write(msg + "\\n")
    sys.stderr.flush()
    os.kill(pid, signal.SIGKILL)
"""
_group = None


def _connect(timeout: float):
    """mx.distributed.init(), once per process, ended after `timeout` s if peers never come."""
    global _group
    if _group is None:
        if not any(k in os.environ for k in _LAUNCH_ENV):
            _group = mx.distributed.init()  # a single process: returns at once
            return _group
        rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
        msg = (f"error: rank {rank}: the other ranks did not connect within {timeout:g} s; "
               "a host is unreachable or a rank failed to start (see its output). Stopping; "
               "raise run.dist_timeout if ranks start slowly")
        dog = subprocess.Popen([sys.executable, "-c", _CONNECT_WATCHDOG, str(os.getpid()),
                                str(timeout), msg], stdin=subprocess.PIPE)
        try:
            _group = mx.distributed.init()
        finally:
            dog.stdin.close()
            dog.wait()
    return _group


class World:
    """The mx.distributed group of this process. Rank 0 is the one that writes."""

    def __init__(self, timeout: Optional[float] = None):
        self.timeout = float(timeout or DEFAULT_TIMEOUT)
        self.group = _connect(self.timeout)
        self.rank, self.size = self.group.rank(), self.group.size()
        self.main = self.rank == 0
        self._waiting: Optional[tuple[str, float]] = None  # (what, deadline) while blocked
        if self.size > 1:
            threading.Thread(target=self._watch, daemon=True, name="rank-watchdog").start()

    def describe(self) -> str:
        """The world size line every command prints at start."""
        if self.size == 1:
            return "ranks: 1 (single process)"
        return f"ranks: {self.size} (mx.distributed; timeout {self.timeout:g} s)"

    # ------------------------------------------------------------ guarded waiting

    def _watch(self) -> None:
        tick = min(1.0, self.timeout / 10)
        while True:
            time.sleep(tick)
            waiting = self._waiting
            if waiting is not None and time.monotonic() > waiting[1]:
                # The main thread is stuck in C++; raising there is impossible, so say why and
                # leave. Files are written atomically, so nothing half-written is left behind.
                sys.stderr.write(
                    f"\nerror: rank {self.rank}: no answer from the other ranks for "
                    f"{self.timeout:g} s during {waiting[0]}; a rank has died or hangs "
                    "(see its output). Stopping. Rerun the same command to resume; raise "
                    "run.dist_timeout if a rank legitimately needs longer\n")
                sys.stderr.flush()
                os._exit(EXIT_CODE)

    def wait(self, what: str, *arrays) -> None:
        """Evaluate `arrays` (which hold collectives) under the watchdog."""
        if self.size == 1:
            mx.eval(*arrays)
            return
        self._waiting = (what, time.monotonic() + self.timeout)
        try:
            mx.eval(*arrays)
        except RuntimeError as e:
            raise DistributedError(
                f"rank {self.rank}: lost contact with another rank during {what} "
                f"({str(e).strip()}); that rank failed or was stopped, see its output. "
                "Rerun the same command to resume") from None
        finally:
            self._waiting = None

    # ------------------------------------------------------------ collectives

    def barrier(self, what: str = "a barrier") -> None:
        if self.size > 1:
            self.wait(what, mx.distributed.all_sum(mx.array(0.0)))

    def sum(self, values: np.ndarray, what: str = "a sum") -> np.ndarray:
        if self.size == 1:
            return values
        out = mx.distributed.all_sum(mx.array(values, dtype=mx.float32))
        self.wait(what, out)
        return np.array(out)

    def from_main(self, tree, what: str = "sharing rank 0's state"):
        """Rank 0's values of `tree` on every rank (a sum in which the others add zeros)."""
        if self.size == 1:
            return tree
        tree = tree_map(lambda a: a if self.main else mx.zeros_like(a), tree)
        tree = tree_map(lambda a: mx.distributed.all_sum(a), tree)
        self.wait(what, tree)
        return tree

    def average_gradients(self, grads, what: str = "the gradient all-reduce"):
        """Mean of `grads` over ranks (mlx's fused all-reduce). Local work is evaluated first
        so that the watchdog times only the wait for the other ranks. The result is
        row-major whatever the layout of `grads` (the all-reduce flattens them), so what
        follows must not depend on layout: a sum, for one, runs in memory order."""
        if self.size == 1:
            return grads
        mx.eval(grads)
        grads = nn.average_gradients(grads)
        self.wait(what, grads)
        return grads

    def gather(self, obj: Any, what: str = "gathering records") -> list:
        """Every rank's JSON-serialisable `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        data = np.frombuffer(json.dumps(obj).encode("utf-8"), dtype=np.uint8)
        lens = mx.distributed.all_gather(mx.array([data.size], dtype=mx.int32))
        self.wait(what, lens)
        lens = np.array(lens)
        buf = np.zeros(int(lens.max()), dtype=np.uint8)
        buf[:data.size] = data
        out = mx.distributed.all_gather(mx.array(buf))
        self.wait(what, out)
        out = np.array(out).reshape(self.size, -1)
        return [json.loads(out[r, :lens[r]].tobytes().decode("utf-8"))
                for r in range(self.size)]

    def bcast(self, obj: Any, what: str = "sharing rank 0's state") -> Any:
        """Rank 0's JSON-serialisable `obj` on every rank (the others pass anything)."""
        if self.size == 1:
            return obj
        return self.gather(obj if self.main else None, what)[0]
