"""The boundary between cdm and its user: which exceptions are the user's to fix (printed as one
line ``cdm: error: ...``, exit status 2), and how an OS error on a file reads. Everything else is
a bug and keeps its traceback.

Every module's own error (``ConfigError``, ``DataError``, ``CheckpointError``, ...) derives from
:class:`CdmError` (and from ``ValueError`` or ``RuntimeError``, as before), so this module, the
floor they all stand on, imports nothing of cdm's.
"""

from __future__ import annotations

import argparse
import errno


class CdmError(Exception):
    """An error the user can fix: its message is one line that says what is wrong and what to do."""


class DataError(CdmError, ValueError):
    """A data set could not be read; the message says what to do (raised by the readers of
    :mod:`cdm.readers`, the data sets of :mod:`cdm.data` and everything that loads one)."""


USER_ERRORS = (CdmError,)


# What an OS error on a file cdm reads or writes says to do, by errno.
_IS_A_FILE = "the path is a file, not a directory: name a directory (e.g. another --out)"
_OS_ERROR_HINTS = {
    errno.EEXIST: ("cannot create a directory", _IS_A_FILE),
    errno.ENOTDIR: ("cannot use the path", "a part of it is a file, not a directory: name a directory (e.g. another "
                                           "--out)"),
    errno.EISDIR: ("cannot open a file", "the path is a directory; give a file"),
    errno.ENOENT: ("cannot open a file", "check the path"),
    errno.EACCES: ("cannot read or write", "check its permissions, or choose another path"),
    errno.EPERM: ("cannot read or write", "check its permissions, or choose another path"),
    errno.EROFS: ("cannot write", "the file system is read-only; choose another path"),
    errno.ENOSPC: ("cannot write", "free some disk space and re-run (training resumes from its last checkpoint)"),
    errno.EDQUOT: ("cannot write", "the disk quota is used up; free some space and re-run"),
    errno.ENAMETOOLONG: ("cannot use the path", "choose a shorter path"),
}


def os_error_hint(e: OSError, default: str = "") -> str:
    """What to do about ``e``, by its errno (``default`` for one without advice): a full disk is
    freed, a read-only or forbidden path replaced, a file where a directory belongs renamed."""
    return _OS_ERROR_HINTS.get(e.errno, ("", default))[1] or default


def os_error_message(e: OSError, command: str) -> str:
    """One line for an OS error on a file: what failed, the system's reason, the path, what to do."""
    what, hint = _OS_ERROR_HINTS.get(e.errno, ("a file operation failed", ""))
    reason = e.strerror or str(e) or type(e).__name__
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    line = f"{command}: {what}: {reason}" + (f" ({paths})" if paths else "") + (f"; {hint}" if hint else "")
    return line.replace("\n", " ")  # one line, whatever the path holds


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a wrong flag is one line like every other error (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"cdm: error: {message} (see '{self.prog} --help')\n")


def warning_line(message, category, filename, lineno, line=None) -> str:
    return f"cdm: warning: {message}\n"
