"""Sample-quality metrics as pure functions of feature arrays.

Every function takes features ``[N, D]`` (or class probabilities ``[N, K]``) as a numpy array
or a torch tensor (any float dtype, any device); they are converted to float64 numpy on the
CPU, and every result is a plain Python ``float``. Which network made the features is the
caller's business (see :mod:`cdm.eval.features`); these functions only do the statistics.

- :func:`feature_stats` and :func:`frechet_distance`: FID (Heusel et al. 2017);
  :func:`fid_bootstrap_se`: its bootstrap standard error over the generated samples, and
  :func:`fid_bootstrap`: the paired resamples behind it (several sets, the same rows drawn).
- :func:`kid`: Kernel Inception Distance (Binkowski et al. 2018), unbiased MMD^2 with the cubic
  polynomial kernel, averaged over random subsets; :func:`kid_bootstrap`: paired resamples of it.

Standard errors (``*_se``) all mean one thing: the standard deviation of the score over bootstrap
resamples of the scored rows, the reference held fixed (Efron & Tibshirani 1993, eq. 6.6). KID's
``std`` from :func:`kid` is the spread over random subsets, not an error bar.
- :func:`inception_score`: IS (Salimans et al. 2016) from predicted class probabilities.
- :func:`precision_recall`: improved precision and recall (Kynkaanniemi et al. 2019).
- :func:`psnr` of image batches, and :func:`consistency_psnr`: how closely an SR stage's outputs,
  downsampled, match the low-resolution inputs they were conditioned on.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

from .data import downsample

__all__ = ["feature_stats", "frechet_distance", "fid_bootstrap", "fid_bootstrap_se", "polynomial_mmd2", "kid",
           "kid_bootstrap",
           "inception_score", "precision_recall", "psnr", "consistency_psnr"]


def _f64(x: ArrayLike, name: str, ndim: int) -> np.ndarray:
    """``x`` as a float64 numpy array of ``ndim`` dimensions, or a ValueError naming it."""
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return a


def _features(x: ArrayLike, name: str, min_rows: int = 1) -> np.ndarray:
    a = _f64(x, name, 2)
    if a.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows [N, D], got shape {list(a.shape)}")
    return a


def _same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")


# ----------------------------------------------------------------------------- FID
def feature_stats(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (divisor N - 1) of features ``[N, D]``."""
    x = _features(feats, "feats", min_rows=2)
    mu = x.mean(axis=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _psd_eigvals(w: np.ndarray) -> np.ndarray:
    """Eigenvalues ``[D]`` of a symmetric PSD matrix with those below its rounding error
    (``D * eps * max``, as numpy's ``matrix_rank``) set to 0: a zero eigenvalue computed as
    1e-16 would otherwise add sqrt(1e-16) = 1e-8 to a trace of square roots."""
    tol = max(w.max(initial=0.0), 0.0) * w.shape[0] * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix ``[D, D]``."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(_psd_eigvals(w))) @ v.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): ``mu [D]``, ``sigma [D, D]``.

    ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017, eq. 6). The trace
    of the square root is taken as ``Tr((R S2 R)^(1/2))`` with ``R = S1^(1/2)``: ``R S2 R`` is
    similar to ``S1 S2`` (same eigenvalues) but symmetric PSD, so two symmetric eigen-
    decompositions suffice, with no complex parts and no failure on singular covariances
    (fewer samples than dimensions). Rounding errors are clipped, so the result is >= 0.
    """
    m1, m2 = _f64(mu1, "mu1", 1), _f64(mu2, "mu2", 1)
    s1, s2 = _f64(sigma1, "sigma1", 2), _f64(sigma2, "sigma2", 2)
    d = m1.shape[0]
    for name, a in (("mu2", m2), ("sigma1", s1), ("sigma2", s2)):
        if a.shape != (d,) * a.ndim:
            raise ValueError(f"{name} has shape {list(a.shape)}; expected {[d] * a.ndim} to match mu1 [{d}]")
    return _frechet(m1, s1, _sqrt_psd(s1), m2, s2)


def _frechet(m1: np.ndarray, s1: np.ndarray, r1: np.ndarray, m2: np.ndarray, s2: np.ndarray) -> float:
    """:func:`frechet_distance` given ``r1 = S1^(1/2)`` (so a fixed S1 is decomposed once)."""
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(_psd_eigvals(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    fd = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    return max(fd, 0.0)


def _paired_sets(feats: Sequence[ArrayLike], num_resamples: int) -> list[np.ndarray]:
    """The feature sets ``[N, D]`` of a paired bootstrap (one ``N`` for all), checked."""
    xs = [_features(f, f"feats[{k}]", min_rows=2) for k, f in enumerate(feats)]
    if not xs or len({x.shape for x in xs}) != 1:
        raise ValueError(f"a paired bootstrap needs sets of one shape [N, D], got {[list(x.shape) for x in xs]}")
    if num_resamples < 2:
        raise ValueError(f"a bootstrap needs num_resamples >= 2, got {num_resamples}")
    return xs


def fid_bootstrap(feats: Sequence[ArrayLike], mu_ref: ArrayLike, sigma_ref: ArrayLike, num_resamples: int = 50,
                  seed: int = 0) -> np.ndarray:
    """FIDs ``[B, K]`` of ``K`` feature sets ``[N, D]`` (one ``N``) against fixed reference
    statistics ``mu_ref [D]``, ``sigma_ref [D, D]``, over ``B = num_resamples`` bootstrap resamples:
    replicate ``b`` draws ``N`` row indices with replacement (a generator seeded with ``seed``) and
    uses *the same indices for every set* — a paired bootstrap, so when row ``j`` of each set was
    made from the same seed and label, the spread of a column difference is that of the score
    difference, correlations included. A resample repeats rows, so its FID is biased upwards; its
    spread still estimates the spread over independent sets of size ``N``. ``sigma_ref`` is
    decomposed once."""
    xs = _paired_sets(feats, num_resamples)
    mu, s_ref = _f64(mu_ref, "mu_ref", 1), _f64(sigma_ref, "sigma_ref", 2)
    n, d = xs[0].shape
    if mu.shape != (d,) or s_ref.shape != (d, d):
        raise ValueError(f"reference statistics mu {list(mu.shape)}, sigma {list(s_ref.shape)} do not match "
                         f"features of dimension {d}")
    rng = np.random.default_rng(seed)
    r_ref = _sqrt_psd(s_ref)
    out = np.empty((num_resamples, len(xs)))
    for b in range(num_resamples):
        idx = rng.integers(0, n, n)
        out[b] = [_frechet(mu, s_ref, r_ref, *feature_stats(x[idx])) for x in xs]
    return out


def fid_bootstrap_se(feats: ArrayLike, mu_ref: ArrayLike, sigma_ref: ArrayLike, num_resamples: int = 50,
                     seed: int = 0) -> float:
    """Bootstrap standard error of the FID of generated features ``feats [N, D]`` against fixed
    reference statistics ``mu_ref [D]``, ``sigma_ref [D, D]``: the standard deviation (divisor
    ``B - 1``) of :func:`fid_bootstrap`'s ``B = num_resamples`` values (Efron & Tibshirani 1993,
    eq. 6.6). It measures the noise that the finite generated set puts into the FID, with the
    reference held fixed. Costs ``B`` covariance products and eigen-decompositions of size ``D``."""
    return float(np.std(fid_bootstrap([feats], mu_ref, sigma_ref, num_resamples, seed)[:, 0], ddof=1))


# ----------------------------------------------------------------------------- KID
def _cubic_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / D + 1)^3 for all pairs: ``[n, D] x [m, D] -> [n, m]``."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def polynomial_mmd2(x: ArrayLike, y: ArrayLike, unbiased: bool = True) -> float:
    """Squared MMD between samples ``x [n, D]`` and ``y [m, D]`` with the cubic polynomial kernel.

    Unbiased (Gretton et al. 2012, eq. 3): the within-set means leave out the diagonal
    (``k(x_i, x_i)``), so the estimate's expectation is the true MMD^2 — 0 when both samples
    come from one distribution, and single estimates can then be negative. Biased: all pairs,
    i.e. the squared RKHS distance of the two empirical mean embeddings, always >= 0.
    """
    a, b = _features(x, "x", 2), _features(y, "y", 2)
    _same_dim(a, b)
    kxx, kyy, kxy = _cubic_kernel(a, a), _cubic_kernel(b, b), _cubic_kernel(a, b)
    n, m = a.shape[0], b.shape[0]
    if unbiased:
        xx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        yy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    else:
        xx, yy = kxx.mean(), kyy.mean()
    return float(xx + yy - 2 * kxy.mean())


def kid(feats_a: ArrayLike, feats_b: ArrayLike, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance between features ``[Na, D]`` and ``[Nb, D]``: mean and standard
    deviation of the unbiased cubic-kernel MMD^2 (:func:`polynomial_mmd2`) over ``num_subsets``
    pairs of random subsets of ``min(subset_size, Na, Nb)`` rows each, drawn without replacement
    from a generator seeded with ``seed`` (Binkowski et al. 2018). Usually reported x 1000."""
    a, b = _features(feats_a, "feats_a", 2), _features(feats_b, "feats_b", 2)
    _same_dim(a, b)
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(f"kid needs num_subsets >= 1 and subset_size >= 2, got {num_subsets}, {subset_size}")
    m = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    vals = [polynomial_mmd2(a[rng.choice(a.shape[0], m, replace=False)],
                            b[rng.choice(b.shape[0], m, replace=False)]) for _ in range(num_subsets)]
    return float(np.mean(vals)), float(np.std(vals))


