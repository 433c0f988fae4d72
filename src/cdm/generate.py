"""Sampling a cascade in batches and writing the samples: ``samples.npz`` with every sample,
and a preview grid per stage of the first :data:`GRID_MAX` samples."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import numpy as np
import torch

from .cascade import Cascade, CascadeError, CascadeOutput, SamplingPlan
from .files import atomic_write
from .data import to_uint8
from .images import save_grid

GRID_MAX = 100  # samples shown per grid; samples.npz holds them all


def cycle_labels(n: int, num_classes: int, classes: list[int] | None = None) -> torch.Tensor:
    """``[n]`` labels cycling through ``classes`` (default: every class; all zeros when the
    cascade is unconditional)."""
    if classes:  # checked against the cascade by Cascade.check_labels
        return torch.tensor(classes, dtype=torch.long).repeat((n + len(classes) - 1) // len(classes))[:n]
    return torch.arange(n) % num_classes if num_classes > 0 else torch.zeros(n, dtype=torch.long)


def _name_key(name: str) -> str:
    """How names are compared: case, and spaces / underscores / hyphens between words, do not matter."""
    return re.sub(r"[\s_-]+", "-", name.strip().casefold())


def resolve_classes(classes: list[int | str] | None, class_names: list[str]) -> list[int] | None:
    """Class indices from ``classes``, each an index or a name of ``class_names`` (``"sneaker"``,
    ``"Ankle boot"``, ``"ankle_boot"``; a name with parts, ``"T-shirt/top"``, also by a part, ``"top"``).
    An integer (or a string of digits) is always an index; indices are checked later, against the
    cascade (:meth:`Cascade.check_labels`). An unknown name raises :class:`CascadeError` listing
    the valid ones."""
    if not classes:
        return None
    lookup: dict[str, set[int]] = {}
    for k, name in enumerate(class_names):
        for key in {_name_key(name), *(_name_key(p) for p in name.split("/") if p.strip())}:
            lookup.setdefault(key, set()).add(k)
    out = []
    for c in classes:
        if isinstance(c, int) or c.strip().isdigit():
            out.append(int(c))
            continue
        found = sorted(lookup.get(_name_key(c), ()))
        if len(found) == 1:
            out.append(found[0])
            continue
        if found:
            raise CascadeError(f"class {c!r} names several classes ({', '.join(class_names[k] for k in found)}); "
                               f"give their indices ({', '.join(map(str, found))})")
        if not class_names:
            raise CascadeError(f"unknown class {c!r}: this cascade's stages carry no class names; give class indices")
        near = difflib.get_close_matches(_name_key(c), list(lookup), n=1)
        hint = f"did you mean {class_names[min(lookup[near[0]])]!r}? " if near else ""
        raise CascadeError(f"unknown class {c!r}; {hint}the classes are "
                           f"{', '.join(f'{k}={n!r}' for k, n in enumerate(class_names))} (give names or indices)")
    return out


def sample_batched(cascade: Cascade, labels: torch.Tensor, seeds: list[int], plan: SamplingPlan,
                   batch_size: int = 64, progress: bool = False) -> CascadeOutput:
    """:meth:`Cascade.sample` in batches (a progress bar in images if ``progress``, drawn from the end of
    the first batch, so that a refused plan or label is one line); the result does not depend on
    ``batch_size``."""
    from tqdm.auto import tqdm

    parts, bar = [], None
    for i in range(0, len(labels), batch_size):
        parts.append(cascade.sample(labels[i:i + batch_size], seeds[i:i + batch_size], plan))
        if progress and bar is None:
            bar = tqdm(total=len(labels), desc="sample", unit="img", mininterval=1.0)
        if bar is not None:
            bar.update(len(parts[-1].labels))
    if bar is not None:
        bar.close()
    k = len(parts[0].images)
    return CascadeOutput(
        images=[torch.cat([p.images[s] for p in parts]) for s in range(k)],
        inputs=[None if parts[0].inputs[s] is None else torch.cat([p.inputs[s] for p in parts]) for s in range(k)],
        labels=torch.cat([p.labels for p in parts]))


def write_samples(result: CascadeOutput, cascade: Cascade, out_dir: str | Path, nrow: int | None = None) -> list[Path]:
    """Write ``samples.npz`` (every sample: ``stage{i}`` uint8 ``[N, C, R, R]`` and ``labels``)
    and one PNG grid per stage of the first :data:`GRID_MAX` samples (SR stages show each
    low-resolution input left of its output). Returns the grid paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nc = max(cascade.num_classes, 1)
    nrow = nrow or (nc if nc > 1 else 10)
    m = GRID_MAX
    paths = []
    for i, (st, imgs, inp) in enumerate(zip(cascade.stages, result.images, result.inputs)):
        name = f"stage{i}-{st.resolution}px.png"
        if inp is None:
            paths.append(save_grid(imgs[:m], out / name, nrow=nrow))
        else:
            paths.append(save_grid(imgs[:m], out / name, nrow=2 * nrow, inputs=inp[:m]))
    save_npz(out / "samples.npz", sample_arrays(result))
    return paths


def sample_arrays(result: CascadeOutput) -> dict[str, np.ndarray]:
    """What ``samples.npz`` holds: ``stage{i}`` uint8 ``[N, C, R_i, R_i]`` and ``labels`` ``[N]``."""
    arrays = {f"stage{i}": to_uint8(im).numpy() for i, im in enumerate(result.images)}
    arrays["labels"] = result.labels.numpy()
    return arrays


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write arrays to a compressed ``.npz`` atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(Path(path), write)
    return Path(path)
