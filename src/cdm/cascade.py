"""A cascade: a base stage followed by any number of super-resolution stages.

Sampling follows docs/METHOD.md §4. For each SR stage ``i`` with level ``s_i``:

- **non-truncated**: the stage below runs to ``z_0``; then ``z_s ~ q(z_s | z_0)`` through the SR
  stage's augmentation (the same call as in training);
- **truncated**: the stage below stops its reverse process at ``s_i`` and hands over ``z_s``
  unchanged. This is exact only if the SR stage's augmentation process *is* the lower stage's
  forward process, which :meth:`Cascade.validate` checks.

A cascade is validated when it is built; errors say what to change.
"""

from __future__ import annotations

import enum
import math
import warnings
from dataclasses import dataclass, field, fields, replace
from functools import partial

import torch
from torch import Tensor

from .errors import CdmError
from .augment import AugKind
from .diffusion import Spacing, time_grid
from .guidance import Threshold, guided_model
from .samplers import CHURN_SAMPLERS, SAMPLERS, Churn, SeededNoise, derive_seed
from .stage import Stage


class Mode(str, enum.Enum):
    TRUNCATED = "truncated"
    NON_TRUNCATED = "non-truncated"


class CascadeError(CdmError, ValueError):
    """The stages do not fit together; the message says what to change."""


# How a stage is sampled unless said otherwise: DPM-Solver++(2M) on EDM's grid, 6 network
# evaluations. Measured on the Fashion-MNIST demo cascade with two training seeds (docs/BENCHMARKS.md,
# "Few network evaluations per stage"): the whole cascade at 6 + 6 scores as well as with 25 SDE
# steps per stage (and better than at 10 + 10); each stage alone is as good as with 250 ancestral steps.
DEFAULT_SAMPLER, DEFAULT_SPACING, DEFAULT_STEPS = "dpmpp-2m", "edm", 6


@dataclass
class StagePlan:
    """How one stage is sampled."""
    steps: int = DEFAULT_STEPS  # sampler steps (network evaluations for first-order samplers)
    level: int = 0  # augmentation level s the (SR) stage's input is at; 0 for the base
    sampler: str = DEFAULT_SAMPLER  # a name in samplers.SAMPLERS
    spacing: str = DEFAULT_SPACING  # diffusion.Spacing of the stage's time grid
    guidance: float = 0.0  # classifier-free guidance weight w (0: unguided; cdm.guidance)
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # guided where lo <= t/T <= hi
    threshold: str = "static"  # x0 estimate: static (clip to [-1, 1]), dynamic (Imagen) or none
    churn: float = 0.0  # EDM's S_churn for the deterministic samplers (samplers.Churn; 0: none)
    churn_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # churn where lo <= t/T <= hi
    # SR stages: start the reverse process at t = start * T from the upsampled input, noised by the
    # forward process (CCDF, Chung et al. 2022), not from pure noise at T; 1: from noise. Base: 1.
    start: float = 1.0

    def check(self, where: str = "") -> None:
        """Raise :class:`CascadeError` unless the fields name things that exist."""
        if self.sampler not in SAMPLERS:
            raise CascadeError(f"{where}unknown sampler {self.sampler!r} (choose from {', '.join(SAMPLERS)})")
        if self.spacing not in {sp.value for sp in Spacing}:
            raise CascadeError(f"{where}unknown grid spacing {self.spacing!r} "
                               f"(choose from {', '.join(sp.value for sp in Spacing)})")
        if self.steps < 1:
            raise CascadeError(f"{where}steps must be >= 1, got {self.steps}")
        if not (self.guidance >= 0 and math.isfinite(self.guidance)):
            raise CascadeError(f"{where}the guidance weight must be a number >= 0 (0: unguided), got {self.guidance}")
        iv = self.guidance_interval
        if len(iv) != 2 or not 0 <= iv[0] <= iv[1] <= 1:
            raise CascadeError(f"{where}the guidance interval must be two fractions of T, 0 <= lo <= hi <= 1, got {iv}")
        if self.threshold not in {th.value for th in Threshold}:
            raise CascadeError(f"{where}unknown threshold {self.threshold!r} (choose from "
                               f"{', '.join(th.value for th in Threshold)})")
        if not (self.churn >= 0 and math.isfinite(self.churn)):
            raise CascadeError(f"{where}churn must be a number >= 0 (0: none), got {self.churn}")
        if self.churn and self.sampler not in CHURN_SAMPLERS:
            raise CascadeError(f"{where}churn applies to the deterministic samplers ({', '.join(CHURN_SAMPLERS)}); "
                               f"{self.sampler!r} draws its own noise: use churn 0 with it")
        iv = self.churn_interval
        if len(iv) != 2 or not 0 <= iv[0] <= iv[1] <= 1:
            raise CascadeError(f"{where}the churn interval must be two fractions of T, 0 <= lo <= hi <= 1, got {iv}")
        if not 0 < self.start <= 1:
            raise CascadeError(f"{where}start must be a fraction of T in (0, 1] (1: from pure noise), got {self.start}")


