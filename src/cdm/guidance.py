"""Classifier-free guidance (Ho & Salimans 2022) and x0 thresholding, as one wrapper of the model
function that every sampler calls, so every sampler, truncation and learned variance work with it.

**Convention**: guidance weight ``w >= 0``; the guided prediction is

    pred_w = (1 + w) * pred(x_t | c) - w * pred(x_t | no class)

so ``w = 0`` is the conditional model alone, unguided (Imagen's "guidance scale" is ``1 + w``).
The formula is linear, so it is the same whether the network predicts eps or v. A learned variance
keeps the conditional pass's. Both passes go through the network as one batch of ``2N``.

**Interval** ``[lo, hi]`` (fractions of T): guidance applies only at steps with ``lo <= t / T <= hi``
(Kynkäänniemi et al. 2024 guide only in a middle range of noise levels); elsewhere the step is
unguided and the unconditional pass is skipped.

**Thresholding** of the x0 estimate the samplers build from the prediction: ``static`` clips it to
``[-1, 1]`` (the samplers' default, as before guidance existed); ``dynamic`` (Imagen, Saharia et
al. 2022) first divides each sample's x0 by ``max(1, q)``, ``q`` its 99.5th percentile of ``|x0|``,
which keeps high guidance weights from saturating; ``none`` uses x0 as predicted.
"""

from __future__ import annotations

import enum
from typing import Callable

import torch
from torch import Tensor

from .diffusion import GaussianDiffusion

Net = Callable[[Tensor, Tensor, dict], Tensor]  # (x_t [N, C, H, W], t [N], conditioning) -> raw output
ModelFn = Callable[[Tensor, Tensor], Tensor]
DYNAMIC_PERCENTILE = 0.995


class Threshold(str, enum.Enum):
    STATIC = "static"
    DYNAMIC = "dynamic"
    NONE = "none"


def _cat(a: dict, b: dict) -> dict:
    return {k: None if a[k] is None else torch.cat([a[k], b[k]]) for k in a}


def dynamic_threshold(x0: Tensor, percentile: float = DYNAMIC_PERCENTILE) -> Tensor:
    """Imagen's dynamic thresholding of ``x0`` ``[N, C, H, W]``: each sample divided by ``max(1, q)``
    (``q``: its ``percentile`` of ``|x0|``) and clipped to ``[-1, 1]``."""
    q = torch.quantile(x0.detach().abs().flatten(1).float(), percentile, dim=1).clamp(min=1.0)
    q = q.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return x0.clamp(-q, q) / q


def guided_model(net: Net, cond: dict, uncond: dict | None, diffusion: GaussianDiffusion, weight: float = 0.0,
                 interval: tuple[float, float] = (0.0, 1.0), threshold: str = "static") -> ModelFn:
    """The model function a sampler calls: ``net`` conditioned on ``cond``, guided with weight
    ``weight`` against ``uncond`` (the same inputs with the "no class" label) at the steps inside
    ``interval``, and its x0 estimate thresholded ``dynamic``-ally if asked (module docstring).
    With ``weight = 0`` and no dynamic thresholding it is exactly ``net(x, t, cond)``."""
    th = Threshold(threshold)
    if weight and uncond is None:
        raise ValueError("guidance needs the unconditional inputs (uncond)")
    lo, hi, T = interval[0], interval[1], diffusion.T

    def model(x: Tensor, t: Tensor) -> Tensor:
        frac = float(t[0]) / T  # every sample of a step is at the same time
        if weight and lo <= frac <= hi:
            n = x.shape[0]
            both = net(torch.cat([x, x]), torch.cat([t, t]), _cat(cond, uncond))
            c, u = both[:n], both[n:]
            k = x.shape[1]  # mean channels; the rest (a learned variance) is the conditional pass's
            out = torch.cat([(1 + weight) * c[:, :k] - weight * u[:, :k], c[:, k:]], dim=1)
        else:
            out = net(x, t, cond)
        if th is Threshold.DYNAMIC:
            pred, rest = out[:, :x.shape[1]], out[:, x.shape[1]:]
            x0, _ = diffusion.predict_x0_eps(pred, x, t)
            x0 = dynamic_threshold(x0)
            ab = diffusion.abar(t).view(-1, 1, 1, 1).to(x.dtype)
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
            out = torch.cat([diffusion.target(x0, eps, t).to(out.dtype), rest], dim=1)
        return out

    if not weight and th is not Threshold.DYNAMIC:
        return lambda x, t: net(x, t, cond)
    return model
