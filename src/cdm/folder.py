"""A folder of images: which files are its images and classes, and how each file becomes pixels.

Layout (:func:`list_folder`, torchvision ``ImageFolder``'s rule): one sub-folder per class, its
name the class's name; images in folders nested inside a class folder belong to that class (one
warning names the nested folders). A folder with no sub-folders is one class. Nothing is ignored
silently except hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``, ``._a.png``) and
files without an image suffix (:data:`IMAGE_SUFFIXES`): a class folder without images is refused
by name, image files directly in the root beside class folders are ignored with a warning that
names them, and a symbolic link that loops back is not followed (a warning names it).

Pixels (:func:`pixels`): every PIL mode is converted explicitly, after the EXIF orientation is
applied (:func:`decode_image`):

- ``1`` (1-bit): 0 or 255. ``L``: as stored.
- ``I;16``, ``I;16B``, ``I`` (16-bit greyscale): scaled to 8 bits (``round(x / 257)``: 65535 -> 255,
  32768 -> 128), never clipped; ``I`` values outside ``[0, 65535]`` make the file unreadable.
- ``F`` (32-bit float): values in ``[0, 1]`` are scaled to ``[0, 255]``; any other range makes the
  file unreadable (its scale is unknown: save it with 8 or 16 bits).
- Transparency (``RGBA``, ``LA``, ``PA``, a palette or greyscale image with a transparent colour)
  is composited onto **black** (:data:`BACKGROUND`), the colour of ``data.fit = "pad"``'s border.
- ``P`` (palette) becomes RGB through RGBA; ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` become RGB.
- A colour image (``RGB``, ``RGBA``, ``CMYK``) with an embedded ICC profile other than sRGB (a
  phone's Display P3, Adobe RGB) is converted to sRGB first; a profile that cannot be read makes the
  file unreadable. Other modes' profiles are not applied.
- An animated GIF or WebP gives its first frame.

The greyscale modes (:data:`GREY_MODES`) stay greyscale with ``channels = 0``; ``channels = 1``
turns colour into PIL's standard luma (ITU-R 601-2: ``L = 0.299 R + 0.587 G + 0.114 B``) and
``channels = 3`` replicates grey.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError
from .pixels import DATA_SETTINGS, check_fit, convert_channels, fit_to, warn_upsampled

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
BACKGROUND = 0  # what transparent pixels become (black), in every mode
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}


def _hidden(p: Path) -> bool:
    return p.name.startswith(".")


def is_image_file(p: Path) -> bool:
    """A file cdm reads as an image: an image suffix (any case), not hidden."""
    return p.suffix.lower() in IMAGE_SUFFIXES and not _hidden(p)


def _named(paths: list, n: int = 3) -> str:
    """The first ``n`` of ``paths`` and how many more."""
    more = f" and {len(paths) - n} more" if len(paths) > n else ""
    return ", ".join(str(p) for p in paths[:n]) + more


def _images_under(top: Path, nested: list[str], loops: list[str]) -> tuple[list[Path], list[str]]:
    """``(the image files in top and the folders below it, sorted; other visible files' names)``.
    Adds the nested folders holding images to ``nested``, and links that loop back to ``loops``."""
    found, others, seen = [], [], {os.path.realpath(top)}
    for d, dirs, names in os.walk(top, followlinks=True):
        keep = []
        for name in sorted(dirs):
            real = os.path.realpath(os.path.join(d, name))
            if name.startswith("."):
                continue
            if real in seen:
                loops.append(os.path.join(d, name))
                continue
            seen.add(real)
            keep.append(name)
        dirs[:] = keep
        files = [Path(d) / n for n in names]
        images = [f for f in files if is_image_file(f)]
        others += [f.name for f in files if not _hidden(f) and f not in images]
        if images and Path(d) != top:
            nested.append(Path(d).relative_to(top.parent).as_posix())
        found += images
    return sorted(found), others


def list_folder(root: str | os.PathLike) -> tuple[list[str], list[list[Path]]]:
    """A folder with one sub-folder per class (or images directly in it: one class) -> ``(class
    names, each class's image files in sorted order)``: the order every reader of the folder keeps.
    The layout's rules are the module's; a class folder without images raises :class:`DataError`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} " + ("is a file, not a folder" if root.exists() else "does not exist")
                        + "; set data.path to a folder of images with one sub-folder per class")
    entries = sorted(p for p in root.iterdir() if not _hidden(p))
    subdirs = [d for d in entries if d.is_dir()]
    groups = [(d.name, d) for d in subdirs] if subdirs else [(root.name, root)]
    loose = [p.name for p in entries if subdirs and p.is_file() and is_image_file(p)]
    if loose:
        warnings.warn(f"{len(loose)} image file(s) directly in {root} are in no class sub-folder and are ignored: "
                      f"{_named(loose)}; move them into a class folder")
    nested, loops, files = [], [], []
    for name, d in groups:
        found, others = _images_under(d, nested, loops)
        if not found and subdirs:
            other = f" ({len(others)} other file(s), e.g. {others[0]}, are not {'/'.join(sorted(IMAGE_SUFFIXES))})" \
                if others else ""
            raise DataError(f"class folder {name!r} in {root} has no images{other}: add images or remove it")
        files.append(found)
    if nested:
        warnings.warn(f"images in {len(nested)} nested folder(s) are read as their top-level folder's class: "
                      f"{_named(nested)}")
    if loops:
        warnings.warn(f"not following {len(loops)} symbolic link(s) to a folder already read: {_named(loops)}")
    return [g[0] for g in groups], files


