"""One writer per run directory: a lock that refuses a second ``cdm`` process with a clear message.

Two ``cdm train --out RUN`` commands on the same ``RUN`` would overwrite each other's checkpoints,
trim each other's logs and delete each other's half-written files. :func:`run_lock` prevents it::

    with run_lock(out, "training"):
        ...  # the only cdm process writing into `out`

It creates ``out`` if needed, opens ``out/.lock`` and takes an exclusive, non-blocking
``fcntl.flock`` on it. If another process holds it, :class:`RunLockedError` (a ``ValueError``)
says who::

    RUN is in use by another cdm process (pid 4121, training since 2025-06-01 14:03:12): wait for
    it to finish, or use another --out

How it is released
    ``flock`` locks belong to the open file, so the kernel drops the lock when the holder closes it:
    on leaving the ``with`` block, and whenever the process ends, however it ends -- an exception,
    Ctrl-C, or ``SIGKILL``/the OOM killer. There is no stale lock to clean up by hand, and the lock
    file itself is never deleted (deleting it would let two processes lock two different files of
    the same name). One caveat: a child *forked* while the lock is held (``os.fork``, a
    ``multiprocessing`` "fork" worker) shares the open file, so the lock lasts until that child
    exits or closes it too.

What the lock file holds
    One JSON line written by the holder -- pid, host name, purpose (``what``) and start time -- read,
    best effort, only to word the refusal. The file's contents mean nothing without the lock:
    ``flock`` alone decides who holds it, so a leftover file never blocks anyone.

Under ``torchrun``
    The processes of ONE run share its directory, so they must not lock each other out: only rank 0
    takes the lock (``enabled=(rank == 0)``); ``enabled=False`` takes nothing and never raises. Pass
    ``agree=world.all_true`` (any callable that returns True on every process iff it was passed
    True on every process; it is called once, on every process, also a barrier) so that when rank 0
    is refused every other rank raises too, instead of waiting for it in the next collective::

        with run_lock(out, "training", enabled=w.is_main, agree=w.all_true):
            ...

Shared locks
    ``shared=True`` takes a shared lock (``LOCK_SH``): any number of shared holders coexist -- e.g.
    the processes and machines that each sample some shards of one sharded sample run -- while an
    exclusive holder (training) and the shared ones refuse each other.

Limitations
    ``flock`` is only as good as the file system's support for it. On a local file system it is
    exact. On NFS it may be advisory only or unsupported: Linux NFS clients emulate it with NFS
    byte-range locks (so it works across machines when the server's lock manager runs), but a
    ``nolock`` or ``local_lock=flock`` mount makes it local to each machine, so processes on two
    machines would not see each other's lock; Lustre needs the ``flock`` mount option, and other
    network or FUSE file systems vary. Where the file system refuses ``flock`` outright (``ENOLCK``,
    ``ENOSYS``, ``EOPNOTSUPP``, ``EINVAL``), :func:`run_lock` warns (:class:`RunLockWarning`) and
    goes on unlocked rather than refusing to run; where it silently accepts a lock it does not
    share between machines, nothing can tell. On systems without ``fcntl`` (Windows) it likewise
    warns and locks nothing. The lock is advisory: it stops ``cdm`` processes that take it, not
    other programs writing into the directory.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Callable

from .errors import CdmError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL,
                getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
_CONTENDED = {errno.EWOULDBLOCK, errno.EAGAIN}


class RunLockedError(CdmError, ValueError):
    """Another cdm process is writing into the run directory; the message says which and what to do."""


class RunLockWarning(UserWarning):
    """The run directory's file system cannot lock files: the run goes on unlocked."""


def _describe(info: dict | None) -> str:
    """``" (pid N, training since T)"`` from the holder's record, or ``""`` when unreadable."""
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return ""
    who = f"pid {info['pid']}"
    host = info.get("host")
    if isinstance(host, str) and host and host != socket.gethostname():
        who += f" on {host}"
    what = info.get("what") if isinstance(info.get("what"), str) else "running"
    started = info.get("started")
    since = ""
    if isinstance(started, (int, float)):
        since = " since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    return f" ({who}, {what}{since})"


