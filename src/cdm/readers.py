"""Reading the arrays a data set is stored in: Fashion-MNIST's IDX files (optionally gzipped) and
``.npz`` files of ``images`` (and ``labels``) — whole, or only their headers (shapes and labels,
for a plan), each checked with one line of advice (:class:`cdm.errors.DataError`) for every way the
file can be unusable. :mod:`cdm.data` builds data sets from them."""

from __future__ import annotations

import gzip
import hashlib
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

MAX_CLASSES = 100_000  # labels of an .npz above this are surely not class indices


def _open_maybe_gz(path: Path) -> bytes:
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        return f.read()


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into an array."""
    try:
        raw = _open_maybe_gz(path)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}; re-install the data set") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    n = int(np.prod(dims))
    if len(raw) - start != n:
        raise DataError(f"{path} is truncated or corrupt: header says {dims} ({n} bytes), "
                        f"file holds {len(raw) - start}; re-install the data set")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).exists():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install it with "
                    f"'apt-get install dataset-fashion-mnist', or set data.path to the folder "
                    f"holding the IDX files")


def fashion_mnist_arrays(root: str | os.PathLike, splits: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels uint8 [N], which of ``splits`` each came from uint8 [N])``:
    the ``splits`` one after the other."""
    parts = [load_fashion_mnist(root, sp) for sp in splits]
    which = np.concatenate([np.full(len(p[0]), i, np.uint8) for i, p in enumerate(parts)])
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), which


def npz_keys(images: Tensor) -> list[str]:
    """The held-out keys of an ``.npz``'s images ``[N, C, H, W]`` as stored: a SHA-256 of each one's bytes."""
    return [hashlib.sha256(im.numpy().tobytes()).hexdigest() for im in images]


def load_fashion_mnist(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels uint8 [N])`` of the ``train`` or ``test`` split."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"data.split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST files in {root} disagree: images {images.shape}, labels {labels.shape}")
    return images, labels


def channels_last(shape) -> bool:
    """Whether an ``.npz``'s ``images`` of ``shape`` are ``[N, H, W, C]`` (else ``[N, C, H, W]`` or ``[N, H, W]``)."""
    return len(shape) == 4 and shape[-1] in (1, 3) and shape[1] not in (1, 3)


def npz_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray | None]:
    """``(shape of the 'images' array, 'labels' or None)`` of an ``.npz``, without reading its images
    (the array's header only), for a plan; every way the file can be unusable is a :class:`DataError`."""
    if not Path(path).is_file():
        raise DataError(f"data file {path} does not exist; set data.path to an .npz with an 'images' array")
    try:
        with zipfile.ZipFile(path) as zf:
            if "images.npy" not in zf.namelist():
                raise DataError(f"{path} has no 'images' array (found {[n[:-4] for n in zf.namelist()]})")
            with zf.open("images.npy") as f:
                fmt = np.lib.format
                read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
                shape, _, dtype = read(f)
        with np.load(path, allow_pickle=False) as z:
            labels = z["labels"] if "labels" in z else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"cannot read {path} ({e}); is it a complete .npz file?") from e
    check_npz(path, tuple(shape), dtype, labels)
    return tuple(shape), labels


def check_npz(path, shape: tuple[int, ...], dtype: np.dtype, labels: np.ndarray | None) -> None:
    """Refuse an ``.npz`` whose ``images`` (of ``shape`` and ``dtype``) or ``labels`` cdm cannot train on."""
    if dtype != np.uint8:
        raise DataError(f"{path}: 'images' must be uint8 in [0, 255], got {dtype}")
    if len(shape) >= 1 and shape[0] == 0:
        raise DataError(f"{path} holds no images ('images' has shape {list(shape)}); "
                        f"set data.path to an .npz with at least one image")
    c = (shape[-1] if channels_last(shape) else shape[1]) if len(shape) == 4 else 1
    if len(shape) not in (3, 4) or c not in (1, 3) or min(shape[1:]) < 1:
        raise DataError(f"{path}: 'images' must be [N, H, W], [N, H, W, C] or [N, C, H, W] with "
                        f"C in (1, 3), got {list(shape)}")
    if labels is None:
        return
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise DataError(f"{path}: 'labels' must be a 1-d array of integer class indices, got "
                        f"{labels.dtype} of shape {list(labels.shape)}")
    if labels.size and labels.max() >= MAX_CLASSES:
        raise DataError(f"{path}: 'labels' must be class indices 0..K-1, got a label of {labels.max()}")
    if len(labels) != shape[0]:
        raise DataError(f"{path}: {shape[0]} images but {len(labels)} labels")


def load_npz(path: str | os.PathLike) -> tuple[Tensor, Tensor | None]:
    """``(images uint8 [N, C, H, W], labels int64 [N] or None)`` from an ``.npz`` (never unpickled)."""
    if not Path(path).is_file():
        raise DataError(f"data file {path} does not exist; set data.path to an .npz with an 'images' array")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z:
                raise DataError(f"{path} has no 'images' array (found {list(z.keys())})")
            images = z["images"]
            labels = z["labels"] if "labels" in z else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"cannot read {path} ({e}); is it a complete .npz file?") from e
    check_npz(path, images.shape, images.dtype, labels)
    x = torch.from_numpy(images.copy())
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2) if channels_last(x.shape) else x
    y = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    return x.contiguous(), y
