"""Writing files so that a crash never leaves half of one: :func:`atomic_write` (temporary file, fsync,
rename, the mode a plain ``open`` would give), and what to tell the user when a write fails. The
floor every module that writes results, reports or checkpoints stands on."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from safetensors import SafetensorError

from .errors import os_error_hint


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows: from
    ``/proc/self/status`` (Linux >= 4.7). Elsewhere it is set and restored under a lock, set to
    ``0o077`` meanwhile, so a file another thread creates in that instant is private, not public."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync the file, then rename it over ``path`` (an I/O failure, a
    full disk say, is an ``OSError``, whichever library wrote). The file gets the
    mode a plain ``open(path, "w")`` would give it (``0o666`` less the umask: ``0o644`` under the
    usual umask 022), not the ``0o600`` of the temporary file it is written as."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            try:
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
            except OSError:  # a file system without modes (FAT, some FUSE/SMB mounts): keep what it gave
                pass
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, SafetensorError):  # safetensors reports I/O failures (a full disk) as its own type
            raise OSError(f"{e} ({path})") from e
        raise


def write_hint(e: OSError) -> str:
    """What to do when writing a file failed with ``e`` (by its errno; a full disk when unknown)."""
    return os_error_hint(e, "free disk space, then re-run the same command to resume")