def kid_bootstrap(feats: Sequence[ArrayLike], ref: ArrayLike, num_resamples: int = 50, seed: int = 0,
                  chunk: int = 2000) -> np.ndarray:
    """Paired bootstrap ``[B, K]`` of the unbiased cubic-kernel MMD^2 of ``K`` feature sets
    ``[N, D]`` (one ``N``) against all of ``ref [M, D]``, *less the reference's within-set term*
    (the mean of ``k(r_i, r_j)``, ``i != j``, which resampling the scored rows leaves unchanged):
    column spreads and column differences are those of the MMD^2 (the KID, up to its subset
    averaging); add that constant for values. Replicate ``b`` draws ``N`` rows with replacement
    (seeded with ``seed``), the same rows for every set, as :func:`fid_bootstrap`; pairs of one
    drawn row with itself are left out of the within-set mean. The kernels are computed once
    (``[N, N]`` per set, and ``[N, M]`` in blocks of ``chunk`` reference rows), so a replicate is
    a gather of ``N^2`` kernel values."""
    xs = _paired_sets(feats, num_resamples)
    r = _features(ref, "ref", 2)
    _same_dim(xs[0], r)
    n = xs[0].shape[0]
    kxx = [_cubic_kernel(x, x) for x in xs]
    kxr = [sum(_cubic_kernel(x, r[i:i + chunk]).sum(1) for i in range(0, len(r), chunk)) / len(r) for x in xs]
    rng = np.random.default_rng(seed)
    out = np.empty((num_resamples, len(xs)))
    for b in range(num_resamples):
        idx = rng.integers(0, n, n)
        other = idx[:, None] != idx[None, :]
        out[b] = [k[np.ix_(idx, idx)][other].mean() - 2 * kr[idx].mean() for k, kr in zip(kxx, kxr)]
    return out


