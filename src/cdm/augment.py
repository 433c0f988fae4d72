"""Conditioning augmentation (Ho et al. 2022; docs/METHOD.md §2 and §4).

The super-resolution stage's low-resolution input ``z0`` is corrupted before the network sees
it, so that the stage learns to correct the previous stage's errors. One object,
:class:`ConditioningAugmentation`, owns each kind; training and sampling both go through its
:meth:`~ConditioningAugmentation.apply`, so they cannot drift apart:

- ``gaussian``: ``z_s = sqrt(abar_s) z0 + sqrt(1 - abar_s) eps``, the *lower stage's* forward
  process, with a level ``s`` drawn per training example (one model amortised over ``s``) and
  given to the network; ``s = 0`` is the identity. At sampling time ``s`` is chosen by the user
  (non-truncated: apply to the finished ``z0``; truncated: the lower stage stops at ``s`` and
  its ``z_s`` is passed on untouched).
- ``blur``: a 3x3 Gaussian blur with ``sigma ~ U(lo, hi)`` on a fraction of training examples,
  and none at inference. The network is not told sigma.
- ``none``: the input is passed through.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .diffusion import DiffusionConfig, GaussianDiffusion, Schedule


class AugKind(str, enum.Enum):
    NONE = "none"
    GAUSSIAN = "gaussian"
    BLUR = "blur"


@dataclass
class AugmentConfig:
    kind: str = "none"  # AugKind
    # gaussian: the corrupting process. For truncated sampling it must be the lower stage's
    # forward process (same schedule, same number of steps).
    schedule: str = "cosine"
    steps: int = 1000
    s_max: int = 500  # training draws s ~ U{1..s_max} ...
    p_zero: float = 0.1  # ... or s = 0 (no augmentation) with this probability
    # blur
    sigma_min: float = 0.4
    sigma_max: float = 0.6
    p_blur: float = 0.5  # fraction of training examples blurred

    def __post_init__(self) -> None:
        for name, enum_ in (("kind", AugKind), ("schedule", Schedule)):
            if getattr(self, name) not in {e.value for e in enum_}:
                raise ValueError(f"augment.{name} must be one of {', '.join(e.value for e in enum_)}, "
                                 f"got {getattr(self, name)!r}")
        if self.steps < 1:
            raise ValueError(f"augment.steps must be >= 1, got {self.steps}")
        if not 0 <= self.s_max <= self.steps:
            raise ValueError(f"augment.s_max must lie in [0, augment.steps={self.steps}], got {self.s_max}")
        for name in ("p_zero", "p_blur"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.sigma_min <= self.sigma_max:
            raise ValueError(f"augment needs 0 <= sigma_min <= sigma_max, got {self.sigma_min}, {self.sigma_max}")


def gaussian_blur3x3(x: Tensor, sigma: Tensor) -> Tensor:
    """Blur each image ``x[i]`` ``[N, C, H, W]`` with a normalised 3x3 Gaussian of std ``sigma[i]``
    (``sigma[i] = 0`` leaves it unchanged); reflect padding keeps the borders' brightness."""
    n, c, h, w = x.shape
    d = torch.tensor([-1.0, 0.0, 1.0], device=x.device)
    s = sigma.to(device=x.device, dtype=torch.float32).clamp(min=1e-6)
    g = torch.exp(-d[None] ** 2 / (2 * s[:, None] ** 2))  # [N, 3]
    g = g / g.sum(1, keepdim=True)
    k = (g[:, :, None] * g[:, None, :])  # [N, 3, 3]
    k = k[:, None].repeat_interleave(c, 0).to(x.dtype)  # [N*C, 1, 3, 3]
    xp = F.pad(x.reshape(1, n * c, h, w), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(xp, k, groups=n * c).reshape(n, c, h, w)


class ConditioningAugmentation:
    """Corrupts the SR stage's low-resolution input. ``level`` is ``s`` (Gaussian) or ``sigma`` (blur)."""

    def __init__(self, config: AugmentConfig):
        self.config = config
        self.kind = AugKind(config.kind)
        self.process = (GaussianDiffusion(DiffusionConfig(steps=config.steps, schedule=config.schedule))
                        if self.kind is AugKind.GAUSSIAN else None)

    @property
    def steps(self) -> int:
        """T of the augmentation process (levels lie in ``[0, steps]``)."""
        return self.config.steps

    @property
    def network_sees_level(self) -> bool:
        return self.kind is AugKind.GAUSSIAN

    def draw_levels(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Training levels ``[n]`` (float): Gaussian ``s`` in ``{0..s_max}``; blur ``sigma`` (0 =
        not blurred); none: zeros."""
        cfg = self.config
        if self.kind is AugKind.GAUSSIAN:
            s = torch.randint(1, max(cfg.s_max, 1) + 1, (n,), generator=generator)
            keep = torch.rand(n, generator=generator) >= cfg.p_zero
            return torch.where(keep & (cfg.s_max > 0), s, 0).float()
        if self.kind is AugKind.BLUR:
            sig = cfg.sigma_min + (cfg.sigma_max - cfg.sigma_min) * torch.rand(n, generator=generator)
            on = torch.rand(n, generator=generator) < cfg.p_blur
            return torch.where(on, sig, 0.0)
        return torch.zeros(n)

    def check_sampling_level(self, level: float) -> None:
        """Raise ``ValueError`` unless ``level`` is one this stage can be sampled at."""
        if self.kind is AugKind.GAUSSIAN:
            self.check_level(level)
        elif level:
            raise ValueError(f"augmentation level {level} given, but this stage's augmentation is "
                             f"{self.kind.value!r}, which applies none at sampling time; pass 0")

    def inference_levels(self, n: int, level: float) -> Tensor:
        """Sampling levels ``[n]``: the chosen ``s`` for Gaussian (with a warning above the trained
        range, ``augment.s_max``); blur and none use no augmentation."""
        self.check_sampling_level(level)
        if self.kind is not AugKind.GAUSSIAN:
            return torch.zeros(n)
        if level > self.config.s_max:
            warnings.warn(f"augmentation level s = {level:g} lies above the levels this stage was trained on "
                          f"(augment.s_max = {self.config.s_max}): its output there is an extrapolation")
        return torch.full((n,), float(level))

    def check_level(self, level: float) -> None:
        if not 0 <= level <= self.steps or float(level) != int(level):
            raise ValueError(f"augmentation level s must be an integer in [0, {self.steps}], got {level}")

    def apply(self, z0: Tensor, level: Tensor, noise: Tensor | None = None) -> Tensor:
        """Corrupt ``z0`` ``[N, C, h, w]`` at per-example ``level`` ``[N]``. Gaussian needs ``noise``
        (same shape as ``z0``); at ``level = 0`` every kind is the identity."""
        if self.kind is AugKind.GAUSSIAN:
            if noise is None:
                raise ValueError("Gaussian augmentation needs noise")
            return self.process.q_sample(z0, level.long().to(z0.device), noise)
        if self.kind is AugKind.BLUR:
            return gaussian_blur3x3(z0, level)
        return z0

    def network_level(self, level: Tensor) -> Tensor | None:
        """What the network is told: ``s / T`` for Gaussian augmentation, nothing otherwise."""
        return level.float() / self.steps if self.network_sees_level else None