def folder_mode(channels: int, stored_mode: str) -> str:
    """Whether a folder image is decoded as ``L`` (one channel) or ``RGB``: as ``channels`` asks,
    else (0) the greyscale modes (:data:`GREY_MODES`) stay greyscale and every other mode is RGB."""
    return {1: "L", 3: "RGB"}.get(channels) or ("L" if stored_mode in GREY_MODES else "RGB")


def to_srgb(im):
    """A colour image with an embedded ICC profile other than sRGB, converted to sRGB (the module's
    rule); any other image as it is. A profile that cannot be read raises ``ValueError``."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA", "CMYK"):
        return im
    import io

    from PIL import ImageCms

    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "sRGB" in ImageCms.getProfileDescription(profile):
            return im
        return ImageCms.profileToProfile(im, profile, ImageCms.createProfile("sRGB"),
                                         outputMode="RGBA" if im.mode == "RGBA" else "RGB")
    except (ImageCms.PyCMSError, OSError) as e:
        raise ValueError(f"its ICC colour profile cannot be applied ({e}); save it without one, or in sRGB") from e


def pixels(im) -> np.ndarray:
    """A PIL image of any mode -> uint8 ``[H, W]`` (a greyscale mode) or ``[H, W, 3]`` (the module's
    rules). Raises ``ValueError`` for pixel values whose scale is unknown (an unreadable file)."""
    mode = im.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        top = 1 if mode == "F" else 65535
        if not (np.isfinite(a).all() and 0 <= lo and hi <= top):
            raise ValueError(f"{'32-bit float' if mode == 'F' else '32-bit integer'} pixels in [{lo:g}, {hi:g}], "
                             f"outside [0, {top}]: save it with 8 or 16 bits")
        return np.round(a * 255 if mode == "F" else a / 257).astype(np.uint8)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        a = np.asarray(im.convert("RGBA"), dtype=np.float64)
        alpha = a[..., 3:] / 255
        out = np.round(a[..., :3] * alpha + BACKGROUND * (1 - alpha)).astype(np.uint8)
        return out[..., 0] if mode in GREY_MODES else out
    return np.asarray(im.convert("L" if mode in GREY_MODES else "RGB"))


def decode_image(path: Path, size: int, fit: str, channels: int,
                 settings: tuple[str, str] = DATA_SETTINGS) -> tuple[Tensor, bool]:
    """One image file -> ``(uint8 [C, size, size], enlarged)``: its size checked against ``fit`` from
    its header (:func:`~cdm.data.check_fit`: before its pixels are read), its EXIF orientation applied,
    its pixels converted (:func:`pixels`, ``channels``), then :func:`~cdm.data.fit_to`. An unreadable
    file raises one of :func:`decode_errors`; a size ``fit`` refuses, :class:`DataError`."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        up = check_fit((im.height, im.width), size, fit, f"image {path}", settings)
        a = pixels(to_srgb(ImageOps.exif_transpose(im)))
    if channels == 1 and a.ndim == 3:
        a = np.asarray(Image.fromarray(a).convert("L"))  # PIL's standard luma
    t = torch.from_numpy(a.copy())
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    if channels == 3 and t.shape[0] == 1:
        t = t.repeat(3, 1, 1)
    return fit_to(t[None], size, fit, f"image {path}", settings)[0], up


def decode_errors() -> tuple[type[BaseException], ...]:
    """What decoding an unreadable image file raises (not :class:`DataError`: a setting refused)."""
    from PIL import Image, UnidentifiedImageError

    return OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError


def load_folder(root: str | os.PathLike, size: int, fit: str, channels: int,
                on_bad: str = "skip") -> tuple[Tensor, Tensor, list[str], list[str]]:
    """A folder (:func:`list_folder`) -> ``(images uint8 [N, C, size, size], labels [N], class names,
    file paths relative to the folder)``. Files with an image suffix that cannot be decoded (not an
    image, truncated) are skipped with a warning and a count (``on_bad='skip'``) or raise
    :class:`DataError` (``on_bad='fail'``); an image ``fit`` refuses raises at once, whatever ``on_bad``."""
    root = Path(root)
    names, files = list_folder(root)
    images, labels, keys, bad = [], [], [], []
    errors, small = decode_errors(), 0
    for label, group in enumerate(files):
        for f in group:
            try:
                im, up = decode_image(f, size, fit, channels)
            except DataError:
                raise
            except errors as e:
                if on_bad != "skip":
                    raise DataError(f"cannot read image {f} ({e}); remove it, or set data.on_bad=skip") from e
                bad.append(f)
                continue
            images.append(im)
            small += up
            labels.append(label)
            keys.append(f.relative_to(root).as_posix())
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s) in {root}, e.g. {bad[0]} "
                      f"(set data.on_bad=fail to stop instead)")
    if not images:
        raise DataError(f"no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}")
    check_classes(names, np.bincount(labels, minlength=len(names)), root)
    warn_upsampled(small, len(images), root, size)
    if len({im.shape[0] for im in images}) > 1:  # mixed grayscale and colour: make them all RGB
        images = [convert_channels(im[None], 3)[0] for im in images]
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), names, keys


def check_classes(names: list[str], counts, root) -> None:
    """Refuse a class left without images (all its files unreadable): training would never see it."""
    empty = [n for n, c in zip(names, counts) if not c]
    if empty:
        raise DataError(f"class folder(s) {_named([repr(n) for n in empty])} in {root} have no readable images "
                        f"(all unreadable): replace the files or remove the folder(s)")
