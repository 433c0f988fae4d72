"""Training-recipe options that change how fast a stage converges, not what it models.

Each is a key of :class:`cdm.config.TrainConfig` and each is a pure function here, so that its
maths has one home and one test:

- **loss weighting** (``train.loss_weight``): ``uniform`` is the plain mean squared error of the
  network's own target (DDPM's simple loss for ``eps``, the ``v``-MSE for ``v``); ``min-snr`` is
  Min-SNR-gamma (Hang et al., ICCV 2023, eq. 7): every example's loss is rescaled so that, whatever
  the prediction target, it equals ``min(SNR_t, gamma) * ||x0 - x0_hat||^2``. It caps the weight
  of nearly-clean times, whose easy gradients otherwise dominate (and conflict with) the rest.
- **learning-rate schedule** (``train.lr_schedule``): linear warm-up, then ``constant``, or a
  ``cosine`` / ``linear`` decay to zero at ``train.steps``.

The SNR of a time ``t`` is ``alpha_bar_t / (1 - alpha_bar_t)``; the network's prediction target
(``eps`` or ``v``) and the schedule live in :mod:`cdm.diffusion`.
"""

from __future__ import annotations

import enum
import math

import torch
from torch import Tensor

from .diffusion import Prediction


class LossWeight(str, enum.Enum):
    UNIFORM = "uniform"  # the MSE of the network's target, unweighted (Ho et al. 2020)
    MIN_SNR = "min-snr"  # Min-SNR-gamma (Hang et al. 2023)


class LRSchedule(str, enum.Enum):
    CONSTANT = "constant"
    COSINE = "cosine"  # half a cosine from lr down to 0 over the steps after warm-up
    LINEAR = "linear"  # a straight line from lr down to 0 over the steps after warm-up


def loss_weight(snr: Tensor, prediction: Prediction | str, kind: LossWeight | str, gamma: float = 5.0) -> Tensor:
    """Per-example weight ``[N]`` of the squared error of the network's target at SNR ``snr`` ``[N]``.

    ``min-snr``: with ``x_t = a x0 + s eps`` (``a^2 + s^2 = 1``, ``SNR = a^2 / s^2``), the errors of
    the three parameterisations are tied by ``||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2`` and
    ``||v - v_hat||^2 = (1 + SNR) ||x0 - x0_hat||^2``, so the target ``min(SNR, gamma) ||x0 -
    x0_hat||^2`` is the eps-error times ``min(SNR, gamma) / SNR``, or the v-error times
    ``min(SNR, gamma) / (SNR + 1)``. ``uniform``: ones."""
    kind, prediction = LossWeight(kind), Prediction(prediction)
    if kind is LossWeight.UNIFORM:
        return torch.ones_like(snr)
    capped = snr.clamp(max=gamma)
    if prediction is Prediction.EPS:
        return capped / snr
    return capped / (snr + 1)


def lr_factor(step: int, total: int, warmup: int, schedule: LRSchedule | str) -> float:
    """The learning rate of optimiser step ``step`` (0-based) as a fraction of ``train.lr``: a linear
    warm-up over ``warmup`` steps, then constant or decaying to 0 at step ``total``."""
    schedule = LRSchedule(schedule)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule is LRSchedule.CONSTANT or total <= warmup:
        return 1.0
    frac = min(1.0, (step - warmup) / (total - warmup))  # 0 at the end of warm-up, 1 at the end
    if schedule is LRSchedule.COSINE:
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    return 1.0 - frac
