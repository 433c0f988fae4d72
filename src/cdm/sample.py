"""Loading a cascade from stage checkpoints and writing its samples to disk.

A *cascade file* (JSON) names the stage checkpoints (paths relative to the file) and how to
sample them::

    {"stages": ["base", "sr"],
     "sampling": {"mode": "non-truncated", "sampler": "ancestral",
                  "stages": [{"steps": 100, "level": 0}, {"steps": 100, "level": 250}]}}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .cascade import Cascade, CascadeError, CascadeOutput, CascadeSampling, StageSampling
from .checkpoint import atomic_write, load_stage
from .config import ConfigError, from_dict, to_dict
from .data import to_uint8
from .images import save_grid


def load_cascade(checkpoints: list[str | Path], device: torch.device | str = "cpu",
                 precision: str | None = None) -> Cascade:
    """Build and validate a cascade from stage checkpoints (files or run directories), base first.
    ``precision`` ("bf16" autocast or "fp32") overrides the precision each stage was trained in."""
    if precision not in (None, "bf16", "fp32"):
        raise ConfigError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    stages = [load_stage(p, device) for p in checkpoints]
    for st in stages:
        st.precision = precision or st.precision
    return Cascade(stages)


def read_cascade_file(path: str | Path) -> tuple[list[Path], CascadeSampling]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cascade file {path} does not exist")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"cannot parse cascade file {path}: {e}") from e
    unknown = set(d) - {"stages", "sampling"}
    if unknown or "stages" not in d:
        raise ConfigError(f"cascade file {path} must hold 'stages' (checkpoint paths) and 'sampling'; "
                          f"unexpected keys: {sorted(unknown)}")
    samp = d.get("sampling", {})
    stages = [from_dict(StageSampling, s, prefix="sampling.stages.") for s in samp.pop("stages", [])]
    sampling = from_dict(CascadeSampling, samp, prefix="sampling.")
    sampling.stages = stages
    return [(path.parent / p) for p in d["stages"]], sampling


def write_cascade_file(path: str | Path, checkpoints: list[str | Path], sampling: CascadeSampling) -> Path:
    path = Path(path)
    rel = []
    for p in checkpoints:
        p = Path(p).resolve()
        try:
            rel.append(str(p.relative_to(path.parent.resolve())))
        except ValueError:
            rel.append(str(p))
    text = json.dumps({"stages": rel, "sampling": to_dict(sampling)}, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def default_sampling(num_stages: int, steps: list[int] | None = None, levels: list[int] | None = None,
                     mode: str = "non-truncated", sampler: str = "ancestral") -> CascadeSampling:
    """Sampling settings for a cascade of ``num_stages`` stages (100 steps, level 0 by default)."""
    k = num_stages
    steps = steps or [100] * k
    levels = levels or [0] * k
    if len(steps) != k or len(levels) != k:
        raise CascadeError(f"give one value per stage ({k}) for steps and levels, got {len(steps)} and {len(levels)}")
    return CascadeSampling(mode=mode, sampler=sampler,
                           stages=[StageSampling(steps=s, level=l) for s, l in zip(steps, levels)])


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """``[n]`` labels cycling through the classes (all zeros when unconditional)."""
    return torch.arange(n) % num_classes if num_classes > 0 else torch.zeros(n, dtype=torch.long)


def sample_batched(cascade: Cascade, labels: torch.Tensor, seeds: list[int], sampling: CascadeSampling,
                   batch_size: int = 64) -> CascadeOutput:
    """:meth:`Cascade.sample` in batches; the result does not depend on ``batch_size``."""
    parts = [cascade.sample(labels[i:i + batch_size], seeds[i:i + batch_size], sampling)
             for i in range(0, len(labels), batch_size)]
    k = len(parts[0].images)
    return CascadeOutput(
        images=[torch.cat([p.images[s] for p in parts]) for s in range(k)],
        inputs=[None if parts[0].inputs[s] is None else torch.cat([p.inputs[s] for p in parts]) for s in range(k)],
        labels=torch.cat([p.labels for p in parts]))


def write_samples(result: CascadeOutput, cascade: Cascade, out_dir: str | Path, nrow: int | None = None) -> list[Path]:
    """Write one PNG grid per stage (SR stages show each low-res input left of its output) and
    ``samples.npz`` (``stage{i}`` uint8 ``[N, C, R, R]`` and ``labels``). Returns the grid paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nc = max(cascade.num_classes, 1)
    nrow = nrow or (nc if nc > 1 else 8)
    paths = []
    for i, (st, imgs, inp) in enumerate(zip(cascade.stages, result.images, result.inputs)):
        name = f"stage{i}-{st.resolution}px.png"
        if inp is None:
            paths.append(save_grid(imgs, out / name, nrow=nrow, scale=max(1, 64 // st.resolution)))
        else:
            paths.append(save_grid(imgs, out / name, nrow=2 * nrow, inputs=inp, scale=max(1, 64 // st.resolution)))
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
