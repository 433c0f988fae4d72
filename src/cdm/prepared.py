"""Prepared data sets: written once at the cascade's data resolution, read by index.

``cdm prepare`` (:mod:`cdm.prepare`) writes a data set once, already at its data resolution, as a
folder that training and evaluation read lazily, one batch's rows at a time::

    manifest.json   what it is: format and version, the source, resolution, fit, channels, class
                    names, how its held-out split is decided, the number of images and a content
                    fingerprint (and, while it is being written, ``"complete": false``)
    images.u8       uint8 [N, C, R, R], C-order, no header: row i is image i
    labels.i64      int64 [N], little-endian
    split.bin       [N]: the held-out rule's data, as the manifest's ``split.rule`` says:
                    "hash": uint64 little-endian, each image's :func:`cdm.data.held_out_key`
                    (held out when it is below ``data.held_out * 2^64``: the folder and ``.npz``
                    rule, for any fraction); "source": uint8, 1 for the source's own test split
                    (Fashion-MNIST's)

A plain array file needs no dependency, is read with ``pread`` (no decoding, no page of the file
in the process's own memory) and sits on disk at exactly its pixels' size; docs/SCALE.md gives the
measurements it was chosen by. Labels and the split (16 bytes per image) are the only arrays a
reader holds in memory: 16 MB for a million images.

The fingerprint is a SHA-256 over the shape and, in the order written, each chunk of
:data:`CHUNK` source items' pixels, labels and split data: the same source prepared the same way
gives the same fingerprint on any machine, and a resumed preparation gives the one it would have
given uninterrupted. A training run records it (``data.fingerprint``) and resumes on a set with
the same fingerprint wherever it lies, never on another.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import CdmError

FORMAT = "cdm-prepared"
VERSION = 1  # files of a newer version are refused (a newer cdm wrote them)
MANIFEST, IMAGES, LABELS, SPLIT = "manifest.json", "images.u8", "labels.i64", "split.bin"
CHUNK = 1024  # source items per written chunk: the unit of resuming and of the fingerprint
SPLIT_DTYPES = {"hash": np.dtype("<u8"), "source": np.dtype("u1")}


class PreparedError(CdmError, ValueError):
    """A prepared data set is missing, incomplete, damaged or of another version; the message says
    what to do."""


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a prepared data set's manifest (complete or not)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class PreparedImages:
    """The uint8 ``[N, C, R, R]`` images of a prepared set (or of some of its rows), read from
    its file on demand: ``images[idx]`` reads just those rows (``idx`` an int, a slice, a bool
    mask or integer indices) into a new tensor. It is what an in-memory ``Tensor`` of images is
    to the code that indexes it (``len``, ``shape``, ``dtype``, indexing)."""

    dtype = torch.uint8

    def __init__(self, file: Path, count: int, image_shape: tuple[int, int, int], rows: np.ndarray | None = None,
                 fingerprint: str = ""):
        self.file, self.count, self.image_shape = Path(file), count, tuple(image_shape)
        self.rows = rows  # int64 [n]: which of the file's rows these are (None: all, in order)
        self.fingerprint = fingerprint  # the prepared set's content fingerprint
        self.row_bytes = int(np.prod(self.image_shape))
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.count if self.rows is None else len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.image_shape))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 4

    def _absolute(self, idx) -> np.ndarray:
        """The file's row numbers of ``idx`` (int64 ``[k]``)."""
        n = len(self)
        if isinstance(idx, Tensor):
            idx = idx.cpu().numpy()
        if isinstance(idx, slice):
            sel = np.arange(n, dtype=np.int64)[idx]
        else:
            a = np.asarray(idx)
            if a.dtype == np.bool_:
                if a.shape != (n,):
                    raise IndexError(f"a mask of shape {list(a.shape)} for {n} images")
                sel = np.nonzero(a)[0].astype(np.int64)
            else:
                sel = a.astype(np.int64).reshape(-1)
                if sel.size and (sel.min() < -n or sel.max() >= n):
                    raise IndexError(f"index out of range for {n} images")
                sel = np.where(sel < 0, sel + n, sel)
        return sel if self.rows is None else self.rows[sel]

    def subset(self, idx) -> "PreparedImages":
        """These images' rows ``idx``, still on disk (nothing is read)."""
        return PreparedImages(self.file, self.count, self.image_shape, self._absolute(idx), self.fingerprint)

    def __getitem__(self, idx) -> Tensor:
        if isinstance(idx, (int, np.integer)):
            return self.read(self._absolute(np.array([idx])))[0]
        return self.read(self._absolute(idx))

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own
            self._fd, self._pid = os.open(self.file, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, rows: np.ndarray) -> Tensor:
        """uint8 ``[len(rows), C, R, R]``: the file's rows ``rows``, runs of consecutive rows in
        one read each. Thread-safe (``pread`` keeps no file position)."""
        out = np.empty((len(rows), *self.image_shape), dtype=np.uint8)
        if len(rows):
            flat = out.reshape(len(rows), -1)
            breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
            for run in np.split(np.arange(len(rows)), breaks):
                i, j = int(run[0]), int(run[-1]) + 1
                _pread_into(self._descriptor(), memoryview(flat[i:j]).cast("B"), int(rows[i]) * self.row_bytes,
                            self.file)
        return torch.from_numpy(out)

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __getstate__(self) -> dict:  # pickled into a worker process: it opens the file itself
        return {**self.__dict__, "_fd": None, "_pid": -1}


