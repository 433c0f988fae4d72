"""Image grids as PNG files."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import to_uint8

MIN_TILE = 64  # px: grids enlarge smaller images to at least this (nearest neighbour), so that a person can judge them


def grid_scale(size: int) -> int:
    """The whole-number enlargement that makes a ``size``-px image at least :data:`MIN_TILE` px
    (8 for 8 px, 2 for 32 px, 1 from 64 px on)."""
    return max(1, -(-MIN_TILE // size))


def make_grid(images: Tensor, nrow: int, pad: int = 2, pad_value: int = 255) -> Tensor:
    """``[N, C, H, W]`` in [-1, 1] -> uint8 ``[C, rows*(H+pad)+pad, nrow*(W+pad)+pad]``."""
    x = to_uint8(images)
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    return grid


def pair_with_inputs(outputs: Tensor, inputs: Tensor) -> Tensor:
    """Interleave each low-resolution input (nearest-upsampled to the output size) before its
    output: ``[N, C, H, W]`` x2 -> ``[2N, C, H, W]``, on the outputs' device."""
    up = F.interpolate(inputs.to(outputs.device).float().clamp(-1, 1), size=outputs.shape[-2:], mode="nearest")
    return torch.stack([up, outputs.float()], dim=1).flatten(0, 1)


def save_png(grid: Tensor, path: str | Path, scale: int = 1) -> Path:
    """Write a uint8 ``[C, H, W]`` image (C = 1 or 3), optionally enlarged ``scale`` times."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if scale > 1:
        grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    a = grid.permute(1, 2, 0).numpy()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path)
    return path


def save_grid(images: Tensor, path: str | Path, nrow: int, inputs: Tensor | None = None,
              scale: int | None = None) -> Path:
    """A PNG grid of ``images`` ``[N, C, H, W]`` in [-1, 1]; with ``inputs``, each input stands left
    of its output (so use an even ``nrow``). Enlarged ``scale`` times (default :func:`grid_scale`
    of the images' size: small images are shown at least :data:`MIN_TILE` px)."""
    x = images if inputs is None else pair_with_inputs(images, inputs)
    return save_png(make_grid(x, nrow), path, scale=scale or grid_scale(images.shape[-1]))
