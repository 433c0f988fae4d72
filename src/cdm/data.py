"""Data sets: what a stage trains on and what evaluation compares with.

A data set is loaded once into memory as ``uint8 [N, C, R, R]`` at the cascade's *data
resolution* ``R`` plus ``int64 [N]`` labels (or read by index from a prepared set); each stage
takes its own resolution from it with :func:`cdm.pixels.downsample`, the same function that makes
an SR stage's low-resolution input, so a base stage is trained on exactly the distribution its SR
stage is conditioned on.

Sources: Fashion-MNIST IDX files (Debian's ``dataset-fashion-mnist`` by default), a folder of
images with one sub-folder per class (:mod:`cdm.folder`: its layout and how each image mode is
converted), and ``.npz`` arrays (``images`` ``[N, H, W(, C)]`` or
``[N, C, H, W]`` uint8 and optional ``labels``).

Every source has the same two splits, ``train`` and ``test`` (held out), and ``all`` for both:
Fashion-MNIST its own; a folder or ``.npz`` a deterministic one, :func:`held_out_mask`: an
image is held out when a hash of its identity (a file's path inside the folder; an ``.npz``
image's bytes) falls below ``data.held_out`` (default 10%). It does not depend on the order of
the files, the resolution or the machine, and adding images moves none of the others. Training,
evaluation, the sweep, the likelihood bound and the domain classifier all read these splits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError
from .folder import load_folder
from .prepared import PreparedImages, PreparedSet, is_prepared, open_prepared
from .pixels import (DATA_SETTINGS, FITS, check_fit, convert_channels, crop, downsample, fit_to,  # noqa: F401
                     random_flip, stage_input, to_float, to_uint8, warn_upsampled)
from .readers import (channels_last, check_npz, fashion_mnist_arrays, load_fashion_mnist,  # noqa: F401 (re-exported)
                      load_npz, npz_header, npz_keys, read_idx)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SPLITS = ("train", "test", "all")
SOURCES = ("fashion-mnist", "folder", "npz", "prepared")


@dataclass
class DataConfig:
    source: str = "fashion-mnist"  # "fashion-mnist", "folder", "npz" or "prepared" (a `cdm prepare` output)
    path: str = ""  # "" = the default location (fashion-mnist only); a folder that is a prepared set is read as one
    split: str = "train"  # "train", "test" (held out) or "all" (module docstring)
    held_out: float = 0.1  # folder / npz: the fraction of images in the "test" split (module docstring)
    resolution: int = 32  # R, the data resolution the whole cascade shares
    fit: str = "pad"  # how to reach R: "pad", "resize" (never enlarges) or "resize-up" (fit_to)
    channels: int = 0  # 0 = as stored; 1 or 3 converts
    classes: int = 0  # 0 = as found; else the data set must have this many (a plan uses it without the data)
    flip: bool = False  # random horizontal flip during training
    limit: int = 0  # use only the first `limit` images (0 = all)
    on_bad: str = "skip"  # folder: an unreadable image file is "skip"ped (a warning counts them) or "fail"s
    # prepared sets: background threads that read the next step's batch while this step computes
    # (0 = read it in the step); which images a step sees does not depend on it
    workers: int = 1
    class_names: list[str] = field(default_factory=list)  # filled in when loaded
    fingerprint: str = ""  # a prepared set's content fingerprint, filled in when loaded (a resume checks it)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise DataError(f"data.source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.fit not in FITS:
            raise DataError(f"data.fit must be 'pad', 'resize' (downscale only) or 'resize-up' (may enlarge), "
                            f"got {self.fit!r}")
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
        if self.workers < 0:
            raise DataError(f"data.workers must be >= 0 (0 = read each batch in its step), got {self.workers}")

    @property
    def is_prepared(self) -> bool:
        """Whether this names a prepared set (``source = "prepared"``, or a folder that is one)."""
        return self.source == "prepared" or (self.source == "folder" and bool(self.path)
                                             and is_prepared(Path(self.path).expanduser()))


@dataclass
class ImageSet:
    """A split of a data set: ``images[idx]`` gives uint8 ``[k, C, R, R]`` rows, whether the images
    are in memory (a ``Tensor``) or on disk (a prepared set's :class:`~cdm.prepared.PreparedImages`,
    read on demand)."""

    images: Tensor | PreparedImages  # uint8 [N, C, R, R]
    labels: Tensor  # int64 [N]
    class_names: list[str]
    prepared: PreparedSet | None = None  # the prepared set the images are read from

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def memory_bytes(self) -> int:
        """What the images and labels take in this process's memory (a prepared set: its labels)."""
        pixels = 0 if self.prepared is not None else self.images.numel()
        return pixels + 8 * len(self.labels)

    def describe(self) -> str:
        """The data set in words, for start-up lines and reports."""
        if self.prepared is None:
            return ""
        m = self.prepared.manifest
        return (f"prepared set {self.prepared.path} (fingerprint {self.prepared.fingerprint}; {m['count']:,} images "
                f"from {m['source']['kind']} {m['source']['path']}, fit {m['fit']})")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------- the held-out split