@dataclass
class SamplingPlan:
    """How a cascade is sampled: the cascade-wide ``mode`` and one :class:`StagePlan` per stage.

    The one object every sampling caller passes (``Cascade.sample``, eval, sweep, nll, sharded
    sampling) and the ``sampling`` entry of a cascade file. A new sampling option is a field here."""
    mode: str = "non-truncated"  # Mode
    stages: list[StagePlan] = field(default_factory=list)

    @classmethod
    def uniform(cls, num_stages: int, steps: int | list[int] = DEFAULT_STEPS, levels: list[int] | None = None,
                mode: str = "non-truncated", sampler: str = DEFAULT_SAMPLER,
                spacing: str = DEFAULT_SPACING) -> "SamplingPlan":
        """A plan with the same sampler and spacing for every stage; ``steps`` one value or one per
        stage; ``levels`` one per stage (0 for the base; default all 0)."""
        steps = [steps] * num_stages if isinstance(steps, int) else list(steps)
        levels = list(levels) if levels is not None else [0] * num_stages
        if len(steps) != num_stages or len(levels) != num_stages:
            raise CascadeError(f"give one value per stage ({num_stages}) for steps and levels, "
                               f"got {len(steps)} and {len(levels)}")
        return cls(mode=mode, stages=[StagePlan(n, s, sampler, spacing) for n, s in zip(steps, levels)])

    def override(self, steps: list[int] | None = None, levels: list[int] | None = None, mode: str | None = None,
                 **every_stage) -> "SamplingPlan":
        """A copy with the given settings replaced: ``steps`` one value or one per stage, ``levels``
        one per stage (0 for the base); ``start`` one per stage (1 for the base); ``guidance`` one
        value or one per stage; any other :class:`StagePlan` field (``sampler``, ``spacing``,
        ``guidance_interval``, ``threshold``, ``churn``, ``churn_interval``) for every stage.
        ``None`` keeps a setting."""
        k = len(self.stages)
        per_stage = {"steps": steps, "level": levels, "guidance": every_stage.pop("guidance", None),
                     "start": every_stage.pop("start", None)}
        for name, v in per_stage.items():
            exact = name in ("level", "start")  # meaningless for the base: no shared value
            if v and len(v) not in ((k,) if exact else (1, k)):
                want = f"{k}" if exact else f"1 or {k}"
                raise CascadeError(f"{name if name != 'level' else 'levels'} needs {want} values (one per stage), "
                                   f"got {len(v)}")
        unknown = set(every_stage) - {f.name for f in fields(StagePlan)}
        if unknown:
            raise CascadeError(f"unknown sampling settings {sorted(unknown)}")
        stages = []
        for i, st in enumerate(self.stages):
            new = {n: (v[i] if len(v) == k else v[0]) for n, v in per_stage.items() if v}
            new.update({n: v for n, v in every_stage.items() if v is not None})
            stages.append(replace(st, **new))
        return SamplingPlan(mode=mode or self.mode, stages=stages)

    @property
    def levels(self) -> list[int]:
        return [st.level for st in self.stages]

    def check(self) -> None:
        """Raise :class:`CascadeError` unless the mode and every stage's settings exist."""
        if self.mode not in {m.value for m in Mode}:
            raise CascadeError(f"unknown sampling mode {self.mode!r} (choose from {', '.join(m.value for m in Mode)})")
        for i, st in enumerate(self.stages):
            st.check(f"stage {i}: ")


@dataclass
class CascadeOutput:
    images: list[Tensor]  # per stage, its clean output estimate [N, C, R_i, R_i] in [-1, 1]
    inputs: list[Tensor | None]  # per stage, the low-resolution input it was conditioned on (z_s)
    labels: Tensor  # [N]


