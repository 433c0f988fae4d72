"""Profiles: how big a run is. ``cpu`` (the default) is the laptop-scale experiment at 8 -> 32 px,
``smoke`` a CI-sized run of every code path, ``gpu`` the real scale at 16 -> 64 px (untested on a GPU)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from cdm.config import ConfigError


@dataclass(frozen=True)
class Variant:
    """A diagnostic variant of a stage (run with ``--diagnostics``), scored in classifier space only.
    An SR row (``sr-none``, ``sr-gaussian`` or ``sr-blur``): its config with ``overrides`` on top and
    ``steps_factor`` times its training steps, scored with generated (non-truncated) and
    ground-truth inputs at ``levels``. ``single``: the single stage retrained for the training
    FLOPs of the cascade row ``match_flops``."""
    key: str  # its row name, e.g. "sr-gaussian-p50"
    about: str
    overrides: tuple[str, ...] = ()
    steps_factor: float = 1.0
    levels: tuple[int, ...] = (0, 100, 200)
    row: str = "sr-gaussian"  # or "single": the FLOP-matched single stage, retrained for ...
    match_flops: str = ""  # ... the training FLOPs of this row (base + its SR stage)


# Why is the amortised Gaussian stage weaker than the no-augmentation stage even with real inputs
# at s = 0? Its code path trained on clean inputs only (a bug would show here), more clean
# examples, twice the training; and how much a second training seed moves the numbers.
DIAGNOSTICS = (
    Variant("sr-gaussian-s0", "s = 0 always (augment.s_max=0): the Gaussian stage's code path, no augmentation",
            ("augment.s_max=0",), levels=(0,)),
    Variant("sr-gaussian-p50", "half the examples clean (augment.p_zero=0.5)", ("augment.p_zero=0.5",)),
    Variant("sr-gaussian-2x", "twice the training steps", steps_factor=2.0),
    Variant("sr-none-2x", "no augmentation, twice the training steps", steps_factor=2.0, levels=(0,), row="sr-none"),
    Variant("single-2x", "the single stage, FLOP-matched to base + sr-gaussian-2x", row="single",
            match_flops="sr-gaussian-2x"),
    Variant("sr-none-seed1", "no augmentation, training seed 1", ("train.seed=1",), levels=(0,), row="sr-none"),
    Variant("sr-gaussian-seed1", "training seed 1", ("train.seed=1",), levels=(0, 100)),
)


@dataclass(frozen=True)
class Profile:
    name: str
    about: str
    # The scale: the base stage at base_resolution px, the last SR stage and the single stage at
    # resolution px (4x: the three-stage cascade puts its middle stage at 2x), Fashion-MNIST's
    # 28-px images brought to `resolution` by `fit` ("pad": a black border; "resize-up": bicubic
    # upsampling, which adds no detail a 28-px image lacks).
    resolution: int = 32
    base_resolution: int = 8
    fit: str = "pad"
    steps_scale: float = 1.0  # multiplies the presets' training steps (the single stage follows by FLOPs)
    n: int = 1000  # samples per point
    n_ref: int = 10000  # real test images: the classifier-space reference
    n_incep: int = 500  # the first n_incep samples of a point are scored in FID-Inception space (0: none)
    n_incep_ref: int = 2000  # real test images: the Inception-space reference
    # rows scored in Inception space (None: all). An FID in 2048-d costs ~3 s on one thread.
    inception_rows: tuple[str, ...] | None = None
    levels: tuple[int, ...] = (0, 25, 50, 100, 200, 300, 500)  # Gaussian augmentation levels s
    bootstrap: int = 50  # resamples for the bootstrap standard error of FID
    # SDE-DPM-Solver++(2M), 25 uniform steps per stage: within 10% of 250-step ancestral sampling in
    # classifier FID on the demo cascade, where the deterministic solvers stay ~2x worse at any step
    # count (docs/BENCHMARKS.md, "Sample quality against network evaluations")
    sampler: str = "dpmpp-2m-sde"
    sample_steps: int = 25  # per stage
    spacing: str = "uniform"
    sample_batch: int = 250
    device: str = "cpu"
    # key=value overrides per stage kind ("base", "sr", "single"), on top of the presets
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    classifier: dict[str, Any] = field(default_factory=dict)  # ClassifierConfig of the feature space
    classifier_limit: int = 0  # train the domain classifier on N train images, class-stratified (0: all)
    cas: dict[str, Any] = field(default_factory=lambda: {"epochs": 4})  # ClassifierConfig of CAS
    cas_test_limit: int = 0  # CAS is tested on N real test images, class-stratified (0: all 10,000)
    seed: int = 0
    diagnostics: tuple[Variant, ...] = DIAGNOSTICS  # variants of the SR stages (--diagnostics)


_TINY_BASE = ("unet.base_channels=8", "unet.channel_mult=1,2", "unet.num_res_blocks=1",
              "unet.attention_resolutions=4", "unet.head_channels=8", "train.batch_size=8")
_TINY_32 = ("unet.base_channels=8", "unet.channel_mult=1,2", "unet.num_res_blocks=1",
            "unet.attention_resolutions=16", "unet.head_channels=8", "train.batch_size=8")
# the presets' networks one level deeper, for 4x the pixels (the 16-px base stage: feature maps of 16, 8
# and 4 px; the SR stages and the single stage, which takes the SR stage's network: 64, 32, 16, 8 px)
_UNET_16 = ("unet.channel_mult=1,2,2", "unet.attention_resolutions=4")
_UNET_64 = ("unet.channel_mult=1,2,2,4", "unet.attention_resolutions=8")
_SMOKE_TRAIN = ("train.sample_every=0", "train.sample_steps=2", "train.log_every=1")

PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        name="cpu", about="laptop scale: the presets' training steps, 1000 samples per point; "
                          "about 1.75 h on 2 CPU cores (+1.7 h with --diagnostics)"),
    "smoke": Profile(
        name="smoke", about="CI size: tiny networks, a few training steps, 16 samples per point; every "
                            "code path, meaningless numbers",
        steps_scale=0.004, n=16, n_ref=64, n_incep=4, n_incep_ref=8, inception_rows=("single",),
        levels=(0, 100), bootstrap=10, sample_steps=3, sample_batch=16,
        overrides={"base": _TINY_BASE + _SMOKE_TRAIN, "sr": _TINY_32 + _SMOKE_TRAIN, "single": _SMOKE_TRAIN},
        classifier={"width": 8, "feature_dim": 16, "epochs": 1, "min_steps": 40, "batch_size": 64},
        classifier_limit=2560, cas_test_limit=500,
        cas={"width": 8, "feature_dim": 16, "epochs": 1, "min_steps": 0, "batch_size": 16},
        diagnostics=(Variant("sr-gaussian-p50", "half the examples clean", ("augment.p_zero=0.5",),
                             steps_factor=0.5, levels=(0,)),
                     Variant("single-p50", "FLOP-matched to base + sr-gaussian-p50", row="single",
                             match_flops="sr-gaussian-p50"))),
    "gpu": Profile(
        name="gpu", about="real scale, UNTESTED on a GPU at this size: 16 -> 64 px on Fashion-MNIST upsampled "
                          "(bicubic) from 28 to 64 px, 10x the presets' training steps, 10000 samples per point, "
                          "every sample scored in Inception space",
        resolution=64, base_resolution=16, fit="resize-up",
        steps_scale=10.0, n=10000, n_ref=10000, n_incep=10000, n_incep_ref=10000, sample_batch=1000,
        device="auto", overrides={"base": _UNET_16, "sr": _UNET_64}),
}


def get_profile(name: str, steps_scale: float | None = None, n: int | None = None) -> Profile:
    """A named profile with optional overrides of its training-step scale and samples per point."""
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r} (choose from {', '.join(PROFILES)})")
    p = PROFILES[name]
    if steps_scale is not None:
        if steps_scale <= 0:
            raise ConfigError(f"--steps-scale must be > 0, got {steps_scale}")
        p = replace(p, steps_scale=steps_scale)
    if n is not None:
        if n < 2:
            raise ConfigError(f"--n must be >= 2 (an FID needs two samples), got {n}")
        p = replace(p, n=n, n_incep=min(p.n_incep, n))
    return p
