"""Reverse-process samplers and per-sample noise.

Every sampler has one signature::

    sampler(model, diffusion, x, grid, noise, clip_x0=True) -> (x_stop, x0_hat)

``model(x, t)`` returns the network's raw output at integer times ``t`` ``[N]``; ``x`` is the
start ``x_T`` ``[N, C, H, W]``; ``grid`` is a descending list of times from :func:`time_grid`
ending at the truncation level ``s`` (0 for a full run); ``noise`` draws the fresh Gaussian noise
per sample. The sampler returns the state at ``grid[-1]`` (``z_s``, or ``x_0`` when ``s = 0``)
and the model's last estimate of ``x_0``.

Samplers with options are configured with :func:`functools.partial` and keep the one signature
(``SAMPLERS["ddim-eta1"] = partial(ddim, eta=1.0)``). A learned-variance output works with every
sampler; ``ddim`` and ``dpmpp_2m`` use only its mean channels. Grids are made
separately (:func:`time_grid`, with its ``spacing``), as in k-diffusion. The deterministic
samplers take ``churn`` (:class:`Churn`, EDM's stochastic churn), which :data:`CHURN_SAMPLERS` lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Protocol

import numpy as np
import torch
from torch import Tensor

from .diffusion import GaussianDiffusion, log_snr, time_grid

ModelFn = Callable[[Tensor, Tensor], Tensor]

__all__ = ["Churn", "Sampler", "SeededNoise", "ancestral", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "time_grid",
           "SAMPLERS", "CHURN_SAMPLERS"]


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


class Sampler(Protocol):
    def __call__(self, model: ModelFn, diffusion: GaussianDiffusion, x: Tensor, grid: list[int],
                 noise: SeededNoise, clip_x0: bool = True) -> tuple[Tensor, Tensor]: ...


def _times(x: Tensor, t: int) -> Tensor:
    """The integer time ``t`` for every sample: ``[N]``."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def _denoise(model: ModelFn, diffusion: GaussianDiffusion, x: Tensor, t: int,
             clip_x0: bool) -> tuple[Tensor, Tensor]:
    """The model's (x0_hat, eps_hat) at ``x_t`` ``[N, C, H, W]``; learned-variance channels are
    ignored. With ``clip_x0``, x0_hat is clipped to [-1, 1] and eps_hat re-derived from it so the
    pair still satisfies ``x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_hat``."""
    tt = _times(x, t)
    pred, _ = diffusion.split_output(model(x, tt), x.shape[1])
    x0, eps = diffusion.predict_x0_eps(pred, x, tt)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        ab = diffusion.alpha_bar[t].item()
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    return x0, eps


@dataclass(frozen=True)
class Churn:
    """EDM's stochastic churn (Karras et al. 2022, Algorithm 2, lines 5-6) for a deterministic
    sampler on an integer-time VP grid: before a step from ``t`` with ``lo <= t/T <= hi``, the
    state's noise level is raised from ``sigma_t`` to ``sigma_hat = (1 + gamma) sigma_t``,
    ``gamma = min(s_churn / steps, sqrt(2) - 1)``, by adding fresh noise, and the step starts from
    ``t_hat``, the first integer time at or above ``sigma_hat`` (``sigma = sqrt((1 - abar) / abar)``)::

        x_hat = sqrt(abar_hat / abar_t) x_t + sqrt(abar_hat) sqrt(sigma_hat^2 - sigma_t^2) z

    (in ``x / sqrt(abar)``, the variance-exploding variable, it is EDM's ``x + sqrt(s_hat^2 - s^2) z``).
    The injected noise corrects the network's accumulated errors where they are large, and the
    solver keeps its ODE accuracy elsewhere; it costs no network evaluations."""
    s_churn: float  # EDM's S_churn: the total churn over the run
    steps: int  # the run's steps (gamma = s_churn / steps per step)
    interval: tuple[float, float] = (0.0, 1.0)  # churn only where lo <= t/T <= hi

    def __call__(self, diffusion: GaussianDiffusion, x: Tensor, t: int, noise: SeededNoise) -> tuple[Tensor, int]:
        """``(x_hat, t_hat)``: ``x`` ``[N, C, H, W]`` at ``t`` moved up to ``t_hat >= t``."""
        lo, hi = self.interval
        if self.s_churn <= 0 or not lo <= t / diffusion.T <= hi or t >= diffusion.T:
            return x, t
        gamma = min(self.s_churn / self.steps, math.sqrt(2) - 1)
        ab = diffusion.alpha_bar.double()
        sigma = ((1 - ab) / ab).sqrt()  # [T + 1], ascending in t
        t_hat = min(int(torch.searchsorted(sigma, sigma[t] * (1 + gamma)).item()), diffusion.T)
        if t_hat == t:
            return x, t
        ab_t, ab_hat = ab[t].item(), ab[t_hat].item()
        extra = math.sqrt(max(sigma[t_hat].item() ** 2 - sigma[t].item() ** 2, 0.0))
        return math.sqrt(ab_hat / ab_t) * x + math.sqrt(ab_hat) * extra * noise.randn(*x.shape[1:]), t_hat


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


