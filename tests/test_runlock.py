"""One writer per run directory (cdm.runlock), and files written with the user's umask (atomic_write)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import cdm.runlock as runlock_module
from cdm.files import atomic_write, current_umask
from cdm.runlock import LOCK_FILE, RunLockedError, run_lock

# The holder runs in another process that loads runlock.py and the errors module it stands on, without
# the package's __init__ (no torch: it starts in milliseconds), takes the lock, says so, and holds it
# until told to leave (or is killed).
HOLDER = """
import importlib.util, pathlib, sys, types
path = pathlib.Path(sys.argv[1])
pkg = types.ModuleType("cdm"); pkg.__path__ = [str(path.parent)]; sys.modules["cdm"] = pkg
spec = importlib.util.spec_from_file_location("cdm.runlock", path)
m = importlib.util.module_from_spec(spec); sys.modules["cdm.runlock"] = m; spec.loader.exec_module(m)
assert "torch" not in sys.modules
with m.run_lock(sys.argv[2], sys.argv[3]):
    print("locked", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


def start_holder(directory: Path, what: str = "training") -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, runlock_module.__file__, str(directory), what],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line == "locked\n", (line, p.stderr.read() if p.poll() is not None else "")
    return p


def test_another_process_is_refused_until_the_holder_exits(tmp_path):
    run = tmp_path / "runs" / "base"  # created by the lock
    holder = start_holder(run, "training")
    try:
        with pytest.raises(RunLockedError) as e:
            with run_lock(run, "training"):
                pass
        msg = str(e.value)
        assert msg == (f"{run} is in use by another cdm process (pid {holder.pid}, training since "
                       f"{msg.split(' since ')[1].split(')')[0]}): wait for it to finish, or use another --out"), msg
        assert isinstance(e.value, ValueError)
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}, training"):  # a shared lock too
            run_lock(run, "sampling", shared=True).acquire()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "released\n"
        assert holder.wait(5) == 0
    finally:
        holder.kill()
        holder.wait()
    with run_lock(run, "training") as lock:  # released on a normal exit
        assert lock.held
    assert (run / LOCK_FILE).exists() and not lock.held


def test_the_lock_dies_with_a_killed_holder(tmp_path):
    holder = start_holder(tmp_path, "sampling")
    with pytest.raises(RunLockedError, match=f"pid {holder.pid}, sampling since"):
        run_lock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(5) == -signal.SIGKILL
    with run_lock(tmp_path, "training"):  # no stale lock to clean up
        pass


def test_the_same_process_takes_it_again_after_release_and_not_before(tmp_path):
    with run_lock(tmp_path) as first:
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}, training"):  # another open file: refused
            run_lock(tmp_path).acquire()
    assert not first.held
    with run_lock(tmp_path, "training") as again:
        assert again.held
    first.release()  # releasing twice is harmless
    assert (tmp_path / LOCK_FILE).read_text() == ""  # no leftover record


def test_an_exception_inside_releases_the_lock(tmp_path):
    with pytest.raises(KeyError):
        with run_lock(tmp_path):
            raise KeyError("boom")
    with run_lock(tmp_path):
        pass


def test_disabled_takes_nothing(tmp_path):
    run = tmp_path / "run"
    with run_lock(tmp_path / "held"):
        with run_lock(tmp_path / "held", enabled=False) as lock:  # rank != 0: never refused
            assert not lock.held
    with run_lock(run, enabled=False):
        assert not run.exists()  # not even the directory


def test_shared_holders_coexist_and_exclude_a_writer(tmp_path):
    with run_lock(tmp_path, "sampling", shared=True), run_lock(tmp_path, "sampling", shared=True):
        with pytest.raises(RunLockedError, match="sampling since"):
            run_lock(tmp_path, "training").acquire()
    with run_lock(tmp_path, "training"):
        with pytest.raises(RunLockedError, match="training since"):
            run_lock(tmp_path, "sampling", shared=True).acquire()


def test_agree_makes_every_rank_fail_when_rank_0_is_refused(tmp_path):
    calls = []

    def all_true(ok: bool) -> bool:  # one process's view of World.all_true, where another rank was refused
        calls.append(ok)
        return False

    with pytest.raises(RunLockedError, match="rank 0"):
        run_lock(tmp_path, enabled=False, agree=all_true).acquire()
    lock = run_lock(tmp_path, enabled=True, agree=all_true)
    with pytest.raises(RunLockedError, match="rank 0"):  # rank 0 got it, another rank failed: it lets go
        lock.acquire()
    assert not lock.held and calls == [True, True]
    with run_lock(tmp_path):
        with pytest.raises(RunLockedError, match="in use by another cdm process"):
            run_lock(tmp_path, agree=lambda ok: calls.append(ok) or ok).acquire()
    assert calls[-1] is False
    with run_lock(tmp_path, agree=lambda ok: ok) as ok:
        assert ok.held


def test_an_unreadable_record_still_gives_a_clear_refusal(tmp_path):
    with run_lock(tmp_path):
        (tmp_path / LOCK_FILE).write_text("not json")
        with pytest.raises(RunLockedError, match=r"^\S+ is in use by another cdm process: wait for it to finish"):
            run_lock(tmp_path).acquire()


# ----------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write(tmp_path / "new.txt", lambda tmp: Path(tmp).write_text("x"))
        (tmp_path / "old.txt").write_text("old")
        os.chmod(tmp_path / "old.txt", 0o600)
        atomic_write(tmp_path / "old.txt", lambda tmp: Path(tmp).write_text("new"))  # replaced: a new file's mode
    finally:
        os.umask(old)
    for name in ["new.txt", "old.txt"]:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert sorted(os.listdir(tmp_path)) == ["new.txt", "old.txt"]


def test_the_umask_fallback_restores_it(monkeypatch):
    import builtins

    real_open = builtins.open

    def no_proc(path, *a, **kw):
        if str(path) == "/proc/self/status":
            raise FileNotFoundError(path)
        return real_open(path, *a, **kw)

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(builtins, "open", no_proc)
        assert current_umask() == 0o027
        monkeypatch.undo()
        assert current_umask() == 0o027  # left as it was
    finally:
        os.umask(old)


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch):
    import errno

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(runlock_module.fcntl, "flock", no_locks)
    with pytest.warns(runlock_module.RunLockWarning, match="cannot lock files"):
        with run_lock(tmp_path) as lock:
            assert not lock.held
