"""Quality scores of generated features against a reference in one feature space: FID, KID, IS and
precision/recall (:func:`quality_scores`), and FID's and KID's bootstrap standard errors
(:func:`standard_error`). ``cdm eval``, ``cdm sweep`` and the real-vs-real floor all score with these."""

from __future__ import annotations

import numpy as np

from ..metrics import feature_stats, fid_bootstrap_se, frechet_distance, inception_score, kid, kid_bootstrap, \
    precision_recall
from .features import ReferenceFeatures


def quality_scores(fake: dict, ref: ReferenceFeatures, metrics: tuple[str, ...] = ("fid", "kid", "is", "pr")) -> dict:
    """FID, KID, IS (if the extractor gives class probabilities) and precision/recall (k = 3) of
    fake features ``fake`` (an extractor's output) against ``ref``."""
    f = np.asarray(fake["features"], dtype=np.float64)
    r = ref.features.astype(np.float64)
    out: dict = {"feature_space": ref.space, "reference": ref.source, "n_fake": len(f), "n_real": len(r)}
    if "fid" in metrics:
        mu, sigma = (ref.mu, ref.sigma) if ref.mu is not None else feature_stats(r)
        out["fid"] = float(frechet_distance(*feature_stats(f), mu, sigma))
    if "kid" in metrics:
        m, s = kid(f, r, subset_size=min(1000, len(f), len(r)))
        out["kid"], out["kid_std"] = float(m), float(s)
    if "is" in metrics and fake.get("probs") is not None:
        m, s = inception_score(np.asarray(fake["probs"], dtype=np.float64), splits=min(10, max(1, len(f) // 100)))
        out["is"], out["is_std"] = float(m), float(s)
    if "pr" in metrics:
        p, rc = precision_recall(r, f, k=3)
        out["precision"], out["recall"] = float(p), float(rc)
    return out


def ref_stats(ref: ReferenceFeatures) -> tuple[np.ndarray, np.ndarray]:
    return (ref.mu, ref.sigma) if ref.mu is not None else feature_stats(ref.features)


def standard_error(metric: str, feats: np.ndarray, ref: ReferenceFeatures, resamples: int = 30) -> float:
    """Bootstrap standard error of ``metric`` (``fid`` or ``kid``) of features ``feats [N, D]``
    against ``ref``: the standard deviation over ``resamples`` resamples of the ``N`` rows, the
    reference held fixed (:func:`cdm.metrics.fid_bootstrap_se`; KID's from
    :func:`cdm.metrics.kid_bootstrap`, the full-set MMD^2 that its subsets average)."""
    if metric == "fid":
        return fid_bootstrap_se(feats, *ref_stats(ref), num_resamples=resamples)
    if metric == "kid":
        return float(np.std(kid_bootstrap([feats], ref.features, resamples)[:, 0], ddof=1))
    raise ValueError(f"standard_error knows fid and kid, not {metric!r}")


def scores_with_se(feats: np.ndarray, ref: ReferenceFeatures, resamples: int = 30,
                   metrics: tuple[str, ...] = ("fid", "kid")) -> dict:
    """:func:`quality_scores` of features ``feats [N, D]`` with ``fid_se`` and ``kid_se`` (:func:`standard_error`)."""
    q = quality_scores({"features": feats}, ref, metrics)
    q.update({f"{m}_se": standard_error(m, feats, ref, resamples) for m in ("fid", "kid") if m in q})
    return q
