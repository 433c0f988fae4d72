"""``cdm prepare``: write a data set once, at its data resolution, as a prepared set (:mod:`cdm.prepared`).

One pass over the source -- a folder of images (one sub-folder per class), an ``.npz``, or
Fashion-MNIST's IDX files -- makes every image exactly as :func:`cdm.data.load_dataset` makes it in
memory (the same decoding, :func:`~cdm.data.fit_to` and channel rule, the same order, the same
held-out rule), so a run on the prepared set trains on the same images as one on the source.

- Folders are decoded by ``workers`` processes (default: every core), :data:`~cdm.prepared.CHUNK`
  images per task, written in order; a progress bar shows images/s.
- It resumes: each written chunk is made durable (fsync) before ``.progress.json`` records it, so a
  killed preparation, run again, cuts its files back to the last recorded chunk and goes on from
  there; the result, fingerprint included, is the one an uninterrupted run writes.
- Unreadable images are skipped and counted (``--on-bad fail`` stops instead), as folders are
  when loaded in memory. An image ``--fit`` refuses (``resize`` of an image smaller than
  ``--resolution``) stops the preparation whatever ``--on-bad`` says: it is a setting to change,
  not a damaged file; a folder's sizes are checked from the files' headers before anything is written.
- An ``--out`` that holds another data set (or anything else) is refused, never overwritten; one
  that holds this same preparation, finished, is left as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write
from .runlock import LOCK_FILE as LOCK, run_lock
from .data import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FITS, DataError, check_fit, convert_channels,
                   fashion_mnist_arrays, fit_to, held_out_key, load_npz, npz_keys, warn_upsampled)
from .folder import IMAGE_SUFFIXES, check_classes, decode_errors, decode_image, folder_mode, list_folder
from .prepared import (CHUNK, FORMAT, IMAGES, LABELS, MANIFEST, SPLIT, SPLIT_DTYPES, VERSION, PreparedError,
                       PreparedSet, is_prepared, open_prepared, read_manifest)

PROGRESS = ".progress.json"
SETTINGS = ("--resolution", "--fit {}")  # how a refusal of check_fit names the flags


@dataclass
class PrepareConfig:
    source: str  # a folder of images (class sub-folders), an .npz, a folder of IDX files, "fashion-mnist" or synthetic:N
    out: str  # the prepared set's folder
    resolution: int  # R: every image becomes [C, R, R]
    fit: str = "pad"  # how to reach R: "pad", "resize" (never enlarges) or "resize-up" (cdm.data.fit_to)
    channels: int = 0  # 0 = as stored (a folder with any colour image: all RGB); 1 or 3 converts
    on_bad: str = "skip"  # an unreadable image is "skip"ped (counted) or "fail"s
    workers: int = 0  # decoding processes for folders (0 = one per core; 1 = in this process)
    chunk: int = CHUNK  # source items per written chunk (the unit of resuming and of the fingerprint)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise PreparedError(f"--resolution must be >= 1, got {self.resolution}")
        if self.fit not in FITS:
            raise PreparedError(f"--fit must be one of {', '.join(FITS)}, got {self.fit!r}")
        if self.channels not in (0, 1, 3):
            raise PreparedError(f"--channels must be 0 (as stored), 1 or 3, got {self.channels}")
        if self.on_bad not in ("skip", "fail"):
            raise PreparedError(f"--on-bad must be skip or fail, got {self.on_bad!r}")
        if self.workers < 0 or self.chunk < 1:
            raise PreparedError(f"--workers must be >= 0 and the chunk >= 1, got {self.workers} and {self.chunk}")


# ----------------------------------------------------------------------------- the source
@dataclass
class _Source:
    kind: str  # "folder", "npz" or "idx"
    path: Path
    class_names: list[str]
    items: list  # folder: (label, file); arrays: indices
    listing: str  # a hash of what the items are (names and sizes), so a changed source is not resumed
    split_rule: str  # "hash" or "source"
    arrays: tuple | None = None  # npz / idx: (images [N, C, H, W] uint8 Tensor, labels, keys or test flags)


SYNTHETIC = "synthetic:"  # "synthetic:N[:K]": N made-up images of K classes (default 10), to try a machine's disk


def _open_source(text: str) -> _Source:
    """What ``cdm prepare SOURCE`` names, listed (images of array sources are read here)."""
    if text.startswith(SYNTHETIC):
        try:
            n, k = (int(v) for v in (text[len(SYNTHETIC):] + ":10").split(":")[:2])
        except ValueError:
            n = k = 0
        if n < 1 or k < 1:
            raise PreparedError(f"source {text!r}: write synthetic:N or synthetic:N:K (N images, K classes, both >= 1)")
        return _Source("synthetic", Path(text), [str(i) for i in range(k)], list(range(n)),
                       hashlib.sha256(text.encode()).hexdigest(), "hash")
    p = Path(FASHION_MNIST_DIR if text == "fashion-mnist" else text).expanduser()
    if not p.exists():
        raise PreparedError(f"source {p} does not exist: give a folder of images (one sub-folder per class), "
                            f"an .npz with an 'images' array, or a folder of Fashion-MNIST IDX files")
    if p.is_dir() and is_prepared(p):
        raise PreparedError(f"{p} is already a prepared set: train on it directly (data.source = prepared, "
                            f"data.path = {p})")
    h = hashlib.sha256()
    if p.is_file():
        if p.suffix != ".npz":
            raise PreparedError(f"source {p} is a file but not an .npz: give a folder of images, or an .npz")
        try:
            x, y = load_npz(p)
        except DataError as e:
            raise PreparedError(str(e)) from None
        y = torch.zeros(len(x), dtype=torch.int64) if y is None else y
        keys = np.array([held_out_key(k) for k in npz_keys(x)], dtype=np.uint64)
        h.update(f"{p.stat().st_size}|{list(x.shape)}".encode())
        return _Source("npz", p.resolve(), [str(i) for i in range(int(y.max()) + 1)], list(range(len(x))),
                       h.hexdigest(), "hash", (x, y, keys))
    if any((p / f"train-images-idx3-ubyte{gz}").exists() for gz in ("", ".gz")):
        imgs, labs, test = fashion_mnist_arrays(p, ["train", "test"])  # test: 1 for the test split's images
        x, y = torch.from_numpy(imgs.copy())[:, None], torch.from_numpy(labs.astype(np.int64))
        h.update(f"{list(x.shape)}".encode())
        return _Source("idx", p.resolve(), list(FASHION_MNIST_CLASSES), list(range(len(x))), h.hexdigest(), "source",
                       (x, y, test))
    names, files = list_folder(p)
    items = [(label, f) for label, group in enumerate(files) for f in group]
    if not items:
        raise PreparedError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {p}")
    for _, f in items:
        h.update(f"{f.relative_to(p).as_posix()}|{f.stat().st_size}\n".encode())
    return _Source("folder", p.resolve(), names, items, h.hexdigest(), "hash")


# ----------------------------------------------------------------------------- decoding (worker processes)
def _folder_modes(job: tuple) -> set[str]:
    """The decoding modes (``L``/``RGB``) of a chunk of files as stored, each file's size checked
    against ``fit`` (:func:`~cdm.data.check_fit`; headers only; unreadable ones left out)."""
    from PIL import Image

    files, size, fit = job
    modes = set()
    for f in files:
        try:
            with Image.open(f) as im:
                check_fit((im.height, im.width), size, fit, f"image {f}", SETTINGS)
                modes.add(folder_mode(0, im.mode))
        except DataError:
            raise
        except decode_errors():
            pass
    return modes


def _decode_chunk(job: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], int]:
    """One chunk of a folder: ``(images uint8 [k, C, R, R], labels int64 [k], held-out keys uint64 [k],
    unreadable files, how many images were enlarged to R)``."""
    root, items, size, fit, channels, out_channels, on_bad = job
    torch.set_num_threads(1)
    images, labels, keys, bad, small = [], [], [], [], 0
    for label, f in items:
        try:
            im, up = decode_image(f, size, fit, channels, SETTINGS)
            small += up
        except DataError:
            raise
        except decode_errors() as e:
            if on_bad == "fail":
                raise PreparedError(f"cannot read image {f} ({e}); remove it, or pass --on-bad skip") from None
            bad.append(str(f))
            continue
        images.append(convert_channels(im[None], out_channels)[0])
        labels.append(label)
        keys.append(held_out_key(Path(f).relative_to(root).as_posix()))
    x = torch.stack(images).numpy() if images else np.empty((0, out_channels, size, size), np.uint8)
    return x, np.array(labels, dtype=np.int64), np.array(keys, dtype=np.uint64), bad, small


def _synthetic_chunk(job: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], int]:
    """Made-up images ``[k, C, R, R]`` (a random colour per image plus noise, seeded by the first item),
    labels ``i % classes``, held-out keys of ``synthetic/i``; as :func:`_decode_chunk` returns them."""
    items, size, channels, classes = job
    g = np.random.default_rng(items[0])
    k = len(items)
    base = g.integers(0, 256, (k, channels, 1, 1), dtype=np.uint8)
    noise = g.integers(0, 64, (k, channels, size, size), dtype=np.uint8)
    x = base + noise  # wraps around: texture, not a flat field
    keys = np.array([held_out_key(f"synthetic/{i}") for i in items], dtype=np.uint64)
    return x, np.array(items, dtype=np.int64) % classes, keys, [], 0


def _array_chunk(src: _Source, items: list[int], cfg: PrepareConfig, out_channels: int):
    x, y, split = src.arrays
    idx = torch.tensor(items, dtype=torch.int64)
    im = convert_channels(fit_to(x[idx], cfg.resolution, cfg.fit, f"the images in {src.path}", SETTINGS), out_channels)
    small = len(items) if check_fit(x.shape[2:], cfg.resolution, cfg.fit, src.path, SETTINGS) else 0
    return im.numpy(), y[idx].numpy(), np.asarray(split)[idx.numpy()], [], small


# ----------------------------------------------------------------------------- writing
def _request(src: _Source, cfg: PrepareConfig) -> dict:
    """What identifies a preparation: two runs with the same request write the same set."""
    return {"kind": src.kind, "path": str(src.path), "items": len(src.items), "listing": src.listing,
            "resolution": cfg.resolution, "fit": cfg.fit, "channels": cfg.channels, "chunk": cfg.chunk}


def _check_out(out: Path, request: dict) -> dict | None:
    """The manifest already at ``out`` if it is this same preparation (finished or not), None if
    ``out`` is free; anything else there is refused."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise PreparedError(f"--out {out} is a file; give a folder for the prepared set")
    if not (out / MANIFEST).exists():
        if any(f.name != LOCK for f in out.iterdir()):
            raise PreparedError(f"--out {out} already holds files that are not a prepared set; choose another --out")
        return None
    m = read_manifest(out)
    old = m.get("request", {})
    diff = [f"{k} {old.get(k)!r} there, {v!r} now" for k, v in request.items() if old.get(k) != v]
    if diff:
        raise PreparedError(f"--out {out} holds a different prepared set ({'; '.join(diff)}); choose another "
                            f"--out, or delete that folder first")
    return m