@torch.no_grad()
def ddim(model: ModelFn, diffusion: GaussianDiffusion, x: Tensor, grid: list[int], noise: SeededNoise,
         clip_x0: bool = True, eta: float = 0.0, churn: Churn | None = None) -> tuple[Tensor, Tensor]:
    """DDIM (Song et al. 2021, eq. 12) between consecutive grid times ``t -> p``:
    ``x_p = sqrt(abar_p) x0_hat + sqrt(1 - abar_p - sigma^2) eps_hat + sigma z`` with
    ``sigma^2 = eta^2 (1 - abar_p)/(1 - abar_t) (1 - abar_t/abar_p)`` (eq. 16). ``eta = 0`` is
    deterministic and draws no noise; ``eta = 1`` makes sigma^2 the posterior variance of the step,
    i.e. :func:`ancestral` without a learned variance. ``churn`` (with ``eta = 0``): :class:`Churn`.
    ``x`` ``[N, C, H, W]``."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM eta must lie in [0, 1], got {eta}")
    x0 = x
    for t, p in zip(grid[:-1], grid[1:]):
        if churn is not None:
            x, t = churn(diffusion, x, t, noise)
        x0, eps = _denoise(model, diffusion, x, t, clip_x0)
        ab_t, ab_p = diffusion.alpha_bar[t].item(), diffusion.alpha_bar[p].item()
        var = eta ** 2 * (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)  # eq. 16; 0 at p = 0
        x = math.sqrt(ab_p) * x0 + math.sqrt(max(1 - ab_p - var, 0.0)) * eps
        if var > 0:
            x = x + math.sqrt(var) * noise.randn(*x.shape[1:])
    return x, x0


@torch.no_grad()
def dpmpp_2m(model: ModelFn, diffusion: GaussianDiffusion, x: Tensor, grid: list[int], noise: SeededNoise,
             clip_x0: bool = True, sde: bool = False, churn: Churn | None = None) -> tuple[Tensor, Tensor]:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2): the multistep second-order
    solver in data prediction, with ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``,
    ``lambda_t = log(alpha_t / sigma_t)``, ``h = lambda_p - lambda_t`` for a step ``t -> p``, and
    ``D = x0_hat`` on the first step, ``D = x0_hat + (x0_hat - x0_prev) / (2 r)``,
    ``r = h_prev / h``, after (D_i of Algorithm 2).

    ``sde=False`` solves the probability-flow ODE and draws no noise::

        x_p = (sigma_p / sigma_t) x_t - alpha_p (e^-h - 1) D

    (its first step is DDIM). ``sde=True`` is SDE-DPM-Solver++(2M) (the paper's Appendix; the
    midpoint form of k-diffusion's ``sample_dpmpp_2m_sde`` with eta = 1)::

        x_p = (sigma_p / sigma_t) e^-h x_t + alpha_p (1 - e^-2h) D + sigma_p sqrt(1 - e^-2h) z

    (its first step is the ancestral / DDIM-eta=1 step); the fresh noise corrects the network's
    errors the way ancestral sampling does, which the ODE cannot. A step to ``t = 0`` (sigma = 0,
    lambda = inf) lands on x0_hat; a grid ending at ``s > 0`` stops at the noisy ``z_s``.
    ``churn`` (ODE only): :class:`Churn`; a churned step starts from ``t_hat`` and restarts the
    multistep history (the noise moved the sample off the path the history lies on), so it is a
    first-order step. A third-order multistep solver (DPM-Solver++(3M)) was measured and dropped:
    no better than this one at <= 10 steps, and unstable on the edm grid (docs/BENCHMARKS.md,
    "Few network evaluations per stage"). ``x`` ``[N, C, H, W]``."""
    lam = log_snr(diffusion.alpha_bar)  # [T + 1], float64
    x0 = x
    x0_prev: Tensor | None = None
    h_prev = 0.0
    for t, p in zip(grid[:-1], grid[1:]):
        if churn is not None:
            x, t_hat = churn(diffusion, x, t, noise)
            x0_prev, t = (None if t_hat != t else x0_prev), t_hat
        x0, _ = _denoise(model, diffusion, x, t, clip_x0)
        if p == 0:
            x = x0
            continue
        ab_t, ab_p = diffusion.alpha_bar[t].item(), diffusion.alpha_bar[p].item()
        h = (lam[p] - lam[t]).item()
        d = x0 if x0_prev is None else x0 + (x0 - x0_prev) / (2 * (h_prev / h))
        ratio = math.sqrt((1 - ab_p) / (1 - ab_t))  # sigma_p / sigma_t
        if sde:
            decay = -math.expm1(-2 * h)  # 1 - e^-2h
            x = (ratio * math.exp(-h) * x + math.sqrt(ab_p) * decay * d
                 + math.sqrt((1 - ab_p) * decay) * noise.randn(*x.shape[1:]))
        else:
            x = ratio * x - math.sqrt(ab_p) * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x, x0


dpmpp_2m_sde = partial(dpmpp_2m, sde=True)


SAMPLERS: dict[str, Sampler] = {
    "ancestral": ancestral,
    "ddim": ddim,  # eta = 0: deterministic
    "ddim-eta1": partial(ddim, eta=1.0),
    "dpmpp-2m": dpmpp_2m,
    "dpmpp-2m-sde": dpmpp_2m_sde,
}
CHURN_SAMPLERS = ("ddim", "dpmpp-2m")  # the deterministic ones, which take Churn