@torch.no_grad()
def sample_stage(stage: Stage, i: int, labels: Tensor, seeds: list[int], plan: StagePlan,
                 lowres: Tensor | None = None, corrupt: bool = True, stop: int = 0) -> tuple[Tensor, Tensor]:
    """Run one stage, ``stage`` at index ``i`` of its cascade, as ``plan`` says (steps, sampler,
    grid, level): ``(x_stop, x0_hat)``, the state at time ``stop`` and the last estimate of ``x_0``.

    For an SR stage, ``lowres`` ``[N, C, r, r]`` is its input at augmentation level
    ``plan.level``: a clean ``z0`` to corrupt (``corrupt=True``, non-truncated) or the lower
    stage's ``z_s`` (``corrupt=False``, truncated). ``stop > 0`` truncates this stage's own
    reverse process (to hand ``z_stop`` to a truncated stage above). The noise of sample ``j``
    comes from ``seeds[j]`` and ``i`` alone, so a stage's output does not depend on the batch,
    and the sampler's noise is the same in both modes.
    """
    plan.check(f"stage {i}: ")
    info = stage.distill
    if info and (plan.sampler, plan.spacing, plan.steps, stop, plan.churn, plan.start) != (
            info["sampler"], info["spacing"], info["steps"], 0, 0, 1):
        warnings.warn(f"stage {i} ({stage.config.name!r}) is distilled for {info['sampler']} on the {info['spacing']} "
                      f"grid of {info['steps']} steps (untruncated, no churn, start 1); sampling it otherwise leaves that grid "
                      f"(for this stage: sampler {info['sampler']}, spacing {info['spacing']}, steps {info['steps']})")
    dev = stage.device
    n = len(labels)
    noise = SeededNoise([derive_seed(s, i) for s in seeds], dev)
    lab = labels.to(dev)
    if stage.is_super_resolution:
        if lowres is None:
            raise CascadeError(f"stage {i} ({stage.config.name!r}) is a super-resolution stage: pass lowres")
        lv = stage.augmentation.inference_levels(n, plan.level).to(dev)
        aug_noise = None
        if corrupt:  # its own stream: the sampler's noise is then the same in both modes
            aug_noise = SeededNoise([derive_seed(s, i, 1) for s in seeds], dev).randn(*lowres.shape[1:])
        def conditioning(labels: Tensor) -> dict:  # one augmentation draw for both guidance passes
            return stage.conditioning(labels, lowres.to(dev), lv, noise=aug_noise, corrupt=corrupt)
    else:
        def conditioning(labels: Tensor) -> dict:
            return stage.conditioning(labels)
    cond, uncond = conditioning(lab), None
    if plan.guidance:
        if stage.num_classes == 0:
            raise CascadeError(f"stage {i} ({stage.config.name!r}) is unconditional: classifier-free guidance "
                               f"needs a class-conditional stage; use guidance 0 for it")
        if stage.config.train.p_uncond == 0:
            warnings.warn(f"stage {i} ({stage.config.name!r}) was trained without label dropout "
                          f"(train.p_uncond = 0): its unconditional prediction, which guidance uses, is untrained")
        uncond = conditioning(torch.full_like(lab, stage.num_classes))  # the "no class" label
    model = guided_model(stage, cond, uncond, stage.diffusion, plan.guidance, tuple(plan.guidance_interval),
                         plan.threshold)
    T = stage.diffusion.T
    top = T if plan.start == 1 else max(1, round(plan.start * T))
    if top < T:
        if not stage.is_super_resolution:
            raise CascadeError(f"stage {i} ({stage.config.name!r}) is the base stage: it has no input to start "
                               f"from; its start must be 1 (give one start per stage, e.g. 1,{plan.start:g})")
        if not corrupt:
            raise CascadeError(f"stage {i}: a start below 1 needs the clean input of non-truncated sampling; "
                               f"use mode non-truncated or start 1")
        if stop >= top:
            raise CascadeError(f"stage {i}: it starts at t = {top} but is truncated at {stop}; lower the level")
    grid = time_grid(T, plan.steps, stop=stop, spacing=plan.spacing, alpha_bar=stage.diffusion.alpha_bar, start=top)
    x = noise.randn(stage.channels, stage.resolution, stage.resolution)
    if top < T:  # x_top ~ q(x_top | x_0 = the upsampled input): CCDF's start
        up = stage.module.upsample_lowres(lowres.to(dev).float(), stage.resolution)
        x = stage.diffusion.q_sample(up, torch.full((n,), top, device=dev), x)
    sampler = SAMPLERS[plan.sampler]
    if plan.churn:
        sampler = partial(sampler, churn=Churn(plan.churn, len(grid) - 1, tuple(plan.churn_interval)))
    x, x0 = sampler(model, stage.diffusion, x, grid, noise, clip_x0=Threshold(plan.threshold) is not Threshold.NONE)
    if not (torch.isfinite(x).all() and torch.isfinite(x0).all()):
        raise CascadeError(_non_finite(i, stage, plan))
    return x, x0