def _cdm_version() -> str:
    try:
        return metadata.version("cdm")
    except metadata.PackageNotFoundError:
        return "unknown"


def _fingerprint(shape: list[int], digests: list[str]) -> str:
    h = hashlib.sha256(f"{FORMAT}|{VERSION}|{shape}|".encode())
    for d in digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()[:16]


class _Writer:
    """Appends chunks to the three array files and records each, durably, in ``.progress.json``."""

    def __init__(self, out: Path, split_rule: str, fresh: bool):
        self.out = out
        state = {} if fresh else json.loads((out / PROGRESS).read_text()) if (out / PROGRESS).exists() else {}
        self.done, self.rows = state.get("items_done", 0), state.get("rows", 0)
        self.digests, self.bad = state.get("digests", []), state.get("bad", [])
        self.skipped, self.upsampled = state.get("skipped", 0), state.get("upsampled", 0)
        sizes = {IMAGES: None, LABELS: 8, SPLIT: SPLIT_DTYPES[split_rule].itemsize}
        self.files = {}
        for name in sizes:
            f = open(out / name, "r+b" if (out / name).exists() else "w+b")
            self.files[name] = f
        self.split_dtype = SPLIT_DTYPES[split_rule]

    def start(self, row_bytes: int) -> None:
        """Cut the files back to the recorded rows (a killed run may have written past them)."""
        self.row_bytes = row_bytes
        for name, per in ((IMAGES, row_bytes), (LABELS, 8), (SPLIT, self.split_dtype.itemsize)):
            self.files[name].truncate(self.rows * per)
            self.files[name].seek(self.rows * per)

    def append(self, n_items: int, x: np.ndarray, y: np.ndarray, split: np.ndarray, bad: list[str],
               small: int = 0) -> None:
        parts = [np.ascontiguousarray(x).tobytes(), y.astype("<i8").tobytes(),
                 np.asarray(split).astype(self.split_dtype).tobytes()]
        for f, b in zip(self.files.values(), parts):
            f.write(b)
            f.flush()
            os.fsync(f.fileno())
        self.digests.append(hashlib.sha256(b"".join(parts)).hexdigest())
        self.done += n_items
        self.rows += len(x)
        self.skipped += len(bad)
        self.upsampled += small
        self.bad = (self.bad + bad)[:5]
        state = {"items_done": self.done, "rows": self.rows, "digests": self.digests, "skipped": self.skipped,
                 "bad": self.bad, "upsampled": self.upsampled}
        atomic_write(self.out / PROGRESS, lambda tmp: Path(tmp).write_text(json.dumps(state)))

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def prepare(cfg: PrepareConfig) -> PreparedSet:
    """Write (or finish, or find already written) the prepared set ``cfg`` describes; returns it opened."""
    src = _open_source(cfg.source)
    out = Path(cfg.out).expanduser()
    request = _request(src, cfg)
    found = _check_out(out, request)
    if found is not None and found.get("complete"):
        print(f"{out} already holds this prepared set ({found['count']:,} images, fingerprint "
              f"{found['fingerprint']}); nothing to do", file=sys.stderr)
        return open_prepared(out)
    with run_lock(out, "preparing"):  # one writer: a second cdm prepare into --out is refused at once
        return _prepare(src, out, cfg, found, request)