def held_out_key(key: str) -> int:
    """The 64-bit number that decides whether an item is held out: the first 8 bytes of a SHA-256
    of its key, big-endian. It is held out when this falls below ``data.held_out * 2^64``."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def held_out_cut(fraction: float) -> int:
    """Items whose :func:`held_out_key` is below this are held out (the ``test`` split)."""
    return int(fraction * 2 ** 64)


def held_out_mask(keys: list[str], fraction: float) -> Tensor:
    """``[N]`` bool: which items are held out (the ``test`` split), by a SHA-256 of each key."""
    cut = held_out_cut(fraction)
    return torch.tensor([held_out_key(k) < cut for k in keys], dtype=torch.bool)


def load_dataset(cfg: DataConfig) -> ImageSet:
    """The configured split of the data set at ``cfg.resolution``: decoded into memory, or, for a
    prepared set, its labels in memory and its images read on demand (:func:`load_prepared`)."""
    if cfg.is_prepared:
        return load_prepared(cfg)
    if cfg.source == "fashion-mnist":
        splits = ["train", "test"] if cfg.split == "all" else [cfg.split]
        imgs, labs, _ = fashion_mnist_arrays(cfg.path or FASHION_MNIST_DIR, splits)
        where = f"Fashion-MNIST's images ({cfg.path or FASHION_MNIST_DIR})"
        up = check_fit(imgs.shape[1:], cfg.resolution, cfg.fit, where)
        x = fit_to(torch.from_numpy(imgs.copy())[:, None], cfg.resolution, cfg.fit, where)
        warn_upsampled(len(x) if up else 0, len(x), cfg.path or FASHION_MNIST_DIR, cfg.resolution)
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
            keys = npz_keys(x)
            up = check_fit(x.shape[2:], cfg.resolution, cfg.fit, f"the images in {path}")
            x = fit_to(x, cfg.resolution, cfg.fit, f"the images in {path}")
            warn_upsampled(len(x) if up else 0, len(x), path, cfg.resolution)
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


def load_prepared(cfg: DataConfig) -> ImageSet:
    """The configured split of a prepared set (``cfg.path``), without reading its images: the split,
    ``data.limit`` and the checks are made on its labels and split data, as :func:`load_dataset`
    makes them on a decoded set, so both give the same images in the same order."""
    if not cfg.path:
        raise DataError("data.source = 'prepared' needs data.path, a folder written by cdm prepare: pass "
                        "--set data.path=DIR")
    ps = open_prepared(cfg.path)
    m = ps.manifest
    c, r = ps.image_shape[0], ps.image_shape[1]
    if r != cfg.resolution:
        raise DataError(f"{ps.path} was prepared at {r}px, but data.resolution is {cfg.resolution}: set "
                        f"data.resolution = {r}, or prepare the source again with --resolution {cfg.resolution}")
    if cfg.channels not in (0, c):
        raise DataError(f"{ps.path} holds {c}-channel images, but data.channels is {cfg.channels}: set "
                        f"data.channels = {c} (or 0), or prepare the source again with --channels {cfg.channels}")
    if cfg.fingerprint and cfg.fingerprint != ps.fingerprint:
        raise DataError(f"{ps.path} has fingerprint {ps.fingerprint}, but the config asks for data.fingerprint = "
                        f"{cfg.fingerprint}: point data.path at that set, or remove data.fingerprint")
    rows = np.arange(ps.count)
    if cfg.split != "all":
        rows = rows[ps.test_mask(held_out_cut(cfg.held_out)) == (cfg.split == "test")]
        if not len(rows):
            raise DataError(f"the {cfg.split!r} split of {ps.path} is empty ({ps.count} images"
                            + (f", data.held_out = {cfg.held_out}" if m["split"]["rule"] == "hash" else "")
                            + "): use data.split = all" + (", or change data.held_out" if m["split"]["rule"] == "hash"
                                                          else ""))
    if cfg.limit:
        rows = rows[:cfg.limit]
    # an .npz names its classes in the config (as when it is read directly); other sources named them
    names = list(cfg.class_names) if cfg.class_names and m["source"]["kind"] == "npz" else ps.class_names
    y = torch.from_numpy(ps.labels[rows])
    if y.numel() and y.max() >= len(names):
        raise DataError(f"labels must lie in [0, {len(names) - 1}], got up to {int(y.max())}: data.class_names "
                        f"names too few classes for {ps.path}")
    if cfg.classes and cfg.classes != len(names):
        raise DataError(f"data.classes = {cfg.classes}, but {ps.path} has {len(names)} classes; "
                        f"set data.classes = {len(names)} (or 0: as found)")
    return ImageSet(ps.images().subset(rows), y, names, prepared=ps)
