"""A stage of the cascade: a network, its diffusion process and its conditioning augmentation.

:meth:`Stage.conditioning` is the single code path that turns a low-resolution image into the
network's conditioning inputs; training and sampling both call it (a test checks that they give
the same inputs), so what a stage sees at sampling time is what it was trained on.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .augment import ConditioningAugmentation
from .config import StageConfig
from .diffusion import GaussianDiffusion
from .unet import UNet


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str) -> bool:
    """Whether this machine's ``device_type`` ("cpu", "cuda") computes bf16 natively: a CUDA GPU that
    supports it, or a CPU with AVX-512 BF16 or AMX. Elsewhere bf16 autocast is emulated and slow
    (an AVX2-only EPYC: 13x slower than fp32 for the SR preset's training step, docs/BENCHMARKS.md)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported",
                                                                   "_is_amx_tile_supported"))
    return False


def resolve_precision(precision: str, device_type: str) -> str:
    """``"auto"``: ``"bf16"`` where :func:`native_bf16`, else ``"fp32"``; ``"bf16"`` and ``"fp32"`` as given."""
    if precision == "auto":
        return "bf16" if native_bf16(device_type) else "fp32"
    return precision


_warned: set[str] = set()


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU or GPU when ``precision`` resolves to ``'bf16'`` (:func:`resolve_precision`),
    else nothing. An explicit ``'bf16'`` on a device without native bf16 warns once: it is emulated."""
    if resolve_precision(precision, device.type) != "bf16":
        return contextlib.nullcontext()
    if not native_bf16(device.type) and device.type not in _warned:
        _warned.add(device.type)
        warnings.warn(f"bf16 autocast on a {device.type} without native bf16 is emulated and can be 10x slower "
                      f"than fp32: set train.precision = 'auto' (or pass --precision auto)")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class Stage:
    """``config`` must be resolved (:meth:`StageConfig.resolve`)."""

    distill: dict | None = None  # set by load_stage for a distilled stage: the grid it must be sampled on

    def __init__(self, config: StageConfig, net: nn.Module | None = None):
        self.config = config
        self.net = net if net is not None else UNet(config.unet)
        self.diffusion = GaussianDiffusion(config.diffusion)
        self.augmentation = ConditioningAugmentation(config.augment)
        self.precision = config.train.precision

    # ----------------------------------------------------------------- facts
    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def lowres_resolution(self) -> int:
        return self.config.lowres_resolution

    @property
    def channels(self) -> int:
        return self.config.unet.in_channels

    @property
    def num_classes(self) -> int:
        return self.config.unet.num_classes

    @property
    def is_super_resolution(self) -> bool:
        return self.config.is_super_resolution

    @property
    def module(self) -> nn.Module:
        """The bare network (``net`` unwrapped when training wraps it in DistributedDataParallel)."""
        return self.net.module if isinstance(self.net, DistributedDataParallel) else self.net

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str) -> "Stage":
        self.net.to(device)
        return self

    # ----------------------------------------------------------------- the conditioning path
    def conditioning(self, label: Tensor | None, lowres: Tensor | None = None, level: Tensor | None = None,
                     noise: Tensor | None = None, corrupt: bool = True) -> dict[str, Tensor | None]:
        """The network's conditioning inputs.

        ``label`` ``[N]`` (ignored by an unconditional stage). For an SR stage, ``lowres``
        ``[N, C, h, w]`` is the low-resolution image and ``level`` ``[N]`` its augmentation level.
        With ``corrupt=True`` (training; non-truncated sampling) ``lowres`` is a clean ``z0`` that
        the stage's augmentation corrupts at ``level`` with ``noise``; with ``corrupt=False``
        (truncated sampling) it already is ``z_s``. The upsampled low-res image and the class and
        level embedding (``cond_emb``) are computed here once, not at every sampling step. A stage
        trained on crops (``train.crop``) also takes a crop's low-res input, ``[N, C, c, c]`` with
        ``c = train.crop * lowres_resolution / resolution``, upsampled to the crop's size.
        """
        label = label if self.num_classes > 0 else None
        if not self.is_super_resolution:
            return {"cond_emb": self.module.embed_condition(label, None)}
        if lowres is None or level is None:
            raise ValueError("a super-resolution stage needs lowres and level")
        want = (self.channels, self.lowres_resolution, self.lowres_resolution)
        crop = self.config.train.crop
        small = crop * self.lowres_resolution // self.resolution  # a training crop's low-res side
        if tuple(lowres.shape[1:]) != want and not (crop and tuple(lowres.shape[1:]) == (want[0], small, small)):
            raise ValueError(f"stage {self.config.name!r} expects low-resolution inputs [N, {want[0]}, "
                             f"{want[1]}, {want[2]}]" + (f" (or [N, {want[0]}, {small}, {small}], a training crop's)"
                                                         if crop else "") + f", got {list(lowres.shape)}")
        z = self.augmentation.apply(lowres, level, noise) if corrupt else lowres
        size = self.resolution if lowres.shape[-1] == self.lowres_resolution else crop
        return {"cond_emb": self.module.embed_condition(label, self.augmentation.network_level(level)),
                "lowres_up": self.module.upsample_lowres(z, size)}

    def __call__(self, x: Tensor, t: Tensor, cond: dict[str, Tensor | None]) -> Tensor:
        """The network's raw output at integer times ``t`` ``[N]`` (passed as ``t / T``)."""
        with autocast(x.device, self.precision):
            out = self.net(x, t.float() / self.diffusion.T, **cond)
        return out.float()
