"""Counted floating-point operations of a stage's training step.

Counts come from :class:`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and
attention; element-wise work such as normalisation and activations is not counted, as is usual
for FLOP figures), on a one-image batch, so they are exact for the network and independent of the
machine. One multiply-add counts as two FLOPs. Used to give a baseline the same training compute
as a cascade, and to report achieved FLOP/s against a machine's matmul peak. Attention is counted
on PyTorch's unfused (math) kernel, whose matmuls the counter sees; the fused CPU kernel that
training and sampling use does the same arithmetic but is invisible to the counter.

Counted on meta tensors (shapes only, no memory and no arithmetic), so a count takes about a second
for a network of any size; a value check in the code (``if (t < 0).any(): raise``) reads as passed
(:class:`ChecksPass`), since the counted inputs are valid by construction.

A stage trained on crops (``train.crop``) is counted on one crop, the image it trains on; gradient
accumulation does not change the count, and activation checkpointing's recomputation is not counted
(the network's FLOPs, as in model-FLOPs utilisation).
"""

from __future__ import annotations

import copy

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .config import StageConfig
from .stage import Stage

__all__ = ["train_flops_per_image", "ChecksPass"]


class ChecksPass(TorchDispatchMode):
    """Under fake or meta tensors a Python-level check of values (``if (t < 0).any(): raise``) cannot
    be decided; it reads as passed (False / 0), for inputs that are valid by construction."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return False if args[0].dtype == torch.bool else 0
        return func(*args, **(kwargs or {}))


def _one_image_inputs(stage: Stage) -> tuple[torch.Tensor, torch.Tensor, dict]:
    c, r = stage.channels, stage.config.train.crop or stage.resolution  # a training image's side
    x = torch.zeros(1, c, r, r)
    t = torch.full((1,), stage.diffusion.T // 2, dtype=torch.long)
    label = torch.zeros(1, dtype=torch.long) if stage.num_classes else None
    if stage.is_super_resolution:
        lo_side = r * stage.lowres_resolution // stage.resolution
        lo = torch.zeros(1, c, lo_side, lo_side)
        cond = stage.conditioning(label, lo, torch.zeros(1, dtype=torch.long), torch.zeros_like(lo))
    else:
        cond = stage.conditioning(label)
    return x, t, cond


def _stage_fp32(config: StageConfig) -> Stage:
    cfg = copy.deepcopy(config)
    cfg.train.precision = "fp32"  # count the network, not autocast's casts
    cfg.unet.checkpoint = False  # ... nor the recomputation of checkpointed blocks
    torch.manual_seed(0)
    return Stage(cfg)


def train_flops_per_image(config: StageConfig) -> int:
    """FLOPs of one training example: forward and backward through the network (the optimiser
    step is per parameter, not per image, and is not counted). ``config`` resolved."""
    with torch.device("meta"), ChecksPass():
        stage = _stage_fp32(config)
        x, t, cond = _one_image_inputs(stage)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            stage(x, t, cond).sum().backward()
    return int(fc.get_total_flops())