# ----------------------------------------------------------------------------- IS
def inception_score(probs: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """Inception Score of class probabilities ``[N, K]`` (rows sum to 1): mean and standard
    deviation over ``splits`` consecutive chunks of ``exp(E_x KL(p(y|x) || p(y)))``, with
    ``p(y)`` the chunk's mean prediction (Salimans et al. 2016). Lies in [1, K]."""
    p = _f64(probs, "probs", 2)
    if p.shape[0] < 1 or (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise ValueError(f"probs must be [N, K] non-negative rows summing to 1 (softmax outputs), "
                         f"got shape {list(p.shape)}")
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must lie in [1, N={p.shape[0]}], got {splits}")
    scores = []
    for chunk in np.array_split(p, splits):
        py = chunk.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = chunk * (np.log(chunk) - np.log(py))
        kl = np.where(chunk > 0, terms, 0.0).sum(1)  # 0 log 0 = 0 (and p > 0 implies p(y) > 0)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- precision / recall
def _sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[n, D] x [m, D] -> [n, m]`` (clipped at 0)."""
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.clip(d, 0, None)


def _knn_radii(x: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Squared distance from each row of ``x [n, D]`` to its k-th nearest other row ``[n]``."""
    if x.shape[0] <= k:
        raise ValueError(f"precision_recall needs more than k={k} samples per set, got {x.shape[0]}")
    out = np.empty(x.shape[0])
    for i in range(0, x.shape[0], chunk):
        d = _sq_dists(x[i:i + chunk], x)
        out[i:i + chunk] = np.partition(d, k, axis=1)[:, k]  # index 0 is the row itself (distance 0)
    return out


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3, chunk: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of features ``real [N, D]`` and
    ``fake [M, D]``.

    Each set's manifold is the union of balls around its points, each ball reaching the point's
    k-th nearest neighbour in the same set. Precision: the fraction of fake points inside the real
    manifold; recall: the fraction of real points inside the fake manifold. Distances are
    computed in blocks of ``chunk`` rows, so memory is O(chunk * max(N, M)) (80 MB for 10k x 10k).
    """
    r, f = _features(real, "real"), _features(fake, "fake")
    _same_dim(r, f)
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    rad_r, rad_f = _knn_radii(r, k, chunk), _knn_radii(f, k, chunk)
    fake_in_real = np.zeros(f.shape[0], dtype=bool)
    real_in_fake = np.zeros(r.shape[0], dtype=bool)
    for i in range(0, f.shape[0], chunk):
        d = _sq_dists(f[i:i + chunk], r)  # [chunk, N]
        fake_in_real[i:i + chunk] = (d <= rad_r[None, :]).any(1)
        real_in_fake |= (d <= rad_f[i:i + chunk, None]).any(0)
    return float(fake_in_real.mean()), float(real_in_fake.mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR in dB between image batches ``[N, C, H, W]`` in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp(min=1e-12)
    return float((10 * torch.log10(4.0 / mse)).mean())


def consistency_psnr(x: torch.Tensor, z0: torch.Tensor) -> float:
    """PSNR of ``downsample(x)`` (an SR stage's outputs ``[N, C, R, R]``, clipped to [-1, 1]) against the
    clean low-resolution inputs ``z0`` ``[N, C, r, r]`` they were conditioned on: a stage that follows
    its input scores high; one that ignores it scores like a random image of its class."""
    return psnr(downsample(x.detach().float().cpu().clamp(-1, 1), z0.shape[-1]), z0.detach().cpu())