def _pread_into(fd: int, buf: memoryview, offset: int, file: Path) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (short reads continued); a file that ends first is
    damaged."""
    done = 0
    while done < len(buf):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [buf[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            chunk = os.pread(fd, len(buf) - done, offset + done)
            buf[done:done + len(chunk)] = chunk
            got = len(chunk)
        if got <= 0:
            raise PreparedError(f"{file} ends at byte {offset + done}, inside an image: the prepared set is truncated; "
                                f"run cdm prepare again into another --out")
        done += got


@dataclass
class PreparedSet:
    """An opened prepared data set: its manifest, labels and split data in memory, images on disk."""

    path: Path
    manifest: dict
    labels: np.ndarray  # int64 [N]
    split: np.ndarray  # [N]: uint64 held-out keys ("hash") or uint8 test flags ("source")

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["shape"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def disk_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in (IMAGES, LABELS, SPLIT, MANIFEST))

    def images(self) -> PreparedImages:
        return PreparedImages(self.path / IMAGES, self.count, self.image_shape, fingerprint=self.fingerprint)

    def test_mask(self, cut: int) -> np.ndarray:
        """bool ``[N]``: the held-out (``test``) images, by the set's rule: for the ``hash`` rule those
        whose key is below ``cut`` (:func:`cdm.data.held_out_cut` of ``data.held_out``)."""
        if self.manifest["split"]["rule"] == "source":
            return self.split.astype(bool)
        return self.split < np.uint64(cut)


def read_manifest(path: Path) -> dict:
    """``path``'s manifest, checked to be a prepared set's of a version this cdm reads."""
    try:
        m = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise PreparedError(f"{path} is not a prepared data set (no {MANIFEST}); make one with "
                            f"'cdm prepare SOURCE --out {path} --resolution R'") from None
    except (OSError, ValueError) as e:
        raise PreparedError(f"cannot read {path / MANIFEST} ({e}); run cdm prepare again into another --out") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise PreparedError(f"{path / MANIFEST} is not a cdm prepared-data manifest")
    v = m.get("version")
    if not isinstance(v, int) or v > VERSION:
        raise PreparedError(f"{path} was prepared by a newer cdm (format version {v}; this cdm reads up to "
                            f"{VERSION}): upgrade cdm, or prepare the data again with this one")
    return m


def open_prepared(path: str | os.PathLike) -> PreparedSet:
    """Open a complete prepared data set, checking its files' sizes against its manifest; every
    problem is one :class:`PreparedError` line that says what to do."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise PreparedError(f"prepared data set {path} does not exist; make it with 'cdm prepare SOURCE --out {path} "
                            f"--resolution R'")
    m = read_manifest(path)
    if not m.get("complete"):
        raise PreparedError(f"the preparation of {path} did not finish: run the same cdm prepare command again to "
                            f"complete it (it resumes)")
    n, shape = int(m["count"]), tuple(m["shape"])
    sizes = {IMAGES: n * int(np.prod(shape)), LABELS: 8 * n,
             SPLIT: n * SPLIT_DTYPES[m["split"]["rule"]].itemsize}
    for name, want in sizes.items():
        f = path / name
        have = f.stat().st_size if f.exists() else None
        if have != want:
            raise PreparedError(f"{f} is {'missing' if have is None else f'{have:,} bytes'}, but the manifest's {n:,} "
                                f"images need {want:,}: the prepared set is damaged; run cdm prepare again into "
                                f"another --out")
    labels = np.fromfile(path / LABELS, dtype="<i8").astype(np.int64)
    split = np.fromfile(path / SPLIT, dtype=SPLIT_DTYPES[m["split"]["rule"]])
    return PreparedSet(path, m, labels, split)
