"""One config object per stage, read from TOML or JSON with dotted CLI overrides.

A stage's config nests one dataclass per concept: ``data``, ``unet``, ``diffusion``,
``augment`` and ``train``. The network's interface (its resolution, channels, classes,
low-resolution input and level embedding) is *derived* from the stage and its data set by
:meth:`StageConfig.resolve`, never set by hand, so the pieces cannot disagree. Unknown keys are
errors that suggest the nearest valid key. Presets ship in ``cdm/presets/*.toml``.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .augment import AugKind, AugmentConfig, ConditioningAugmentation
from .data import DataConfig, ImageSet, load_dataset
from .diffusion import DiffusionConfig
from .distributed import is_device_name
from .recipe import LossWeight, LRSchedule
from .typedconfig import ConfigError, coerce, deep_merge, from_dict, parse_overrides, to_dict  # noqa: F401 (re-exported)
from .unet import UNetConfig


PRECISIONS = ("auto", "bf16", "fp32")  # train.precision and the samplers' --precision


@dataclass
class TrainConfig:
    steps: int = 10000  # optimiser steps
    batch_size: int = 64  # global batch
    # Memory levers: each optimiser step runs the batch as grad_accum micro-batches (the
    # same gradient, a grad_accum-th of the activations); an SR stage trains on random crop x crop
    # windows of its images and the matching windows of their low-res inputs (0 = whole images).
    grad_accum: int = 1
    crop: int = 0
    lr: float = 2e-4
    warmup_steps: int = 100  # linear learning-rate warm-up
    lr_schedule: str = "constant"  # recipe.LRSchedule after warm-up: constant, cosine or linear (to 0 at `steps`)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    loss_weight: str = "uniform"  # recipe.LossWeight: uniform (the target's MSE) or min-snr
    min_snr_gamma: float = 5.0  # gamma of min-snr: the weight of ||x0 - x0_hat||^2 is min(SNR, gamma)
    ema_decay: float = 0.999  # EMA of the weights; warmed up as min(decay, (1+n)/(10+n))
    # > 0: the checkpoint's EMA is instead EDM2's power-function EMA of this relative length
    # (a fixed fraction of the run, so one value suits any number of steps); ema_decay is unused.
    ema_sigma_rel: float = 0.0
    ema_profiles: list[float] = field(default_factory=list)  # sigma_rel of EMAs kept for post-hoc EMA (cdm ema)
    ema_snapshot_every: int = 0  # steps between post-hoc EMA snapshots (0: at every checkpoint)
    p_uncond: float = 0.0  # label dropout: the share of training labels replaced by the "no class" label
    # (num_classes), which trains the unconditional prediction classifier-free guidance uses (cdm.guidance)
    # "auto": bf16 autocast where the device computes bf16 natively (a recent GPU; a CPU with AVX-512 BF16
    # or AMX), else fp32 (cdm.stage.resolve_precision); "bf16" autocast or "fp32" to force one
    precision: str = "auto"
    channels_last: bool = False  # measured slower on a 2-core CPU; try it on a GPU
    seed: int = 0
    log_every: int = 25  # steps between JSONL log lines
    ckpt_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # older checkpoints are deleted
    sample_every: int = 500  # steps between sample grids, and one at the end (0 = no grids at all)
    sample_steps: int = 50  # sampler steps for the grids
    sample_level: int = 0  # augmentation level s for SR grids (ground-truth low-res inputs)
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    tensorboard: bool = True  # live logs in RUN/tb/ (cdm.livelog), if the tensorboard package is installed

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "keep_checkpoints",
                     "sample_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "sample_every", "ema_snapshot_every", "sample_level",
                     "weight_decay", "grad_clip", "crop"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}"
                                  + (" (0 = off)" if name in ("grad_clip", "sample_every", "crop") else ""))
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be divisible by train.grad_accum "
                              f"({self.grad_accum}), the number of equal micro-batches per step; change either")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr} (e.g. 2e-4)")
        for name in ("ema_decay", "p_uncond"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must lie in [0, 1), got {getattr(self, name)}"
                                  + (" (e.g. 0.999)" if name == "ema_decay" else " (e.g. 0.1)"))
        if not 0 <= self.seed < 2 ** 63:
            raise ConfigError(f"train.seed must be an integer in [0, 2^63), got {self.seed}")
        for name, enum_ in (("lr_schedule", LRSchedule), ("loss_weight", LossWeight)):
            if getattr(self, name) not in {e.value for e in enum_}:
                raise ConfigError(f"train.{name} must be one of {', '.join(e.value for e in enum_)}, "
                                  f"got {getattr(self, name)!r}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.min_snr_gamma <= 0:
            raise ConfigError(f"train.min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        flat = 12 ** -0.5  # sigma_rel of a flat average over the whole run: the longest EMA there is
        for r in [self.ema_sigma_rel, *self.ema_profiles]:
            if not 0 <= r < flat:
                raise ConfigError(f"EMA lengths (train.ema_sigma_rel, train.ema_profiles) must lie in "
                                  f"(0, {flat:.3f}); EDM2 keeps 0.05 and 0.1; got {r}")
        if 0 in self.ema_profiles:
            raise ConfigError("train.ema_profiles must be > 0 (e.g. 0.05,0.1)")
        if not is_device_name(self.device):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N (or mps, xpu), "
                              f"got {self.device!r}")


# Network fields that the stage sets; a config that sets them is refused.
DERIVED_UNET_FIELDS = ("resolution", "in_channels", "num_classes", "lowres_channels",
                       "aug_level_embedding", "learn_sigma")


@dataclass
class StageConfig:
    name: str = "stage"
    resolution: int = 32  # this stage's output resolution
    lowres_resolution: int = 0  # 0: a base stage; else the resolution of the stage below
    class_conditional: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.check()

    @property
    def is_super_resolution(self) -> bool:
        return self.lowres_resolution > 0

    def check(self) -> None:
        """Raise :class:`ConfigError` unless the stage's settings fit together (each section checks
        its own fields when it is made). Runs when the config is made and again in :meth:`resolve`."""
        if self.resolution < 1:
            raise ConfigError(f"resolution must be >= 1, got {self.resolution}")
        if self.lowres_resolution < 0:
            raise ConfigError(f"lowres_resolution must be >= 0 (0: a base stage), got {self.lowres_resolution}")
        if self.resolution > self.data.resolution:
            raise ConfigError(f"stage resolution {self.resolution} exceeds data.resolution "
                              f"{self.data.resolution}; raise data.resolution")
        if self.is_super_resolution and self.lowres_resolution >= self.resolution:
            raise ConfigError(f"lowres_resolution ({self.lowres_resolution}) must be below the "
                              f"stage's resolution ({self.resolution})")
        n_down = len(self.unet.channel_mult) - 1
        if self.resolution % 2 ** n_down:
            raise ConfigError(f"resolution {self.resolution} is not divisible by 2^{n_down} = {2 ** n_down}: "
                              f"the U-Net halves it once per unet.channel_mult level after the first "
                              f"({len(self.unet.channel_mult)} levels); change resolution or shorten "
                              f"unet.channel_mult")
        if not self.is_super_resolution and AugKind(self.augment.kind) is not AugKind.NONE:
            raise ConfigError("conditioning augmentation needs a super-resolution stage: set "
                              "lowres_resolution, or augment.kind = 'none'")
        level, kind = self.train.sample_level, AugKind(self.augment.kind)
        if self.is_super_resolution and kind is AugKind.GAUSSIAN and not 0 <= level <= self.augment.steps:
            raise ConfigError(f"train.sample_level: augmentation level s must be an integer in "
                              f"[0, {self.augment.steps}], got {level}")
        if self.is_super_resolution and kind is not AugKind.GAUSSIAN and level:
            raise ConfigError(f"train.sample_level: augmentation level {level} given, but this stage's "
                              f"augmentation is {kind.value!r}, which applies none at sampling time; pass 0")
        if self.train.crop:
            self._check_crop()

    def _check_crop(self) -> None:
        """``train.crop``: an SR stage's training crop must have an exact low-resolution counterpart and
        a network that computes on it what it computes on the whole image (no attention)."""
        c, res, lo, u = self.train.crop, self.resolution, self.lowres_resolution, self.unet
        if not self.is_super_resolution:
            raise ConfigError(f"train.crop ({c}) applies to super-resolution stages only; set it to 0")
        if c >= res:
            raise ConfigError(f"train.crop ({c}) must be below the stage's resolution ({res}); 0 trains on "
                              f"whole images")
        if res % lo:
            raise ConfigError(f"train.crop needs resolution ({res}) to be a multiple of lowres_resolution ({lo}), "
                              f"so that a crop has an exact low-resolution counterpart; set train.crop = 0")
        f, n_down = res // lo, len(u.channel_mult) - 1
        if c % f:
            raise ConfigError(f"train.crop ({c}) must be a multiple of resolution / lowres_resolution = {f}, "
                              f"so that its low-resolution input is whole pixels")
        if AugKind(self.augment.kind) is AugKind.BLUR and c < 2 * f:
            raise ConfigError(f"train.crop ({c}) must be at least {2 * f} with augment.kind = 'blur', whose 3x3 blur "
                              f"needs a low-resolution crop of 2 pixels or more")
        if c % 2 ** n_down:
            raise ConfigError(f"train.crop ({c}) is not divisible by 2^{n_down} = {2 ** n_down}: the U-Net halves "
                              f"it once per unet.channel_mult level after the first; choose a multiple of "
                              f"{2 ** n_down}")
        if u.attention_resolutions:
            a = max(u.attention_resolutions)
            raise ConfigError(f"unet.attention_resolutions includes {a}, which train.crop = {c} changes (to "
                              f"{a * c // res}px); attention-free levels are needed for crop training: set "
                              f"unet.attention_resolutions = []")
        if u.mid_attention:
            raise ConfigError(f"the U-Net's middle block attends over its whole {res >> n_down}px feature map, "
                              f"which train.crop = {c} changes (to {c >> n_down}px); set unet.mid_attention = false "
                              f"for crop training")

    def lint(self) -> None:
        """Refuse settings that would be silently ignored: checked for configs a user writes
        (:func:`load_stage_config`), not for those read back from checkpoints."""
        levels = [self.resolution // 2 ** i for i in range(len(self.unet.channel_mult))]
        unused = [r for r in self.unet.attention_resolutions if r not in levels]
        if unused:
            raise ConfigError(f"unet.attention_resolutions {unused} match no level of the U-Net, whose feature maps "
                              f"are {', '.join(map(str, levels))}px; list only those (or [] for no attention)")
        if not self.is_super_resolution and self.train.sample_level:
            raise ConfigError(f"train.sample_level ({self.train.sample_level}) applies to super-resolution stages "
                              f"only; remove it or set it to 0")

    def resolve(self, channels: int, num_classes: int) -> "StageConfig":
        """Fill in the network's interface from the stage and its data (``channels``,
        ``num_classes``) and check that the stage is coherent."""
        self.check()
        if self.is_super_resolution:
            try:
                ConditioningAugmentation(self.augment).check_sampling_level(self.train.sample_level)
            except ValueError as e:
                raise ConfigError(f"train.sample_level: {e}") from None
        u = self.unet
        u.resolution = self.resolution
        u.in_channels = channels
        u.num_classes = num_classes if self.class_conditional else 0
        u.lowres_channels = channels if self.is_super_resolution else 0
        u.aug_level_embedding = AugKind(self.augment.kind) is AugKind.GAUSSIAN
        u.learn_sigma = self.diffusion.learn_sigma
        try:
            u.__post_init__()
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return self


def read_config_file(path: str | Path) -> dict:
    """The settings of a ``.toml`` or ``.json`` file as a nested dict; every way the file can be
    unusable (missing, a directory, unreadable, not UTF-8, not parsable, not a table) is a
    :class:`ConfigError`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; pass a .toml or .json file, or a preset "
                          f"({', '.join(list_presets())})")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass a .toml or .json file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot parse {path}: it is not UTF-8 text (byte {raw[e.start]:#04x} at "
                          f"offset {e.start}); is it a config file?") from None
    try:
        d = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot parse {path}: {e}") from e
    except RecursionError:
        raise ConfigError(f"cannot parse {path}: it is nested too deeply") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object of settings ({{\"train\": {{...}}, ...}}), "
                          f"got {type(d).__name__ if d is not None else 'null'}")
    return d


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("cdm.presets").iterdir() if p.name.endswith(".toml"))


def preset_description(name: str) -> str:
    """A preset's one-line description: its first line that starts with ``#:``."""
    text = (resources.files("cdm.presets") / f"{name}.toml").read_text()
    return next((line[2:].strip() for line in text.splitlines() if line.startswith("#:")), "")


def read_preset(name: str) -> dict:
    f = resources.files("cdm.presets") / f"{name}.toml"
    if not f.is_file():
        near = difflib.get_close_matches(name, list_presets(), n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        raise ConfigError(f"unknown preset {name!r}{hint} (presets: {', '.join(list_presets())})")
    return tomllib.loads(f.read_text())


RUN_CONFIG = "config.json"  # the resolved config a run directory holds (cdm.train writes it)
# Keys a run's config.json holds that cdm derives from the stage and its data set: ignored when a run's
# config is read as the start of another stage's (they are filled in again from that stage's data).
DERIVED_DATA_FIELDS = ("class_names", "fingerprint")


def written_by_cdm(d: dict) -> bool:
    """Whether settings ``d`` are a config cdm wrote (a run's config.json, ``cdm train --dry-run``'s
    output): its ``unet`` table holds every derived field, which no hand-written config sets."""
    unet = d.get("unet")
    return isinstance(unet, dict) and all(k in unet for k in DERIVED_UNET_FIELDS)


def without_derived(d: dict) -> dict:
    """``d`` (a config cdm wrote) without what cdm derives (:data:`DERIVED_UNET_FIELDS`,
    :data:`DERIVED_DATA_FIELDS`), so that it reads as the config a user would have written."""
    out = dict(d)
    out["unet"] = {k: v for k, v in d["unet"].items() if k not in DERIVED_UNET_FIELDS}
    if isinstance(d.get("data"), dict):
        out["data"] = {k: v for k, v in d["data"].items() if k not in DERIVED_DATA_FIELDS}
    return out


def read_stage_source(source: str | Path) -> dict:
    """The settings a stage config starts from, named one way everywhere (``cdm train CONFIG``,
    ``--data-from``, ...): a preset name, a ``.toml``/``.json`` file, or a run directory (its
    ``config.json``). A config cdm wrote (a run's, or ``--dry-run``'s output) loses its derived keys;
    a hand-written one that sets them is refused later, by :func:`load_stage_config`."""
    p = Path(source)
    if p.is_dir():
        if not (p / RUN_CONFIG).is_file():
            raise ConfigError(f"{p} is a directory without {RUN_CONFIG}: name a run directory (cdm train --out), "
                              f"a .toml or .json config file, or a preset ({', '.join(list_presets())})")
        p = p / RUN_CONFIG
    elif p.suffix not in (".toml", ".json"):
        if str(source) in list_presets() or not (p.exists() or p.suffix or "/" in str(source)):
            return read_preset(str(source))
        raise ConfigError(f"config file {p} must end in .toml or .json (or name a run directory or a preset: "
                          f"{', '.join(list_presets())})")
    d = read_config_file(p)
    return without_derived(d) if written_by_cdm(d) else d


def load_stage_config(path_or_preset: str | None = None, overrides: list[str] | None = None,
                      extra: dict | None = None) -> StageConfig:
    """A stage config from a preset, a config file or a run directory (:func:`read_stage_source`),
    then ``extra`` (a nested dict), then ``overrides`` (``key=value`` strings) on top. Every key's type and range and the stage's
    coherence are checked here, so that a config this returns can be trained (given its data)."""
    d = read_stage_source(path_or_preset) if path_or_preset else {}
    d = deep_merge(d, extra or {})
    d = deep_merge(d, parse_overrides(overrides or []))
    unet = d.get("unet", {})
    if isinstance(unet, dict):  # else from_dict says that unet must be a table
        for k in DERIVED_UNET_FIELDS:
            if k in unet:
                raise ConfigError(f"unet.{k} is derived from the stage and its data; remove it "
                                  f"(set resolution, lowres_resolution, class_conditional, "
                                  f"augment.kind or diffusion.learn_sigma instead)")
        # The network's own checks need the stage's resolution (resolve() sets it again), not the default.
        res = coerce(d.get("resolution", StageConfig.resolution), int, "resolution")
        if res < 1:
            raise ConfigError(f"resolution must be >= 1, got {res}")
        d["unet"] = {**unet, "resolution": res}
    cfg = from_dict(StageConfig, d)
    cfg.lint()
    return cfg


def stage_config_from_json(text: str) -> StageConfig:
    """Inverse of ``json.dumps(to_dict(cfg))``: derived fields included, no checks skipped."""
    return from_dict(StageConfig, json.loads(text))


def resolve_config(cfg: StageConfig, data: ImageSet | None = None) -> StageConfig:
    """Fill in what ``cfg`` derives from its data set (class names, channels, classes): the config a
    run trains with (``cdm train --dry-run`` prints it). Returns ``cfg``, resolved in place."""
    data = data if data is not None else load_dataset(cfg.data)
    cfg.data.class_names = data.class_names
    if data.prepared is not None:  # the set's identity (a resume checks it) and how it reached R
        cfg.data.fingerprint, cfg.data.fit = data.prepared.fingerprint, data.prepared.manifest["fit"]
    cfg.resolve(channels=data.channels, num_classes=data.num_classes)
    return cfg
