"""Pixels: the one anti-aliased resize every stage's input is made with (:func:`downsample`,
:func:`stage_input`), 8-bit <-> [-1, 1] conversions, how an image of any size reaches the data
resolution (:func:`fit_to`, refused before decoding by :func:`check_fit`), channel conversion, and
the random crops and flips of training. Tensors in, tensors out; :mod:`cdm.data` and
:mod:`cdm.folder` build data sets with them."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DataError

FITS = ("pad", "resize", "resize-up")  # how images reach the data resolution: fit_to
# how the refusal of check_fit names the two settings: the data set's, and cdm prepare's flags
DATA_SETTINGS = ("data.resolution", 'data.fit = "{}"')


def to_float(x: Tensor) -> Tensor:
    """uint8 ``[0, 255]`` -> float ``[-1, 1]``."""
    return x.float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """float ``[-1, 1]`` -> uint8 ``[0, 255]`` (clamped, rounded)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def downsample(x: Tensor, size: int) -> Tensor:
    """Anti-aliased resize ``[N, C, H, W] -> [N, C, size, size]`` (bicubic with antialias; a
    no-op when the size already matches). The one function that makes low-resolution images."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return y.to(x.dtype) if x.dtype.is_floating_point else y.round().clamp(0, 255).to(x.dtype)


def stage_input(images: Tensor, resolution: int) -> Tensor:
    """uint8 ``[N, C, R, R]`` at the data resolution -> float ``[N, C, r, r]`` in ``[-1, 1]``, not
    re-quantised: a stage's target ``x0`` at its resolution, or an SR stage's clean low-resolution
    input ``z0``. Training and every ground-truth conditioning make them here, so they agree."""
    return downsample(to_float(images), resolution)


def check_fit(hw, size: int, fit: str, what, settings: tuple[str, str] = DATA_SETTINGS) -> bool:
    """Whether :func:`fit_to` enlarges images of height and width ``hw`` to ``size`` (``fit =
    "resize-up"`` of a square crop smaller than ``size``). Under ``fit = "resize"`` such images are
    refused (:class:`DataError` naming ``what``, and ``settings``: the resolution's and fit's names)."""
    h, w = int(hw[0]), int(hw[1])
    if min(h, w) >= size or fit == "pad":
        return False
    if fit == "resize":
        res, fit_is = settings
        raise DataError(f"{what} is {w}x{h} px, smaller than {res} = {size} px, and {fit_is.format('resize')} "
                        f"never enlarges: use a {res} at or below the images' size (a preset for {min(h, w)} px "
                        f"sources: see `cdm presets`), or {fit_is.format('resize-up')} to enlarge them on purpose")
    return True


def warn_upsampled(count: int, total: int, where, size: int) -> None:
    """Say that ``count`` of ``total`` images were smaller than the data resolution and enlarged."""
    if count:
        warnings.warn(f"{count:,} of {total:,} images in {where} are smaller than data.resolution = {size}px and "
                      f"were enlarged (bicubic, data.fit = resize-up): a stage learns interpolated pixels from "
                      f"them; use a data.resolution (and stage resolutions) at or below their size to avoid it")


def fit_to(x: Tensor, size: int, fit: str, what="the images", settings: tuple[str, str] = DATA_SETTINGS) -> Tensor:
    """uint8 ``[N, C, H, W]`` -> ``[N, C, size, size]``: centre-crop to square, then

    - ``fit = "pad"``: a smaller crop is centred on black; a larger one is downscaled (anti-aliased);
    - ``fit = "resize"``: anti-aliased downscale; a smaller crop is refused (:func:`check_fit`);
    - ``fit = "resize-up"``: anti-aliased downscale, or a bicubic enlargement of a smaller crop.

    So only ``"resize-up"`` ever makes pixels an image does not have."""
    up = check_fit(x.shape[-2:], size, fit, what, settings)
    h, w = x.shape[-2:]
    m = min(h, w)
    x = x[..., (h - m) // 2:(h - m) // 2 + m, (w - m) // 2:(w - m) // 2 + m]
    if m == size:
        return x
    if fit == "pad" and m < size:
        p = size - m
        return F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2))
    return F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False).round().clamp(
        0, 255).to(torch.uint8) if up else downsample(x, size)


def convert_channels(x: Tensor, channels: int) -> Tensor:
    """uint8 ``[N, C, H, W]`` to 1 (luma) or 3 (replicated) channels; 0 keeps C."""
    c = x.shape[1]
    if channels in (0, c):
        return x
    if channels == 1 and c == 3:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    if channels == 3 and c == 1:
        return x.repeat(1, 3, 1, 1)
    raise DataError(f"cannot convert {c}-channel images to {channels} channels (use 1 or 3)")


def crop(x: Tensor, corners: Tensor, size: int) -> Tensor:
    """``[N, C, H, W] -> [N, C, size, size]``: image ``i``'s window whose top-left pixel is
    ``corners[i]`` = (row, column), ``corners`` ``[N, 2]``."""
    return torch.stack([im[:, r:r + size, c:c + size] for im, (r, c) in zip(x, corners.tolist())])


def random_flip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image ``[N, C, H, W]`` left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
