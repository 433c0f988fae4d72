"""Per-stage checks of an SR stage (the paper's Table 5 ablation and a consistency check).

- ``ground_truth``: the stage conditioned on real low-resolution images, made from the real
  images exactly as training makes its inputs (:meth:`ReferenceSet.inputs`);
- ``generated``: conditioned on the stage below's samples (clean ``z0``), if given;
- ``consistency_psnr``: the output downsampled with the cascade's own resize against the clean
  input it was conditioned on (how closely the stage follows its input).

Both use non-truncated conditioning at the plan's level for that stage.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..cascade import Cascade, SamplingPlan
from ..metrics import consistency_psnr
from .reference import ReferenceSet

# score(images [N, C, R, R] float in [-1, 1]) -> named scores
ScoreFn = Callable[[Tensor], dict]


@torch.no_grad()
def stage_checks(cascade: Cascade, i: int, plan: SamplingPlan, real: ReferenceSet,
                 generated: tuple[Tensor, Tensor] | None, score: ScoreFn, seed: int = 0) -> dict:
    """Checks of SR stage ``i`` (module docstring). ``real``: the real images (their labels too)
    at the data resolution; ``generated = (z0 [n, C, r, r] in [-1, 1], labels [n])``: the stage
    below's samples. Sample ``j`` uses seed ``seed + j``."""
    stage, sp = cascade.stages[i], plan.stages[i]
    n = len(real)
    seeds = list(range(seed, seed + n))
    out: dict = {"stage": i, "name": stage.config.name, "level": sp.level, "steps": sp.steps, "sampler": sp.sampler}
    z_gt = real.inputs(stage.lowres_resolution)
    x_gt = cascade.sample_stage(i, real.labels, seeds, sp, lowres=z_gt)[0].clamp(-1, 1).cpu()
    out["ground_truth"] = {**score(x_gt), "consistency_psnr": consistency_psnr(x_gt, z_gt)}
    if generated is not None:
        z, labels = generated[0][:n].cpu(), generated[1][:n]
        x_gen = cascade.sample_stage(i, labels, seeds[:len(z)], sp, lowres=z)[0].clamp(-1, 1).cpu()
        out["generated"] = {**score(x_gen), "consistency_psnr": consistency_psnr(x_gen, z)}
    return out
