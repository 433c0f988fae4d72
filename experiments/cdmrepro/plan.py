"""The experiment's stages: one shared base, three SR stages (no / Gaussian / blur augmentation)
and a single-stage model given the training FLOPs of base + one SR stage, at the profile's scale
(8 -> 32 px with the presets as they are, or other resolutions: :func:`at_scale`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from cdm.config import DERIVED_UNET_FIELDS, ConfigError, StageConfig, deep_merge, load_stage_config, to_dict
from cdm.flops import train_flops_per_image

from .profiles import Profile, Variant

BASE, SINGLE = "base", "single"
SR_ROWS = ("sr-none", "sr-gaussian", "sr-blur")  # the SR stages, by augmentation
AUGMENT = {"sr-none": "none", "sr-gaussian": "gaussian", "sr-blur": "blur"}


@dataclass
class StudyStage:
    """One stage a study trains: its row key, resolved config and training FLOPs (not a sampling plan,
    :class:`cdm.cascade.StagePlan`)."""
    key: str  # base, sr-none, sr-gaussian, sr-blur, single
    config: StageConfig  # resolved
    flops_per_image: int  # one training example, forward + backward (cdm.flops)

    @property
    def train_flops(self) -> int:
        return self.config.train.steps * self.config.train.batch_size * self.flops_per_image


def _set_steps(cfg: StageConfig, steps: float) -> StageConfig:
    """Train for ``round(steps)`` (at least 1) steps, checkpointing and sampling no later than the end."""
    t = cfg.train
    t.steps = max(1, round(steps))
    t.ckpt_every = min(t.ckpt_every, t.steps)
    t.sample_every = min(t.sample_every, t.steps)
    return cfg


def _scaled(cfg: StageConfig, scale: float) -> StageConfig:
    return _set_steps(cfg, cfg.train.steps * scale)


def _match_flops(plan: StudyStage, budget: int) -> StudyStage:
    """``plan`` trained for as many steps as make its training FLOPs ``budget``."""
    _set_steps(plan.config, budget / (plan.config.train.batch_size * plan.flops_per_image))
    return plan


def _plan(key: str, cfg: StageConfig, channels: int, num_classes: int) -> StudyStage:
    cfg.resolve(channels=channels, num_classes=num_classes)
    return StudyStage(key, cfg, train_flops_per_image(copy.deepcopy(cfg)))


def plan_stages(profile: Profile, device: str, data_path: str = "", channels: int = 1,
                num_classes: int = 10) -> dict[str, StudyStage]:
    """Every stage's resolved config, at the profile's scale. The SR stages are the ``fmnist-sr8to32`` preset with
    ``augment.kind`` none / gaussian (as shipped) / blur; the single stage is ``fmnist-single32``
    with the SR stage's U-Net (without the low-res input) and batch size, trained for as many
    steps as make its training FLOPs those of the base plus one (Gaussian) SR stage. ``data_path``:
    the Fashion-MNIST folder (default: Debian's)."""
    def load(preset: str, kind: str, name: str, extra: dict | None = None) -> StageConfig:
        return _load(profile, preset, kind, name, device, data_path, extra)

    plans = {BASE: _plan(BASE, _scaled(load("fmnist-base8", "base", "fmnist-base8"), profile.steps_scale),
                         channels, num_classes)}
    for key in SR_ROWS:
        cfg = load("fmnist-sr8to32", "sr", f"fmnist-sr8to32-{AUGMENT[key]}", {"augment": {"kind": AUGMENT[key]}})
        plans[key] = _plan(key, _scaled(cfg, profile.steps_scale), channels, num_classes)
    sr = plans["sr-gaussian"].config
    unet = {k: v for k, v in to_dict(sr.unet).items() if k not in DERIVED_UNET_FIELDS}
    single = load("fmnist-single32", "single", "fmnist-single32-matched",
                  {"unet": unet, "train": {"batch_size": sr.train.batch_size}})
    plans[SINGLE] = _match_flops(_plan(SINGLE, single, channels, num_classes), cascade_flops(plans, "sr-gaussian"))
    return plans


# The studies train without label dropout, as every stage did before the presets took
# train.p_uncond = 0.1 for classifier-free guidance: pinned, so that a study started
# before keeps its configs (and resumes), and its rows stay comparable. Nothing here samples guided.
STUDY_PINS = ("train.p_uncond=0",)
# Their SR stages also keep the share of clean training examples they were run with, 0.1, whatever the
# preset says (it said 0.7 for a while). A config identical to the one a cell was recorded with, so
# recorded cells stay valid.
SR_PINS = ("augment.p_zero=0.1",)


def at_scale(profile: Profile, kind: str) -> dict:
    """The config keys that put a stage of ``kind`` (base, sr, single) at the profile's scale: its
    resolutions and the study's data (:attr:`Profile.resolution`, ``base_resolution``, ``fit``)."""
    res, low = {"base": (profile.base_resolution, 0), "sr": (profile.resolution, profile.base_resolution),
                "single": (profile.resolution, 0)}[kind]
    return {"resolution": res, "lowres_resolution": low, "data": {"resolution": profile.resolution, "fit": profile.fit}}


def _load(profile: Profile, preset: str, kind: str, name: str, device: str, data_path: str,
          extra: dict | None = None, overrides: tuple[str, ...] = ()) -> StageConfig:
    """The preset at the profile's scale (:func:`at_scale`), then ``extra`` (a nested dict), then the
    study's pins (and an SR stage's), the profile's overrides of ``kind``, the machine, and ``overrides``."""
    over = [*STUDY_PINS, *(SR_PINS if kind == "sr" else ()), *profile.overrides.get(kind, ()), f"train.device={device}",
            f"train.seed={profile.seed}",
            *([f"data.path={data_path}"] if data_path else []), *overrides]
    return load_stage_config(preset, over, extra=deep_merge(at_scale(profile, kind), {"name": name, **(extra or {})}))


def plan_variant(profile: Profile, variant: Variant, plans: dict[str, StudyStage], device: str, data_path: str = "",
                 channels: int = 1, num_classes: int = 10) -> StudyStage:
    """A diagnostic variant of a stage (``plans``: :func:`plan_stages`'): an SR row's config with
    the variant's overrides on top and ``variant.steps_factor`` times its (profile-scaled) training
    steps; or the single stage retrained for the training FLOPs of the cascade row ``match_flops``."""
    if variant.row == SINGLE:
        if variant.overrides or variant.match_flops not in plans or variant.match_flops == SINGLE:
            raise ConfigError(f"diagnostic variant {variant.key!r}: a single-stage variant takes no overrides and "
                              f"match_flops naming a cascade row planned before it, got {variant.match_flops!r}")
        cfg = copy.deepcopy(plans[SINGLE].config)
        cfg.name = f"{cfg.name}-{variant.key.removeprefix('single-')}"
        return _match_flops(_plan(variant.key, cfg, channels, num_classes), cascade_flops(plans, variant.match_flops))
    if variant.row not in AUGMENT:
        raise ConfigError(f"diagnostic variant {variant.key!r}: row must be one of {', '.join(AUGMENT)} or "
                          f"{SINGLE}, got {variant.row!r}")
    cfg = _load(profile, "fmnist-sr8to32", "sr", f"fmnist-sr8to32-{variant.key.removeprefix('sr-')}",
                device, data_path, {"augment": {"kind": AUGMENT[variant.row]}}, variant.overrides)
    return _plan(variant.key, _scaled(cfg, profile.steps_scale * variant.steps_factor), channels, num_classes)


def plan_all(profile: Profile, device: str, data_path: str = "", channels: int = 1, num_classes: int = 10,
             diagnostics: bool = False) -> dict[str, StudyStage]:
    """:func:`plan_stages`, then (with ``diagnostics``) the profile's variants in their order."""
    plans = plan_stages(profile, device, data_path, channels, num_classes)
    for v in profile.diagnostics if diagnostics else ():
        plans[v.key] = plan_variant(profile, v, plans, device, data_path, channels, num_classes)
    return plans


def cascade_flops(plans: dict[str, StudyStage], key: str) -> int:
    """Training FLOPs behind a row: a single stage's own, or base + that SR stage."""
    plan = plans[key]
    return plan.train_flops if not plan.config.lowres_resolution else plans[BASE].train_flops + plan.train_flops