def _read_info(fd: int, tries: int = 5) -> dict | None:
    """The holder's record, best effort: it may not have written it yet, so try a few times."""
    for i in range(tries):
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace").lstrip()
            if text:
                info, _ = json.JSONDecoder().raw_decode(text)  # ignores anything after the record
                return info if isinstance(info, dict) else None
        except (OSError, ValueError):
            pass
        if i + 1 < tries:
            time.sleep(0.02)
    return None


class RunLock:
    """The lock on one run directory; see the module's docstring. Use :func:`run_lock`."""

    def __init__(self, directory: str | Path, what: str = "training", *, enabled: bool = True,
                 shared: bool = False, agree: Callable[[bool], bool] | None = None):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.what = what
        self.enabled = enabled
        self.shared = shared
        self.agree = agree
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def _refusal(self, info: dict | None) -> RunLockedError:
        return RunLockedError(f"{self.directory} is in use by another cdm process{_describe(info)}: wait for it to "
                              f"finish, or use another --out")

    def _acquire(self) -> None:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        if fcntl is None:
            warnings.warn(f"cannot lock {self.directory} on this system (no fcntl): make sure no other cdm "
                          f"process writes into it", RunLockWarning, stacklevel=3)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        writable = True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except PermissionError:  # another user's lock file in a shared directory: flock needs no write access
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            writable = False
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            try:
                if e.errno in _CONTENDED:
                    raise self._refusal(_read_info(fd)) from None
                if e.errno in _UNSUPPORTED:
                    warnings.warn(f"the file system of {self.directory} cannot lock files ({e.strerror}); going on "
                                  f"unlocked: make sure no other cdm process writes into it", RunLockWarning,
                                  stacklevel=3)
                    return
                raise
            finally:
                os.close(fd)
        self._fd = fd
        if writable:
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                                 "started": time.time(), "shared": self.shared}) + "\n"
            try:
                data = record.encode()
                os.pwrite(fd, data, 0)
                if not self.shared:  # shared holders may be writing theirs too: leave the length alone
                    os.ftruncate(fd, len(data))
            except OSError:
                pass  # the record only words a refusal

    def acquire(self) -> RunLock:
        """Take the lock (see :func:`run_lock`); raises :class:`RunLockedError` if another process has it."""
        err: BaseException | None = None
        if self.enabled:
            try:
                self._acquire()
            except BaseException as e:  # every process must reach `agree`, whatever went wrong here
                err = e
        if self.agree is not None and not self.agree(err is None) and err is None:
            self.release()
            raise RunLockedError(f"the process that locks {self.directory} (rank 0) could not lock it; see its "
                                 f"message")
        if err is not None:
            raise err
        return self

    def release(self) -> None:
        """Drop the lock (if held); the lock file stays, emptied. Safe to call more than once."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if not self.shared:
                os.ftruncate(fd, 0)  # so that no later reader takes this record for its holder's
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the file drops the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_lock(directory: str | Path, what: str = "training", *, enabled: bool = True, shared: bool = False,
             agree: Callable[[bool], bool] | None = None) -> RunLock:
    """A context manager that makes this process the only cdm writer of ``directory``.

    On entry it creates ``directory`` (and its parents) if needed and takes an exclusive,
    non-blocking ``flock`` on ``directory/.lock``, recording this process's pid, host name, ``what``
    (a word for the refusal: ``"training"``, ``"sampling"``) and start time in it; if another
    process holds the lock it raises :class:`RunLockedError` at once (it never waits). On exit, and
    when the process dies (even by ``SIGKILL``), the lock is released; nothing is deleted.

    ``enabled=False`` takes nothing (for the ranks other than 0 under ``torchrun``: one run, one
    lock). ``agree``, e.g. ``World.all_true``, is called on every process with whether this one
    succeeded, so that all raise when rank 0 is refused. ``shared=True`` takes a shared lock that
    other shared holders can hold too, refused only by (and refusing) an exclusive holder.
    File-system limitations (NFS): see the module's docstring.
    """
    return RunLock(directory, what, enabled=enabled, shared=shared, agree=agree)


def holding_lock(what: str, directory: str = "out_dir"):
    """Decorate a function that writes into the directory its argument ``directory`` names: each call
    runs holding that directory's run lock (:func:`run_lock`), so a second writer is refused at once."""
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            with run_lock(signature.bind(*args, **kwargs).arguments[directory], what):
                return fn(*args, **kwargs)
        return locked
    return decorate
