"""Data sets and the one anti-aliased resize that makes every stage's input.

A data set is loaded once into memory as ``uint8 [N, C, R, R]`` at the cascade's *data
resolution* ``R`` plus ``int64 [N]`` labels; each stage takes its own resolution from it with
:func:`downsample`, the same function that makes an SR stage's low-resolution input, so a base
stage is trained on exactly the distribution its SR stage is conditioned on.

Sources: Fashion-MNIST IDX files (Debian's ``dataset-fashion-mnist`` by default), a folder of
images with one sub-folder per class, and ``.npz`` arrays (``images`` ``[N, H, W(, C)]`` or
``[N, C, H, W]`` uint8 and optional ``labels``).

Every source has the same two splits, ``train`` and ``test`` (held out), and ``all`` for both:
Fashion-MNIST its own; a folder or ``.npz`` a deterministic one, :func:`held_out_mask`: an
image is held out when a hash of its identity (a file's path inside the folder; an ``.npz``
image's bytes) falls below ``data.held_out`` (default 10%). It does not depend on the order of
the files, the resolution or the machine, and adding images moves none of the others. Training,
evaluation, the sweep, the likelihood bound and the domain classifier all read these splits.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SPLITS = ("train", "test", "all")
MAX_CLASSES = 100_000  # labels of an .npz above this are surely not class indices
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(ValueError):
    """A data set could not be read; the message says what to do."""


@dataclass
class DataConfig:
    source: str = "fashion-mnist"  # "fashion-mnist", "folder" or "npz"
    path: str = ""  # "" = the default location (fashion-mnist only)
    split: str = "train"  # "train", "test" (held out) or "all" (module docstring)
    held_out: float = 0.1  # folder / npz: the fraction of images in the "test" split (module docstring)
    resolution: int = 32  # R, the data resolution the whole cascade shares
    fit: str = "pad"  # how to reach R from the native size: "pad" (centre, black) or "resize"
    channels: int = 0  # 0 = as stored; 1 or 3 converts
    classes: int = 0  # 0 = as found; else the data set must have this many (a plan uses it without the data)
    flip: bool = False  # random horizontal flip during training
    limit: int = 0  # use only the first `limit` images (0 = all)
    on_bad: str = "skip"  # folder: an unreadable image file is "skip"ped (a warning counts them) or "fail"s
    class_names: list[str] = field(default_factory=list)  # filled in when loaded

    def __post_init__(self) -> None:
        if self.source not in ("fashion-mnist", "folder", "npz"):
            raise DataError(f"data.source must be 'fashion-mnist', 'folder' or 'npz', got {self.source!r}")
        if self.fit not in ("pad", "resize"):
            raise DataError(f"data.fit must be 'pad' or 'resize', got {self.fit!r}")
        if self.channels not in (0, 1, 3):
            raise DataError(f"data.channels must be 0 (as stored), 1 (grayscale) or 3 (RGB), got {self.channels}")
        if self.split not in SPLITS:
            raise DataError(f"data.split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if not 0 < self.held_out < 1:
            raise DataError(f"data.held_out must lie in (0, 1), got {self.held_out}")
        if self.on_bad not in ("skip", "fail"):
            raise DataError(f"data.on_bad must be 'skip' or 'fail', got {self.on_bad!r}")
        if self.resolution < 1:
            raise DataError(f"data.resolution must be >= 1, got {self.resolution}")
        if self.limit < 0:
            raise DataError(f"data.limit must be >= 0 (0 = all images), got {self.limit}")
        if self.classes < 0:
            raise DataError(f"data.classes must be >= 0 (0 = as found in the data set), got {self.classes}")


@dataclass
class ImageSet:
    images: Tensor  # uint8 [N, C, R, R]
    labels: Tensor  # int64 [N]
    class_names: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------- pixels
def to_float(x: Tensor) -> Tensor:
    """uint8 ``[0, 255]`` -> float ``[-1, 1]``."""
    return x.float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """float ``[-1, 1]`` -> uint8 ``[0, 255]`` (clamped, rounded)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def downsample(x: Tensor, size: int) -> Tensor:
    """Anti-aliased resize ``[N, C, H, W] -> [N, C, size, size]`` (bicubic with antialias; a
    no-op when the size already matches). The one function that makes low-resolution images."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return y.to(x.dtype) if x.dtype.is_floating_point else y.round().clamp(0, 255).to(x.dtype)


def stage_input(images: Tensor, resolution: int) -> Tensor:
    """uint8 ``[N, C, R, R]`` at the data resolution -> float ``[N, C, r, r]`` in ``[-1, 1]``, not
    re-quantised: a stage's target ``x0`` at its resolution, or an SR stage's clean low-resolution
    input ``z0``. Training and every ground-truth conditioning make them here, so they agree."""
    return downsample(to_float(images), resolution)


def held_out_mask(keys: list[str], fraction: float) -> Tensor:
    """``[N]`` bool: which items are held out (the ``test`` split), by a SHA-256 of each key."""
    cut = int(fraction * 2 ** 64)
    return torch.tensor([int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") < cut for k in keys],
                        dtype=torch.bool)


def fit_to(x: Tensor, size: int, fit: str) -> Tensor:
    """uint8 ``[N, C, H, W]`` -> ``[N, C, size, size]``: centre-crop to square, then pad (if
    smaller and ``fit='pad'``) or anti-aliased resize."""
    h, w = x.shape[-2:]
    m = min(h, w)
    x = x[..., (h - m) // 2:(h - m) // 2 + m, (w - m) // 2:(w - m) // 2 + m]
    if m == size:
        return x
    if fit == "pad" and m < size:
        p = size - m
        return F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2))
    return downsample(x, size) if m > size else \
        F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False).round().clamp(0, 255).to(torch.uint8)


def convert_channels(x: Tensor, channels: int) -> Tensor:
    """uint8 ``[N, C, H, W]`` to 1 (luma) or 3 (replicated) channels; 0 keeps C."""
    c = x.shape[1]
    if channels in (0, c):
        return x
    if channels == 1 and c == 3:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    if channels == 3 and c == 1:
        return x.repeat(1, 3, 1, 1)
    raise DataError(f"cannot convert {c}-channel images to {channels} channels (use 1 or 3)")


# ----------------------------------------------------------------------------- readers
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


def load_folder(root: str | os.PathLike, size: int, fit: str, channels: int,
                on_bad: str = "skip") -> tuple[Tensor, Tensor, list[str], list[str]]:
    """A folder with one sub-folder per class (or images directly in it: one class) ->
    ``(images uint8 [N, C, size, size], labels [N], class names, file paths relative to the folder)``. Files with an image suffix
    that cannot be decoded (not an image, truncated) are skipped with a warning and a count
    (``on_bad='skip'``) or raise :class:`DataError` (``on_bad='fail'``)."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} " + ("is not a folder; set data.path to a folder of class sub-folders"
                                                    if root.exists() else "does not exist"))
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    groups = [(d.name, d) for d in subdirs] if subdirs else [(root.name, root)]
    images, labels, keys, bad = [], [], [], []
    mode = {1: "L", 3: "RGB"}.get(channels, None)
    for label, (_, d) in enumerate(groups):
        for f in sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(f) as im:
                    im.load()
                    im = im.convert(mode or ("L" if im.mode in ("L", "1", "I;16", "I") else "RGB"))
                    a = np.asarray(im, dtype=np.uint8)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                if on_bad != "skip":
                    raise DataError(f"cannot read image {f} ({e}); remove it, or set data.on_bad=skip") from e
                bad.append(f)
                continue
            t = torch.from_numpy(a.copy())
            t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
            images.append(fit_to(t[None], size, fit)[0])
            labels.append(label)
            keys.append(f.relative_to(root).as_posix())
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s) in {root}, e.g. {bad[0]} "
                      f"(set data.on_bad=fail to stop instead)")
    if not images:
        raise DataError(f"no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}")
    chans = {im.shape[0] for im in images}
    if len(chans) > 1:  # mixed grayscale and colour: make them all RGB
        images = [convert_channels(im[None], 3)[0] for im in images]
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), [g[0] for g in groups], keys


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
    if images.dtype != np.uint8:
        raise DataError(f"{path}: 'images' must be uint8 in [0, 255], got {images.dtype}")
    if images.ndim >= 1 and images.shape[0] == 0:
        raise DataError(f"{path} holds no images ('images' has shape {list(images.shape)}); "
                        f"set data.path to an .npz with at least one image")
    if labels is not None and (labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer)
                                                        or labels.dtype == np.bool_)):
        raise DataError(f"{path}: 'labels' must be a 1-d array of integer class indices, got "
                        f"{labels.dtype} of shape {list(labels.shape)}")
    if labels is not None and labels.size and labels.max() >= MAX_CLASSES:
        raise DataError(f"{path}: 'labels' must be class indices 0..K-1, got a label of {labels.max()}")
    x = torch.from_numpy(images.copy())
    if x.dim() == 3:
        x = x[:, None]
    elif x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.dim() != 4 or x.shape[1] not in (1, 3) or min(x.shape[2:]) < 1:
        raise DataError(f"{path}: 'images' must be [N, H, W], [N, H, W, C] or [N, C, H, W] with "
                        f"C in (1, 3), got {list(images.shape)}")
    y = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    if y is not None and len(y) != len(x):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
    return x.contiguous(), y


