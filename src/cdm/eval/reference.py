"""Real images for evaluation: the one loader behind every number that compares with real data.

``cdm eval`` and ``cdm sweep`` (reference statistics, ground-truth inputs, per-stage checks,
CAS), ``cdm nll`` and ``cdm train-classifier`` all ask :func:`load_reference` for their real
images, so no two of them can disagree about what "test" means:

- a **split** of the stage's data set (``test`` by default: Fashion-MNIST's own test set; for a
  folder or ``.npz``, the hashed held-out part of :mod:`cdm.data`, which training never reads), or
  an **explicit** set of images (``path``: a folder or ``.npz``, used whole);
- ``n > 0`` draws a **random, class-stratified subset** of ``n`` images with ``seed`` (each class
  in proportion to its share of the set, so a folder sorted by class still gives every class);
- a :class:`ReferenceSet` carries a ``source`` label and a ``fingerprint`` of its pixels and
  labels, which reports and the feature-statistics cache carry;
- a prepared set's images stay on disk (:class:`~cdm.prepared.PreparedImages`): a subset picks
  rows without reading them, :meth:`ReferenceSet.batches` reads them a batch at a time, and the
  fingerprint is the set's content fingerprint and the rows taken, so no reference is ever read
  whole.

:func:`training_overlap` counts the reference images that are also training images of a stage
(identical pixels at the data resolution), so scoring against what a stage was trained on is
reported, never silent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data import DataConfig, DataError, downsample, load_dataset, stage_input
from ..prepared import PreparedImages


@dataclass
class ReferenceSpec:
    """Which real images to compare with."""
    split: str = "test"  # the split of the stage's data set: test (held out), train or all
    n: int = 10000  # 0: all of them; else a random class-stratified subset of n
    seed: int = 0  # seeds the subset
    path: str = ""  # explicit images (a folder of class sub-folders, or an .npz) instead of a split


@dataclass
class ReferenceSet:
    images: Tensor | PreparedImages  # uint8 [N, C, R, R] at the data resolution (in memory, or rows on disk)
    labels: Tensor  # int64 [N]
    class_names: list[str]
    source: str  # e.g. "fashion-mnist:test n=10000 seed=0"
    fingerprint: str  # 12 hex digits over the pixels and labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def at(self, resolution: int) -> Tensor:
        """uint8 ``[N, C, r, r]``: the images at a stage's resolution (the anti-aliased resize)."""
        return torch.cat([b for b, _ in self.batches(resolution)]) if len(self) else downsample(self.images[:0],
                                                                                              resolution)

    def batches(self, resolution: int, size: int = 1000) -> Iterator[tuple[Tensor, Tensor]]:
        """``(images uint8 [b, C, r, r] at ``resolution``, labels [b])``, ``size`` at a time, in order:
        a prepared set's rows are read one batch at a time."""
        for i in range(0, len(self), size):
            yield downsample(self.images[i:i + size], resolution), self.labels[i:i + size]

    def inputs(self, resolution: int) -> Tensor:
        """float ``[N, C, r, r]`` in ``[-1, 1]``: the images as an SR stage's clean low-resolution
        inputs, made exactly as training makes them (:func:`cdm.data.stage_input`)."""
        return stage_input(self.images[:], resolution)

    def take(self, n: int, seed: int = 0) -> "ReferenceSet":
        """A random class-stratified subset of ``n`` of these images (a prepared set's stay on disk)."""
        idx = stratified_subset(self.labels, n, seed)
        return _make(_rows(self.images, idx), self.labels[idx], self.class_names, f"{self.source} n={n} seed={seed}")


def _rows(images: Tensor | PreparedImages, idx: Tensor) -> Tensor | PreparedImages:
    return images.subset(idx) if isinstance(images, PreparedImages) else images[idx]


def stratified_subset(labels: Tensor, n: int, seed: int) -> Tensor:
    """Indices of ``n`` of the items with ``labels`` ``[N]``, drawn at random with ``seed``: each
    class gets ``n`` times its share (largest remainders get the rest), in a random order."""
    total = len(labels)
    if not 1 <= n <= total:
        raise DataError(f"asked for {n} reference images, but the set holds {total}")
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * n / total
    take = quota.floor().long()
    rest = n - int(take.sum())
    if rest:
        take[torch.argsort(quota - take, descending=True, stable=True)[:rest]] += 1
    picked = [torch.nonzero(labels == c).flatten()[torch.randperm(int(k), generator=g)[:int(m)]]
              for c, k, m in zip(classes, counts, take)]
    idx = torch.cat(picked)
    return idx[torch.randperm(len(idx), generator=g)]


def _fingerprint(images: Tensor | PreparedImages, labels: Tensor) -> str:
    h = hashlib.sha256()
    h.update(f"{list(images.shape)}".encode())
    if isinstance(images, PreparedImages):  # the set's content fingerprint and which of its rows, not its pixels
        h.update(f"prepared:{images.fingerprint}".encode())
        h.update((np.arange(images.count) if images.rows is None else images.rows).astype("<i8").tobytes())
    else:
        h.update(images.contiguous().numpy().tobytes())
    h.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _make(images: Tensor | PreparedImages, labels: Tensor, names: list[str], source: str) -> ReferenceSet:
    return ReferenceSet(images, labels, names, source, _fingerprint(images, labels))


def explicit_data(data: DataConfig, path: str | Path) -> DataConfig:
    """The data config of explicit images at ``path`` (folder or ``.npz``), made like ``data``'s
    images (resolution, fit, channels) and used whole."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"reference images {p} do not exist (give a folder of images or an .npz)")
    source = "npz" if p.suffix == ".npz" else "folder"
    return replace(data, source=source, path=str(p), split="all", limit=0, flip=False, class_names=[], fingerprint="")


def load_reference(data: DataConfig, spec: ReferenceSpec) -> ReferenceSet:
    """The real images ``spec`` names, at ``data``'s resolution, of the data set ``data`` describes
    (a stage's ``config.data``)."""
    if spec.path:
        cfg = explicit_data(data, spec.path)
        where = f"{cfg.source}:{cfg.path}"
    else:
        cfg = replace(data, split=spec.split, limit=0, flip=False)
        where = f"{data.source}:{spec.split}" + (f" ({data.path})" if data.path else "")
    ds = load_dataset(cfg)
    full = _make(ds.images, ds.labels, ds.class_names, where)
    if spec.n and spec.n < len(full):
        return full.take(spec.n, spec.seed)
    return full


def _image_hashes(images: Tensor | PreparedImages, batch: int = 4096) -> list[bytes]:
    """SHA-256 of each image's pixels, a batch at a time."""
    return [hashlib.sha256(im.numpy().tobytes()).digest() for i in range(0, len(images), batch)
            for im in images[i:i + batch]]


def training_overlap(data: DataConfig, ref: ReferenceSet) -> int:
    """How many of ``ref``'s images are also images a stage trained on (``data``: its config's
    data section, whose split it trained on), compared pixel for pixel at the data resolution (a
    prepared training set is read a batch at a time)."""
    train = load_dataset(replace(data, flip=False))
    if train.images.shape[1:] != ref.images.shape[1:]:
        return 0
    seen = set(_image_hashes(train.images))
    return sum(h in seen for h in _image_hashes(ref.images))
