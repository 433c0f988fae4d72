"""The metrics pinned to closed forms: Gaussians with known Frechet distance, KID's
unbiasedness, the Inception Score's extremes and hand-computed precision/recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdm.metrics import (feature_stats, fid_bootstrap_se, frechet_distance, inception_score, kid,
                         polynomial_mmd2, precision_recall)


def random_cov(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


# ----------------------------------------------------------------------------- Frechet distance
def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)


def test_frechet_distance_matches_eigenvalues_of_s1_s2():
    # Tr((S1 S2)^(1/2)) = sum of square roots of the (real, non-negative) eigenvalues of S1 S2.
    rng = np.random.default_rng(1)
    s1, s2 = random_cov(8, rng), random_cov(8, rng)
    mu = rng.standard_normal(8)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    want = (mu ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu, s1, np.zeros(8), s2) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("rank", [12, 3])
def test_frechet_distance_of_scaled_covariance_even_singular(rank):
    # S2 = c S1 commutes with S1: FD = (1 - sqrt c)^2 Tr S1, whatever S1's rank.
    rng = np.random.default_rng(2)
    s1 = random_cov(12, rng, rank)
    got = frechet_distance(np.zeros(12), s1, np.zeros(12), 4.0 * s1)
    assert got == pytest.approx(np.trace(s1), rel=1e-8)
    assert frechet_distance(np.zeros(12), s1, np.zeros(12), s1) == pytest.approx(0, abs=1e-10)


def test_fid_of_a_set_with_itself_is_zero_even_with_fewer_samples_than_dims():
    x = np.random.default_rng(3).standard_normal((10, 32))  # covariance of rank 9 in 32 dims
    mu, sigma = feature_stats(x)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)


def test_feature_stats_are_mean_and_unbiased_covariance_and_converge_to_the_gaussian():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((7, 3))
    mu, sigma = feature_stats(torch.from_numpy(x).float())  # torch input works too
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-5, atol=1e-6)

    mu1, a = np.array([1.0, -2.0, 0.5, 0.0]), np.array([0.5, 1.0, 2.0, 4.0])
    mu2, b = np.array([0.0, -1.0, 0.5, 2.0]), np.array([1.0, 1.0, 0.25, 1.0])
    n = 200_000
    s1 = feature_stats(mu1 + np.sqrt(a) * rng.standard_normal((n, 4)))
    s2 = feature_stats(mu2 + np.sqrt(b) * rng.standard_normal((n, 4)))
    exact = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert frechet_distance(*s1, *s2) == pytest.approx(exact, rel=0.01)
    assert frechet_distance(*s1, mu1, np.diag(a)) < 1e-3


def test_frechet_distance_checks_shapes():
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_fid_bootstrap_se_matches_the_spread_over_independent_sets():
    # Generated features N(0.3, 1.3^2 I) against the reference N(0, I): the bootstrap SE from one
    # set of N should match the standard deviation of the FID over many independent sets of N.
    rng = np.random.default_rng(0)
    d, n = 8, 300
    mu_ref, s_ref = np.zeros(d), np.eye(d)
    draws = [0.3 + 1.3 * rng.standard_normal((n, d)) for _ in range(200)]
    spread = np.std([frechet_distance(*feature_stats(x), mu_ref, s_ref) for x in draws])
    se = np.mean([fid_bootstrap_se(x, mu_ref, s_ref, num_resamples=50, seed=1) for x in draws[:10]])
    assert se == pytest.approx(spread, rel=0.25)


def test_fid_bootstrap_se_is_zero_for_identical_rows_seeded_and_checked():
    x = np.ones((20, 3))
    assert fid_bootstrap_se(x, np.zeros(3), np.eye(3)) == pytest.approx(0.0, abs=1e-12)
    y = np.random.default_rng(2).standard_normal((40, 3))
    assert fid_bootstrap_se(y, np.zeros(3), np.eye(3), seed=5) == fid_bootstrap_se(y, np.zeros(3), np.eye(3), seed=5)
    with pytest.raises(ValueError, match="num_resamples"):
        fid_bootstrap_se(y, np.zeros(3), np.eye(3), num_resamples=1)
    with pytest.raises(ValueError, match="do not match"):
        fid_bootstrap_se(y, np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------- KID
def test_polynomial_mmd2_matches_the_definition():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((4, 3)) + 0.3
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / 20
    assert polynomial_mmd2(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_unbiased_where_the_biased_estimate_is_positive():
    rng = np.random.default_rng(6)
    unbiased, biased = [], []
    for _ in range(300):  # fresh, independent samples of one distribution each time
        x, y = rng.standard_normal((20, 8)), rng.standard_normal((20, 8))
        unbiased.append(polynomial_mmd2(x, y))
        biased.append(polynomial_mmd2(x, y, unbiased=False))
    unbiased, biased = np.array(unbiased), np.array(biased)
    se = unbiased.std() / np.sqrt(len(unbiased))
    assert abs(unbiased.mean()) < 3 * se  # expectation 0 ...
    assert (unbiased < 0).any()  # ... so single estimates go negative
    assert (biased > 0).all() and biased.mean() > 20 * se  # the biased one is always positive


def test_kid_grows_with_a_mean_shift_and_clips_the_subset_size():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((60, 8))
    kids = [kid(a, rng.standard_normal((60, 8)) + shift, num_subsets=20, subset_size=1000)[0]
            for shift in (0.0, 0.3, 1.0)]
    assert abs(kids[0]) < kids[1] < kids[2]
    # With subsets clipped to all 60 rows, every subset is a permutation of the whole sets.
    b = rng.standard_normal((60, 8))
    mean, std = kid(a, b, num_subsets=3)
    assert mean == pytest.approx(polynomial_mmd2(a, b), rel=1e-10) and std < 1e-12
    assert kid(a, b, num_subsets=5, subset_size=30, seed=1) == kid(a, b, num_subsets=5, subset_size=30, seed=1)


# ----------------------------------------------------------------------------- Inception Score
def test_inception_score_extremes():
    k = 10
    one_hot = np.tile(np.eye(k), (10, 1))  # each of the 10 splits holds every class once
    assert inception_score(one_hot, splits=10) == pytest.approx((k, 0.0))
    assert inception_score(np.tile(np.eye(k)[:5], (10, 1)), splits=10)[0] == pytest.approx(5)  # 5 classes used
    constant = np.tile(np.random.default_rng(8).dirichlet(np.ones(k)), (100, 1))
    assert inception_score(constant)[0] == pytest.approx(1.0)
    assert inception_score(np.full((50, k), 1 / k), splits=5)[0] == pytest.approx(1.0)


def test_inception_score_rejects_logits():
    with pytest.raises(ValueError, match="softmax"):
        inception_score(np.random.default_rng(9).standard_normal((20, 4)))


# ----------------------------------------------------------------------------- precision / recall
def test_precision_recall_identical_and_far_apart():
    x = np.random.default_rng(10).standard_normal((50, 16))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 1e3) == (0.0, 0.0)
    half = np.concatenate([x[:25], x[25:] + 1e3])
    assert precision_recall(x, half)[0] == 0.5  # copies lie in the real manifold, far points do not


def test_precision_recall_hand_computed_and_chunk_independent():
    # k = 1: real radii are all 1; fake radii are 0.5 (left cluster) and 1 (right cluster).
    real = np.array([0, 1, 2, 3, 4, 5], dtype=float)[:, None]
    fake = np.array([0, 0.5, 1, 100, 101, 102], dtype=float)[:, None]
    assert precision_recall(real, fake, k=1) == (0.5, pytest.approx(2 / 6))
    rng = np.random.default_rng(11)
    r, f = rng.standard_normal((40, 5)), rng.standard_normal((30, 5)) + 0.5
    assert precision_recall(r, f, chunk=7) == precision_recall(r, f, chunk=1000)
