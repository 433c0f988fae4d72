"""Sample-quality evaluation: FID, KID, IS and precision/recall in a chosen feature space,
per-stage checks of a cascade, and the Classification Accuracy Score.

Every number carries the feature space it was computed in and the sample counts behind it.
Reference features of real data are cached per (feature space, data set, split, resolution,
count) by :func:`cdm.features.cached_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from .cascade import Cascade, CascadeSampling
from .data import DataConfig, DataError, ImageSet, downsample, load_dataset, to_float, to_uint8
from .metrics import consistency_psnr, feature_stats, frechet_distance, inception_score, kid, precision_recall

def real_images(data: DataConfig, split: str, resolution: int, n: int) -> ImageSet:
    """The first ``n`` images of ``split`` (0 = all) at ``resolution``, made with the same
    anti-aliased :func:`downsample` as the cascade's inputs; uint8."""
    cfg = DataConfig(**{**data.__dict__, "split": split, "limit": n, "flip": False})
    ds = load_dataset(cfg)
    imgs = ds.images if ds.images.shape[-1] == resolution else to_uint8(downsample(to_float(ds.images), resolution))
    return ImageSet(imgs, ds.labels, ds.class_names)


def ground_truth_lowres(data: DataConfig, split: str, n: int, resolution: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Real low-resolution inputs for an SR stage (the paper's ground-truth conditioning): a
    seeded random subset of ``n`` images of ``split`` (without replacement), made exactly as
    training makes the stage's input: the data set at ``data.resolution`` (uint8), to float
    ``[-1, 1]``, then :func:`downsample` to ``resolution``, not re-quantised.
    Returns ``(z0 float [n, C, resolution, resolution], labels int64 [n])``."""
    ds = load_dataset(replace(data, split=split, flip=False))
    if not 1 <= n <= len(ds):
        raise DataError(f"ground-truth conditioning needs 1..{len(ds)} images of the {split!r} split, asked for {n}")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return downsample(to_float(ds.images[idx]), resolution), ds.labels[idx]


@dataclass
class ReferenceFeatures:
    """Real-data features in one feature space (and where they came from)."""
    features: np.ndarray  # [M, D] (for KID and precision/recall; possibly a subset)
    space: str
    source: str  # e.g. "fashion-mnist:test@32px n=10000"
    mu: np.ndarray | None = None  # [D], of all reference images (else computed from features)
    sigma: np.ndarray | None = None  # [D, D]


def quality_scores(fake: dict, ref: ReferenceFeatures, kid_subset: int = 1000, pr_k: int = 3,
                   metrics: tuple[str, ...] = ("fid", "kid", "is", "pr")) -> dict:
    """FID, KID, IS (if the extractor gives class probabilities) and precision/recall of fake
    features ``fake`` (an extractor's output) against ``ref``."""
    f = np.asarray(fake["features"], dtype=np.float64)
    r = ref.features.astype(np.float64)
    out: dict = {"feature_space": ref.space, "reference": ref.source, "n_fake": len(f), "n_real": len(r)}
    if "fid" in metrics:
        mu, sigma = (ref.mu, ref.sigma) if ref.mu is not None else feature_stats(r)
        out["fid"] = float(frechet_distance(*feature_stats(f), mu, sigma))
    if "kid" in metrics:
        m, s = kid(f, r, subset_size=min(kid_subset, len(f), len(r)))
        out["kid"], out["kid_std"] = float(m), float(s)
    if "is" in metrics and fake.get("probs") is not None:
        m, s = inception_score(np.asarray(fake["probs"], dtype=np.float64), splits=min(10, max(1, len(f) // 100)))
        out["is"], out["is_std"] = float(m), float(s)
    if "pr" in metrics:
        p, rc = precision_recall(r, f, k=pr_k)
        out["precision"], out["recall"] = float(p), float(rc)
    return out


def score(images: Tensor, extractor, ref: ReferenceFeatures, **kw) -> dict:
    """Scores of images (uint8 or float in [-1, 1], ``[N, C, H, W]``) against reference features."""
    x = images if images.dtype == torch.uint8 else to_uint8(images)
    return quality_scores(extractor(x), ref, **kw)


@torch.no_grad()
def stage_checks(cascade: Cascade, i: int, settings: CascadeSampling, real: ImageSet, lower: Tensor | None,
                 lower_labels: Tensor | None, seeds: list[int], extractor, ref: ReferenceFeatures,
                 level: int | None = None, metrics: tuple[str, ...] = ("fid", "kid")) -> dict:
    """Per-stage evaluation of SR stage ``i`` (the paper's Table 5 ablation and a consistency check):

    - ``ground_truth``: conditioned on real low-resolution images (``downsample`` of real ``x0``);
    - ``generated``: conditioned on ``lower`` (the stage below's samples, clean ``z0``, with their
      class labels ``lower_labels``), if given;
    - ``consistency_psnr``: ``downsample(output)`` against the clean input it was conditioned on.
    Both use non-truncated conditioning at ``level`` (default: the settings' level)."""
    stage = cascade.stages[i]
    s = settings.stages[i].level if level is None else level
    steps = settings.stages[i].steps
    n = len(seeds)
    labels = real.labels[:n]
    x_real = to_float(real.images[:n])
    z_gt = downsample(x_real, stage.lowres_resolution)
    out: dict = {"stage": i, "name": stage.config.name, "level": s, "steps": steps, "sampler": settings.sampler}
    x_gt, _ = cascade.sample_stage(i, labels, seeds, steps, lowres=z_gt, level=s, sampler=settings.sampler,
                                   spacing=settings.spacing)
    x_gt = x_gt.clamp(-1, 1).cpu()
    out["ground_truth"] = score(x_gt, extractor, ref, metrics=metrics)
    out["ground_truth"]["consistency_psnr"] = consistency_psnr(x_gt, z_gt)
    if lower is not None:
        x_gen, _ = cascade.sample_stage(i, lower_labels[:n], seeds, steps, lowres=lower[:n], level=s,
                                        sampler=settings.sampler, spacing=settings.spacing)
        x_gen = x_gen.clamp(-1, 1).cpu()
        out["generated"] = score(x_gen, extractor, ref, metrics=metrics)
        out["generated"]["consistency_psnr"] = consistency_psnr(x_gen, lower[:n].cpu())
    return out