def load_dataset(cfg: DataConfig) -> ImageSet:
    """Load the configured split of the data set at ``cfg.resolution`` into memory."""
    if cfg.source == "fashion-mnist":
        splits = ["train", "test"] if cfg.split == "all" else [cfg.split]
        parts = [load_fashion_mnist(cfg.path or FASHION_MNIST_DIR, sp) for sp in splits]
        imgs, labs = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        x = fit_to(torch.from_numpy(imgs.copy())[:, None], cfg.resolution, cfg.fit)
        y, names = torch.from_numpy(labs.astype(np.int64)), list(FASHION_MNIST_CLASSES)
    else:
        if not cfg.path:
            what = ("a folder of images with one sub-folder per class" if cfg.source == "folder" else
                    "an .npz file with an 'images' array")
            raise DataError(f"data.source = {cfg.source!r} needs data.path, {what}: pass --set data.path=PATH "
                            f"(cdm train-classifier: --data path=PATH; or path in the config's [data] section)")
        path = Path(cfg.path).expanduser()  # `--set data.path=~/pets`: the shell leaves that ~ alone
        if cfg.source == "folder":
            x, y, names, keys = load_folder(path, cfg.resolution, cfg.fit, cfg.channels, cfg.on_bad)
        else:
            x, y = load_npz(path)
            keys = [hashlib.sha256(im.numpy().tobytes()).hexdigest() for im in x]
            x = fit_to(x, cfg.resolution, cfg.fit)
            if y is None:
                y = torch.zeros(len(x), dtype=torch.int64)
            names = cfg.class_names or [str(i) for i in range(int(y.max()) + 1)]
        if cfg.split != "all":
            keep = held_out_mask(keys, cfg.held_out) == (cfg.split == "test")
            if not keep.any():
                raise DataError(f"the {cfg.split!r} split of {cfg.path} is empty ({len(x)} images, "
                                f"data.held_out = {cfg.held_out}): add images, change data.held_out, "
                                f"or use data.split = all")
            x, y = x[keep], y[keep]
    x = convert_channels(x, cfg.channels)
    if cfg.limit:
        x, y = x[:cfg.limit], y[:cfg.limit]
    if y.numel() and (y.min() < 0 or y.max() >= len(names)):
        raise DataError(f"labels must lie in [0, {len(names) - 1}], got {int(y.min())}..{int(y.max())}")
    if cfg.classes and cfg.classes != len(names):
        raise DataError(f"data.classes = {cfg.classes}, but the data set has {len(names)} classes; "
                        f"set data.classes = {len(names)} (or 0: as found)")
    return ImageSet(x.contiguous(), y, names)


def crop(x: Tensor, corners: Tensor, size: int) -> Tensor:
    """``[N, C, H, W] -> [N, C, size, size]``: image ``i``'s window whose top-left pixel is
    ``corners[i]`` = (row, column), ``corners`` ``[N, 2]``."""
    return torch.stack([im[:, r:r + size, c:c + size] for im, (r, c) in zip(x, corners.tolist())])


def random_flip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image ``[N, C, H, W]`` left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
