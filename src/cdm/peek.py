"""What a data set holds — its channels, class names and number of images — without reading its
images, so that a plan (:mod:`cdm.plan`) answers in seconds for a data set of any size."""

from __future__ import annotations

from pathlib import Path

from .data import FASHION_MNIST_CLASSES, DataConfig, load_dataset
from .folder import folder_mode, list_folder
from .readers import channels_last, npz_header


PEEK_IMAGES = 64  # a plan reads the headers of at most this many of a folder's images for its channels


def peek_data(d: DataConfig) -> tuple[int, list[str], int, str]:
    """``(channels, class names, images, note)`` of the data set ``d`` names, without reading its images (a
    plan answers in seconds for any size; ``images``: all of the source's, before the held-out split):
    Fashion-MNIST's are known; a folder's classes are its listing's
    and, unless ``data.channels`` states them, its channels are read from the headers of up to
    :data:`PEEK_IMAGES` images spread over its classes (the note says so); an ``.npz``'s from the
    ``images`` array's header and its ``labels``."""
    if d.source == "fashion-mnist":
        return d.channels or 1, list(FASHION_MNIST_CLASSES), {"train": 60000, "test": 10000}.get(d.split, 70000), ""
    if not d.path:
        load_dataset(d)  # raises the loader's own message: the source needs data.path
    path = Path(d.path).expanduser()
    if d.source == "folder":
        names, files = list_folder(path)
        total = sum(map(len, files))
        if d.channels:
            return d.channels, names, total, ""
        picked = [f for group in files for f in group[:max(1, PEEK_IMAGES // len(files))]][:PEEK_IMAGES]
        from PIL import Image

        modes = set()
        for f in picked:
            try:
                with Image.open(f) as im:
                    modes.add(folder_mode(0, im.mode))
            except (OSError, ValueError):
                continue
        note = (f"channels: {3 if 'RGB' in modes else 1}, from {len(picked)} of {total:,} images' headers "
                f"(state data.channels to be sure)") if len(picked) < total else ""
        return 3 if "RGB" in modes else 1, names, total, note
    shape, labels = npz_header(path)
    channels = (shape[-1] if channels_last(shape) else shape[1]) if len(shape) == 4 else 1
    classes = int(labels.max()) + 1 if labels is not None and labels.size else 1
    return d.channels or channels, d.class_names or [str(i) for i in range(classes)], shape[0], ""
