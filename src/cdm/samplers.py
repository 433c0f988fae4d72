"""Reverse-process samplers and per-sample noise.

Every sampler has one signature::

    sampler(model, diffusion, x, grid, noise, clip_x0=True) -> (x_stop, x0_hat)

``model(x, t)`` returns the network's raw output at integer times ``t`` ``[N]``; ``x`` is the
start ``x_T`` ``[N, C, H, W]``; ``grid`` is a descending list of times from :func:`time_grid`
ending at the truncation level ``s`` (0 for a full run); ``noise`` draws the fresh Gaussian noise
per sample. The sampler returns the state at ``grid[-1]`` (``z_s``, or ``x_0`` when ``s = 0``)
and the model's last estimate of ``x_0``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .diffusion import GaussianDiffusion, time_grid

ModelFn = Callable[[Tensor, Tensor], Tensor]

__all__ = ["SeededNoise", "ancestral", "time_grid", "SAMPLERS"]


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. (sample seed, stage index))."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               & np.uint64(0x7FFFFFFFFFFFFFFF))


class SeededNoise:
    """Gaussian noise drawn from one generator per sample, so that a sample depends on its seed
    only and never on the batch it was drawn in. Noise is drawn on the CPU and moved to
    ``device`` so it is identical across devices."""

    def __init__(self, seeds: list[int] | Tensor, device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.device = torch.device(device)

    def randn(self, *shape: int) -> Tensor:
        """``[N, *shape]``, row i from generator i."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(self.device)


@torch.no_grad()
def ancestral(model: ModelFn, diffusion: GaussianDiffusion, x: Tensor, grid: list[int],
              noise: SeededNoise, clip_x0: bool = True) -> tuple[Tensor, Tensor]:
    """Ancestral sampling: ``x_prev ~ p(x_prev | x_t)``, the model's Gaussian reverse step between
    consecutive grid times (DDPM Algorithm 2, respaced). No noise is added on a step to ``t = 0``."""
    n = x.shape[0]
    x0 = x
    for t_i, t_prev_i in zip(grid[:-1], grid[1:]):
        t = torch.full((n,), t_i, device=x.device, dtype=torch.long)
        t_prev = torch.full((n,), t_prev_i, device=x.device, dtype=torch.long)
        mean, logvar, x0 = diffusion.p_mean_logvar(model(x, t), x, t, t_prev, clip_x0=clip_x0)
        x = mean if t_prev_i == 0 else mean + torch.exp(0.5 * logvar) * noise.randn(*x.shape[1:])
    return x, x0


SAMPLERS = {"ancestral": ancestral}