def _prepare(src: _Source, out: Path, cfg: PrepareConfig, found: dict | None, request: dict) -> PreparedSet:
    from tqdm.auto import tqdm

    out_channels = cfg.channels or (found["shape"][0] if found else 0)
    if src.kind == "folder" and not found and (not out_channels or cfg.fit == "resize"):
        # the headers: the modes (as stored: RGB if any image is in colour), and sizes --fit may refuse
        if cfg.progress:
            print(f"reading the headers of {len(src.items):,} images" + ("" if cfg.fit == "resize" else
                  " (--channels 1 or 3 skips this)"), file=sys.stderr)
        jobs = [(files, cfg.resolution, cfg.fit) for files in _chunks([f for _, f in src.items], cfg.chunk)]
        modes = set().union(*_map(_folder_modes, jobs, cfg.workers))
        out_channels = out_channels or (1 if modes == {"L"} else 3)
    elif src.kind in ("npz", "idx"):
        check_fit(src.arrays[0].shape[2:], cfg.resolution, cfg.fit, f"the images in {src.path}", SETTINGS)
    if not out_channels:
        out_channels = 3 if src.kind == "synthetic" else src.arrays[0].shape[1]
    shape = [out_channels, cfg.resolution, cfg.resolution]
    manifest = {"format": FORMAT, "version": VERSION, "complete": False, "cdm_version": _cdm_version(),
                "request": request, "source": {"kind": src.kind, "path": str(src.path)}, "shape": shape,
                "resolution": cfg.resolution, "fit": cfg.fit, "channels": out_channels, "class_names": src.class_names,
                "split": {"rule": src.split_rule}}
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))

    w = _Writer(out, src.split_rule, fresh=found is None)
    try:
        w.start(int(np.prod(shape)))
        todo = list(_chunks(src.items, cfg.chunk))[w.done // cfg.chunk:]
        bar = tqdm(total=len(src.items), initial=w.done, unit="img", disable=not cfg.progress, desc="prepare",
                   dynamic_ncols=True, mininterval=1.0)
        if src.kind == "folder":
            jobs = [(src.path, items, cfg.resolution, cfg.fit, cfg.channels, out_channels, cfg.on_bad)
                    for items in todo]
            results = _map(_decode_chunk, jobs, cfg.workers)
        elif src.kind == "synthetic":
            results = map(_synthetic_chunk, [(items, cfg.resolution, out_channels, len(src.class_names))
                                             for items in todo])
        else:
            results = (_array_chunk(src, items, cfg, out_channels) for items in todo)
        for items, (x, y, split, bad, small) in zip(todo, results):
            w.append(len(items), x, y, split, bad, small)
            bar.update(len(items))
        bar.close()
    finally:
        w.close()
    if w.rows == 0:
        raise PreparedError(f"no readable images in {src.path} ({w.skipped} unreadable); nothing was prepared")
    if src.kind == "folder":
        check_classes(src.class_names, np.bincount(np.fromfile(out / LABELS, "<i8"), minlength=len(src.class_names)),
                      src.path)
    if w.skipped:
        import warnings

        warnings.warn(f"skipped {w.skipped} unreadable image(s) in {src.path}, e.g. {w.bad[0]} "
                      f"(--on-bad fail stops instead)")
    warn_upsampled(w.upsampled, w.rows, src.path, cfg.resolution)
    manifest.update(complete=True, count=w.rows, skipped=w.skipped, upsampled=w.upsampled,
                    fingerprint=_fingerprint(shape, w.digests))
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
    (out / PROGRESS).unlink(missing_ok=True)
    return open_prepared(out)


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _map(fn, jobs, workers: int):
    """``fn`` over ``jobs`` in order: in this process (``workers == 1``), else in a pool of
    ``workers`` processes (0: one per core), results yielded as they come in order."""
    jobs = list(jobs)
    n = workers or os.cpu_count() or 1
    if n == 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(min(n, len(jobs))) as pool:
        yield from pool.imap(fn, jobs)


def describe(ps: PreparedSet) -> str:
    """One line about a prepared set: where, how many images, their shape, size on disk, fingerprint."""
    m = ps.manifest
    return (f"{ps.path}: {m['count']:,} images, {m['shape'][0]}x{m['resolution']}x{m['resolution']} uint8 "
            f"(fit {m['fit']}), {len(m['class_names'])} classes, {ps.disk_bytes / 2 ** 30:.2f} GiB on disk, "
            f"fingerprint {m['fingerprint']}" + (f"; {m['skipped']} unreadable image(s) skipped" if m.get('skipped')
                                                 else ""))
