"""One writer per folder: a second `cache` (or a `train` that would build the cache) into a
folder in use is refused naming the holder; a dead holder's lock is taken over."""

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import tiny_overrides

from mlxdistill import api, cache, files
from mlxdistill.cli import main
from mlxdistill.config import load_config
from mlxdistill.shards import CacheError


@pytest.fixture
def live_pid():
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def dead_pid():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_cache_into_a_busy_folder_names_the_holder(tiny, tmp_path, live_pid):
    (tmp_path / "cache").mkdir()
    lock = tmp_path / "cache" / ".lock"
    lock.write_text(str(live_pid))
    res = CliRunner().invoke(main, ["cache", "-q", *tiny_overrides(tiny, tmp_path)])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and f"in use by process {live_pid}" in err[0], res.stderr
    assert "cache.dir" in err[0]
    assert not (tmp_path / "cache" / "manifest.json").exists()  # no teacher pass ran
    assert lock.read_text() == str(live_pid)  # the holder's lock is left alone


def test_stale_cache_lock_is_taken_over(tiny, tmp_path, dead_pid):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ".lock").write_text(str(dead_pid))
    res = CliRunner().invoke(main, ["cache", "-q", *tiny_overrides(tiny, tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cache" / "manifest.json").exists()
    assert not (tmp_path / "cache" / ".lock").exists()  # released when done


def test_train_building_its_cache_takes_the_cache_lock(tiny, tmp_path, live_pid):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ".lock").write_text(str(live_pid))
    cfg = load_config(None, tiny_overrides(tiny, tmp_path, **{"train.iters": 2}))
    with pytest.raises(CacheError, match=f"in use by process {live_pid}"):
        api.fit(cfg, quiet=True, log=lambda m: None)
    assert not (tmp_path / "run" / ".lock").exists()  # its run lock was released


def test_train_with_the_cache_inside_its_run_dir_does_not_lock_itself(tiny, tmp_path):
    """cache.dir = run.dir: both locks are one file, taken twice by one process."""
    run = str(tmp_path / "run")
    cfg = load_config(None, tiny_overrides(tiny, tmp_path, **{"train.iters": 2,
                                                              "cache.dir": run}))
    assert api.fit(cfg, quiet=True, log=lambda m: None)
    assert os.path.isfile(os.path.join(run, "manifest.json"))
    assert not os.path.exists(os.path.join(run, ".lock"))


def test_pid_lock_nests_in_its_holder_and_refuses_others(tmp_path, live_pid):
    path = str(tmp_path / ".lock")
    with files.PidLock(path, "thing", "fix it", CacheError):
        with files.PidLock(path, "thing", "fix it", CacheError):
            pass
        assert open(path).read() == str(os.getpid())  # the inner exit kept it
    assert not os.path.exists(path)
    with open(path, "w") as f:
        f.write(str(live_pid))
    with pytest.raises(CacheError, match=f"^thing is in use by process {live_pid}; fix it$"):
        with files.PidLock(path, "thing", "fix it", CacheError):
            pass


def test_empty_lock_is_waited_for_then_taken(tmp_path, monkeypatch):
    """An empty lock file is one whose owner is writing its pid: it is left alone that
    long, and taken over when it stays empty (its owner died before writing)."""
    path = tmp_path / ".lock"
    path.write_text("")
    monkeypatch.setattr(files.PidLock, "WRITE_GRACE", 0.3)
    import time

    t0 = time.monotonic()
    with files.PidLock(str(path), "thing", "fix it"):
        assert time.monotonic() - t0 >= 0.3
        assert path.read_text() == str(os.getpid())


def test_only_rank_0_takes_the_cache_lock(tiny, tmp_path, live_pid, monkeypatch):
    """Under mlx.launch the other ranks build alongside rank 0 without the lock, which
    rank 0 holds for all of them."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ".lock").write_text(str(live_pid))
    cfg = load_config(None, tiny_overrides(tiny, tmp_path))
    monkeypatch.setattr(cache, "_build", lambda *a: {"built": True})

    class Rank:
        def __init__(self, main):
            self.main = main

    assert cache.build(cfg, world=Rank(False)) == {"built": True}
    with pytest.raises(CacheError, match=str(live_pid)):
        cache.build(cfg, world=Rank(True))
