"""Writing and reading files so that a crash, a full disk or a hostile manifest never leaves
state a later run would trust.

Every durable file is written under a temporary name in the same directory and renamed into
place (rename is atomic within a filesystem); a failed write removes its temporary file, so
the previous version stays the one on disk. What lands there has the mode a plain open()
would give it under the umask, whatever library wrote it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from typing import Iterator

from .errors import Error

# Errors that mean "the disk is full" whatever the filesystem reports: no space, quota, or a
# file-size limit (RLIMIT_FSIZE) hit mid-write.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class PathError(Error):
    """A path that cannot be used as asked: one read from a file that points outside the
    directory it must stay in, or an output path where a file stands for a folder (or the
    reverse). The message is one line."""


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


_held: dict[str, int] = {}  # lock files this process holds -> how deeply nested


class PidLock:
    """One process at a time in a folder (a run directory, a cache). The lock file holds
    the owner's pid; a lock whose process is gone (killed, crashed, rebooted) is stale and
    taken over, so no one has to find and delete it by hand. Taken again by the process
    that holds it, it nests (`train` building its cache inside its own run.dir) instead of
    refusing its own holder.

        with PidLock(path, "cache folder X", "wait for it or ...", CacheError): ...
    """

    WRITE_GRACE = 2.0  # seconds an empty lock file is taken as one whose owner is writing

    def __init__(self, path: str, what: str, fix: str, error: type = Error):
        self.path, self.what, self.fix, self.error = path, what, fix, error
        self._key = os.path.realpath(path)

    def holder(self) -> int | None:
        """The pid in the lock file; None when it is empty or gone, 0 when unreadable."""
        try:
            with open(self.path) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return None
        except OSError:
            return 0
        if not text:
            return None
        return int(text) if text.isdigit() else 0

    def __enter__(self):
        if self._key in _held:
            _held[self._key] += 1
            return self
        deadline = time.monotonic() + self.WRITE_GRACE
        for _ in range(200):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                pid = self.holder()
                if pid is None and time.monotonic() < deadline:
                    time.sleep(0.02)  # created an instant ago: its pid is on the way
                    continue
                if pid and pid != os.getpid() and pid_alive(pid):
                    raise self.error(f"{self.what} is in use by process {pid}; {self.fix}")
                # Stale (its process is gone, or the pid is ours from an earlier life of
                # this pid): removed only if still the one just read, not a newcomer's.
                if self.holder() == pid:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            _held[self._key] = 1
            return self
        raise self.error(f"cannot take the lock {self.path}; remove it if nothing is using "
                         f"{self.what}")

    def __exit__(self, *exc):
        _held[self._key] -= 1
        if _held[self._key] == 0:
            del _held[self._key]
            with contextlib.suppress(OSError):
                os.remove(self.path)


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


def umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere it can only be read by setting
    it, which for an instant would apply to files other threads create, so that is the
    fallback."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str) -> None:
    """Give `path`, and everything under it if it is a directory, the mode open() and mkdir
    give under the umask. Libraries pick their own: safetensors writes 0600 (a cache built
    by one user would be unreadable to a teammate's run), MLX 0644 (a group-writable umask
    would not apply)."""
    mask = umask()

    def fix(p: str) -> None:
        st = os.lstat(p)
        # A filesystem without Unix modes (some network and exFAT mounts) may refuse chmod:
        # the write itself succeeded, so it stands.
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(st.st_mode):
                os.chmod(p, 0o777 & ~mask)
            elif stat.S_ISREG(st.st_mode):  # executable bits a writer set on purpose stay
                os.chmod(p, (0o666 | (st.st_mode & 0o111)) & ~mask)

    fix(path)
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, names in os.walk(path):
            for name in dirs + names:
                fix(os.path.join(root, name))


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path to write; rename it to `path` on success, delete it on error."""
    tmp = tmp_name(path)
    try:
        yield tmp
        follow_umask(tmp)
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
        follow_umask(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = _write_failed(e, path)
        if err is e:
            raise
        raise err from None


def file_in_the_way(path: str) -> str | None:
    """`path` or its nearest existing ancestor when that is not a directory."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent
    return None if os.path.isdir(p) else p


def check_dir(path: str, what: str, fix: str | None = None) -> str:
    """Refuse an output folder that a file stands in the way of (the folder itself, or one
    of its parents), before any work that would end by writing there."""
    blocker = file_in_the_way(path)
    if blocker is None:
        return path
    fix = fix or f"point {what} at a folder, or move the file away"
    if os.path.abspath(path) == blocker:
        raise PathError(f"{what} {path} is a file, not a folder; {fix}")
    raise PathError(f"{what} {path} cannot be a folder: {blocker} is a file; {fix}")


def ensure_dir(path: str, what: str, fix: str | None = None) -> str:
    """os.makedirs for an output folder, with a file in its place a one-line error."""
    check_dir(path, what, fix)
    os.makedirs(path, exist_ok=True)
    return path


def check_file(path: str, what: str, fix: str | None = None) -> str:
    """Refuse an output file name that is a folder, or whose folder a file stands in for."""
    if os.path.isdir(path):
        raise PathError(f"{what} {path} is a folder, not a file; "
                        f"{fix or f'point {what} at a file name, or move the folder away'}")
    blocker = file_in_the_way(os.path.dirname(os.path.abspath(path)))
    if blocker is not None:
        raise PathError(f"{what} {path} cannot be written: {blocker} is a file, not a "
                        f"folder; {fix or f'point {what} elsewhere, or move the file away'}")
    return path


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


# ---------------------------------------------------------------- remembered file hashes

HASH_MEMO_ENV = "MLXDISTILL_HASH_MEMO"
RACY_NS = 2_000_000_000  # mtime granularity of the coarsest filesystems in use (FAT: 2 s)
_log = logging.getLogger(__name__)


def hash_memo_path() -> str:
    """The per-user file of remembered hashes: $MLXDISTILL_HASH_MEMO, else under
    $XDG_CACHE_HOME (~/.cache)."""
    if os.environ.get(HASH_MEMO_ENV):
        return os.environ[HASH_MEMO_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mlxdistill", "weight-hashes.json")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_memo(path: str) -> dict:
    """The memo, or {} when it is missing or damaged: it only saves time, never decides."""
    try:
        with open(path) as f:
            memo = json.load(f)
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _stamp(st: os.stat_result) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def remembered_sha256(paths: list[str]) -> list[str]:
    """sha256 of each file, read once and then remembered by (real path, size, mtime, inode)
    in a per-user memo, so a multi-gigabyte teacher is hashed on its first use and costs one
    stat per file afterwards. As with git and rsync, a file rewritten with its size and
    mtime restored (and the same inode) is taken as unchanged. A file modified within the
    last couple of seconds, or while being hashed, is hashed but not remembered: within the
    filesystem's mtime granularity a rewrite could keep the stamp."""
    memo_path = hash_memo_path()
    memo = _read_memo(memo_path)
    out, fresh = [], {}
    for p in paths:
        real = os.path.realpath(p)
        stamp = _stamp(os.stat(real))
        hit = memo.get(real)
        if isinstance(hit, list) and len(hit) == 4 and hit[:3] == stamp \
                and isinstance(hit[3], str):
            out.append(hit[3])
            continue
        digest = sha256_file(real)
        out.append(digest)
        if _stamp(os.stat(real)) == stamp and time.time_ns() - stamp[1] > RACY_NS:
            fresh[real] = stamp + [digest]
    if fresh:
        _remember(memo_path, fresh)
    return out


def _remember(memo_path: str, fresh: dict) -> None:
    memo = _read_memo(memo_path)  # again: another process may have added entries meanwhile
    memo = {k: v for k, v in memo.items() if os.path.exists(k)}  # forget deleted files
    memo.update(fresh)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(memo_path)), exist_ok=True)
        atomic_json(memo_path, memo, indent=None)
    except OSError as e:  # a read-only home costs the next run a re-hash, nothing else
        _log.debug("cannot remember file hashes in %s: %s", memo_path, e)
