"""What a reference can resolve: the real-vs-real floor of FID and KID, and the small-reference warning.

A score means little without the score real images get in its place. The **floor** at ``n`` is
FID and KID (each with its bootstrap standard error, :func:`cdm.eval.quality.standard_error`)
of ``n`` *real* images that are not in the reference — the other split of the same data set
(:func:`floor_images`) — against the very reference the generated images are scored against:
what a perfect generator of ``n`` samples would get. Taking them from the other split keeps
the reference whole, so the floor is measured at the same ``n`` *and* the same reference size
(two halves of the reference would score against a smaller reference, and a 286-image
reference cannot be split into two sets of 1000 at all). With fewer than ``n`` images in the
other split, the floor is at the ``n`` it has (reported).

The **small-reference warning** (:func:`small_reference_warning`) asks how much of a score's
noise comes from the reference holding only ``m`` images: ``fid_ref_se``, the bootstrap SE of
the floor's FID over resamples of the *reference* rows (the real set held fixed). A difference
under twice that (:data:`~cdm.eval.verdict.NOISE_SE`) may be an accident of which images the
reference holds. The reference is too small when that resolvable difference exceeds
:data:`RESOLVE_FRACTION` of the score (the larger of the FID and its floor): FID cannot then
tell apart cascades ``RESOLVE_FRACTION`` apart. Since that SE falls as ``1 / sqrt(m)``, the
reference size that would bring it down to the target is ``m * (resolvable / target)^2``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..files import atomic_write
from ..data import DataConfig, DataError
from ..metrics import feature_stats, fid_bootstrap_se
from .features import ReferenceFeatures, default_cache_dir, reference_features
from .reference import ReferenceSet, ReferenceSpec, load_reference
from .scores import scores_with_se
from .verdict import NOISE_SE

RESOLVE_FRACTION = 0.1  # the reference should resolve FID differences of this fraction of the score
FLOOR_VERSION = 1  # bump when the floor's computation changes (cached floors are then recomputed)


def floor_images(data: DataConfig, spec: ReferenceSpec, n: int, seed: int = 0) -> ReferenceSet | None:
    """``n`` real images (a class-stratified subset, or all there are) of the split the reference
    ``spec`` does not use: ``test`` for a ``train`` reference, else ``train`` (an explicit
    reference path or the ``all`` split: ``train``, which then may share images with it). None
    when that split is empty or has fewer than two images."""
    other = "test" if spec.split == "train" and not spec.path else "train"
    try:
        real = load_reference(data, replace(spec, split=other, n=0, path=""))
    except DataError:  # an empty split: no floor, and the scores are still worth having
        return None
    if len(real) < 2:
        return None
    return real.take(n, seed) if n < len(real) else real


def floor_scores(real: np.ndarray, ref: ReferenceFeatures, resamples: int = 30) -> dict:
    """The floor from real features ``real [n, D]`` against ``ref``: ``fid``, ``fid_se``, ``kid``,
    ``kid_se`` as a generated set's (:func:`cdm.eval.scores.scores_with_se`), ``n`` and
    ``fid_ref_se``: the FID's bootstrap SE over resamples of the reference rows (``ref.features``)
    with ``real`` held fixed — FID is symmetric, so that is :func:`cdm.metrics.fid_bootstrap_se`
    with the roles swapped."""
    out = {k: v for k, v in scores_with_se(real, ref, resamples).items() if k in ("fid", "fid_se", "kid", "kid_se")}
    out["n"] = int(len(real))
    out["fid_ref_se"] = fid_bootstrap_se(ref.features, *feature_stats(real), num_resamples=resamples)
    return out


def real_floor(extractor, real: ReferenceSet, ref_set: ReferenceSet, ref: ReferenceFeatures, resolution: int,
               cache_dir: str | Path | None = None, resamples: int = 30) -> dict:
    """:func:`floor_scores` of the images ``real`` against ``ref`` (``ref_set``'s features at
    ``resolution``), with ``source``: cached as JSON beside the reference statistics, keyed by the
    extractor, both sets' fingerprints, the resolution and ``resamples``."""
    ident = json.dumps([FLOOR_VERSION, extractor.name, real.fingerprint, ref_set.fingerprint, int(resolution),
                        int(resamples)])
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"floor-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("ident") == ident:
            return cached["floor"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    feats = reference_features(extractor, real, resolution, cache_dir).features
    floor = {**floor_scores(feats, ref, resamples), "source": real.source}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps({"ident": ident, "floor": floor})))
    return floor


def small_reference_warning(fid: float, floor: dict, n_ref: int) -> str | None:
    """One line when the reference of ``n_ref`` images is too small for FID to tell apart cascades
    :data:`RESOLVE_FRACTION` apart (criterion in the module docstring), saying how many images would
    do; None when it is large enough. ``floor``: :func:`floor_scores`'s dict."""
    resolvable = NOISE_SE * floor["fid_ref_se"]
    target = RESOLVE_FRACTION * max(fid, floor["fid"])
    if not target > 0 or resolvable <= target:
        return None
    need = math.ceil(n_ref * (resolvable / target) ** 2)
    return (f"the reference has {n_ref} images: FID differences under ~{resolvable:.3g} ({NOISE_SE:g} x its standard "
            f"error from the reference alone) may be an accident of which images it holds, more than "
            f"{RESOLVE_FRACTION:.0%} of FID {max(fid, floor['fid']):.3g}; about {need} reference images are needed "
            f"(--n-ref, or a larger held-out split)")