def _non_finite(i: int, stage: Stage, plan: StagePlan) -> str:
    """Why stage ``i`` sampled NaN/inf, and what to do: diverged weights only when they are not
    finite; with finite weights and guidance, the guidance weight."""
    what = f"stage {i} ({stage.config.name!r}) produced non-finite values"
    if not all(torch.isfinite(p).all() for p in stage.net.parameters()):
        return (f"{what}: its weights are not finite, they have diverged (a run stopped on a NaN loss?); sample from "
                f"an earlier checkpoint of it")
    if plan.guidance:
        return (f"{what} with its weights finite: the guidance weight w={plan.guidance:g} is too large; lower "
                f"--guidance or use --threshold dynamic")
    return (f"{what} with its weights finite: its outputs overflow (weights grown huge before a divergence, or a "
            f"low precision); sample from an earlier checkpoint of it, or with --precision fp32")


class Cascade:
    def __init__(self, stages: list[Stage]):
        self.stages = stages
        self.validate()

    @property
    def num_classes(self) -> int:
        return max(s.num_classes for s in self.stages)

    @property
    def class_names(self) -> list[str]:
        """The names of the classes (label ``k`` is ``class_names[k]``), from the first stage whose
        config carries one per class; ``[]`` if none does."""
        nc = self.num_classes
        return next((list(s.config.data.class_names) for s in self.stages
                     if nc and len(s.config.data.class_names) == nc), [])

    def validate(self, mode: Mode | str | None = None, levels: list[int] | None = None) -> None:
        """Check that consecutive stages fit; with ``mode='truncated'`` also that each SR stage's
        augmentation is its lower stage's forward process; with ``levels``, that they are valid."""
        if not self.stages:
            raise CascadeError("a cascade needs at least one stage")
        if self.stages[0].is_super_resolution:
            raise CascadeError(f"the first stage ({self.stages[0].config.name!r}) is a super-resolution "
                               f"stage; a cascade starts with a base stage (lowres_resolution = 0)")
        classes = {s.num_classes for s in self.stages if s.num_classes > 0}
        if len(classes) > 1:
            raise CascadeError(f"stages disagree on the number of classes: {sorted(classes)}")
        for i, (lo, hi) in enumerate(zip(self.stages[:-1], self.stages[1:]), start=1):
            where = f"stage {i} ({hi.config.name!r}) after stage {i - 1} ({lo.config.name!r})"
            if not hi.is_super_resolution:
                raise CascadeError(f"{where}: only the first stage may be a base stage; "
                                   f"stage {i} has no low-resolution input")
            if hi.lowres_resolution != lo.resolution:
                raise CascadeError(f"{where}: it expects {hi.lowres_resolution}px inputs but the "
                                   f"stage below makes {lo.resolution}px images")
            if hi.channels != lo.channels:
                raise CascadeError(f"{where}: it expects {hi.channels}-channel inputs but the stage "
                                   f"below makes {lo.channels}-channel images")
        if levels is not None:
            if len(levels) != len(self.stages):
                raise CascadeError(f"give one augmentation level per stage ({len(self.stages)}), got {len(levels)}")
            if levels[0] != 0:
                raise CascadeError("the base stage has no augmentation level; use 0 for it")
            for st, s in zip(self.stages[1:], levels[1:]):
                try:
                    st.augmentation.check_sampling_level(s)
                except ValueError as e:
                    raise CascadeError(f"stage {st.config.name!r}: {e}") from None
        if mode is not None and Mode(mode) is Mode.TRUNCATED:
            for i, (lo, hi) in enumerate(zip(self.stages[:-1], self.stages[1:]), start=1):
                aug, dif = hi.config.augment, lo.config.diffusion
                if levels is not None and levels[i] >= lo.diffusion.T:
                    raise CascadeError(f"truncated mode: stage {i - 1} ({lo.config.name!r}) hands over z_s, which "
                                       f"needs s < its T = {lo.diffusion.T}, but stage {i}'s level is {levels[i]}: "
                                       f"lower it or use non-truncated mode")
                if AugKind(aug.kind) is not AugKind.GAUSSIAN:
                    raise CascadeError(f"truncated mode needs Gaussian augmentation, but stage {i} "
                                       f"({hi.config.name!r}) uses {aug.kind!r}: use non-truncated mode")
                if dif.logsnr_shift:
                    raise CascadeError(f"truncated mode: stage {i - 1} ({lo.config.name!r}) has a shifted schedule "
                                       f"(diffusion.logsnr_shift = {dif.logsnr_shift}), which no augmentation "
                                       f"process matches: use non-truncated mode")
                if (aug.schedule, aug.steps) != (dif.schedule, dif.steps):
                    raise CascadeError(
                        f"truncated mode: stage {i}'s augmentation process ({aug.schedule}, {aug.steps} "
                        f"steps) is not the forward process of stage {i - 1} ({dif.schedule}, {dif.steps} "
                        f"steps); retrain stage {i} with augment.schedule={dif.schedule} "
                        f"augment.steps={dif.steps}, or use non-truncated mode")

    def check_labels(self, labels: Tensor) -> None:
        nc = self.num_classes
        if nc == 0:
            return
        if labels.numel() and (labels.min() < 0 or labels.max() > nc):
            raise CascadeError(f"class labels must lie in [0, {nc - 1}] (or {nc} for 'no class'), "
                               f"got {int(labels.min())}..{int(labels.max())}")
        untrained = [i for i, s in enumerate(self.stages)
                     if s.num_classes and s.config.train.p_uncond == 0]
        if untrained and bool((labels == nc).any()):
            warnings.warn(f"class {nc} is the reserved 'no class' label, which stage(s) "
                          f"{', '.join(map(str, untrained))} never saw (trained with train.p_uncond = 0): "
                          f"their samples for it are not unconditional samples; give classes 0..{nc - 1}")

    def sample_stage(self, i: int, labels: Tensor, seeds: list[int], plan: StagePlan,
                     lowres: Tensor | None = None, corrupt: bool = True, stop: int = 0) -> tuple[Tensor, Tensor]:
        """Run stage ``i`` alone (see :func:`sample_stage`)."""
        return sample_stage(self.stages[i], i, labels, seeds, plan, lowres, corrupt, stop)

    @torch.no_grad()
    def sample(self, labels: Tensor, seeds: list[int], plan: SamplingPlan,
               last_stage: int | None = None) -> CascadeOutput:
        """Sample ``len(labels)`` images; image ``j`` depends only on ``seeds[j]`` and ``labels[j]``.

        ``plan.stages[i]`` says how stage i is sampled and the level its SR input is at.
        ``last_stage`` stops the cascade early (inclusive)."""
        plan.check()
        mode = Mode(plan.mode)
        n_st = len(self.stages) if last_stage is None else last_stage + 1
        if len(plan.stages) != len(self.stages):
            raise CascadeError(f"give a sampling plan for each of the {len(self.stages)} stages, "
                               f"got {len(plan.stages)}")
        levels = plan.levels
        self.validate(mode, levels)
        if len(seeds) != len(labels):
            raise CascadeError(f"got {len(labels)} labels but {len(seeds)} seeds")
        self.check_labels(labels)
        images: list[Tensor] = []
        inputs: list[Tensor | None] = []
        handover: Tensor | None = None  # what the previous stage passes on (z_0, or z_s if truncated)
        for i in range(n_st):
            # Truncated mode: this stage stops at the next stage's level and hands over z_s.
            stop = levels[i + 1] if (mode is Mode.TRUNCATED and i + 1 < n_st) else 0
            x, x0 = self.sample_stage(i, labels, seeds, plan.stages[i], lowres=handover,
                                      corrupt=mode is Mode.NON_TRUNCATED, stop=stop)
            inputs.append(handover)
            handover = x.clamp(-1, 1) if stop == 0 else x
            images.append(x0.clamp(-1, 1) if stop else x.clamp(-1, 1))
        return CascadeOutput(images=[im.cpu() for im in images],
                             inputs=[None if z is None else z.cpu() for z in inputs], labels=labels.cpu())
