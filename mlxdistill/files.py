"""Writing and reading files so that a crash, a full disk or a hostile manifest never leaves
state a later run would trust.

Every durable file is written under a temporary name in the same directory and renamed into
place (rename is atomic within a filesystem); a failed write removes its temporary file, so
the previous version stays the one on disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from typing import Iterator

# Errors that mean "the disk is full" whatever the filesystem reports: no space, quota, or a
# file-size limit (RLIMIT_FSIZE) hit mid-write.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class PathError(ValueError):
    """A path read from a file points outside the directory it must stay in."""


def tmp_name(path: str) -> str:
    """Temporary sibling of `path` that keeps its extension (mx.save_safetensors appends
    `.safetensors` to names that lack it) and is unique per process."""
    root, ext = os.path.splitext(path)
    return f"{root}.tmp{os.getpid()}{ext}"


_TMP = re.compile(r"\.tmp(\d+)")


def is_tmp(name: str) -> bool:
    return bool(_TMP.search(name))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(directory: str) -> int:
    """Delete temporary files and directories left in `directory` by killed processes
    (their pid is in the name; a live writer's files are left alone). Returns the count."""
    if not os.path.isdir(directory):
        return 0
    n = 0
    for name in os.listdir(directory):
        m = _TMP.search(name)
        if m and not pid_alive(int(m.group(1))):
            path = os.path.join(directory, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            n += 1
    return n


def _write_failed(e: BaseException, path: str) -> BaseException:
    """MLX reports a failed write (full disk, size limit) as RuntimeError("[write] ...")
    without errno, safetensors as SafetensorError("... (os error N)"): make them the OSError
    the CLI explains in one line."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"\(os error (\d+)\)", str(e))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), path)
    if isinstance(e, RuntimeError) and str(e).startswith("[write]"):
        return OSError(errno.EIO, "write failed; is the disk full?", path)
    return e


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path to write; rename it to `path` on success, delete it on error."""
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        err = _write_failed(e, path)
        if err is e:
            raise
        raise err from None


def atomic_json(path: str, obj, indent: int | None = 2) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a fresh temporary directory; it replaces `path` as a whole on success and is
    removed on error, so a half-written directory never carries the final name."""
    tmp = path.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = _write_failed(e, path)
        if err is e:
            raise
        raise err from None


def inside(base: str, name: str, what: str) -> str:
    """`base/name` after checking that `name` is a plain file name and that the resolved
    path (symlinks followed) stays under `base`."""
    if not name or os.path.basename(name) != name or name.startswith(".") or "\\" in name:
        raise PathError(f"{what} names {name!r}, which is outside {base}; refusing to read it")
    path = os.path.join(base, name)
    real, root = os.path.realpath(path), os.path.realpath(base)
    if os.path.commonpath([real, root]) != root:
        raise PathError(f"{what} names {name!r}, a link to {real} outside {base}; refusing "
                        "to read it")
    return path


def os_error_message(e: OSError) -> str | None:
    """One line for disk-full and permission errors (the user can fix both), else None."""
    where = e.filename or "a file"
    if e.errno in NO_SPACE:
        return (f"out of disk space writing {where} ({e.strerror}); the previous state is "
                "intact: free some space and run the same command again")
    if e.errno == errno.EIO:  # also what a write MLX could not finish becomes
        return (f"could not write {where} ({e.strerror}); the previous state is intact: if "
                "the disk is full, free some space and run the same command again")
    if e.errno in NOT_WRITABLE:
        return (f"cannot write {where} ({e.strerror}); choose a writable directory or fix "
                "its permissions")
    return None


def free_bytes(path: str) -> int:
    """Free space on the filesystem that holds `path` (or its nearest existing parent)."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return shutil.disk_usage(p).free


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
