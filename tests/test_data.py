"""Readers (IDX, image folder, npz), the anti-aliased resize, and their error messages."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch

from cdm.data import (DataConfig, DataError, FASHION_MNIST_DIR, downsample, fit_to, load_dataset, random_flip,
                      read_idx, to_float, to_uint8)
from conftest import write_idx


@pytest.fixture
def fake_fmnist(tmp_path):
    g = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", g.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz=False)
    return tmp_path


def test_fashion_mnist_reader(fake_fmnist):
    data = load_dataset(DataConfig(source="fashion-mnist", path=str(fake_fmnist), resolution=32, fit="pad"))
    assert data.images.shape == (12, 1, 32, 32) and data.images.dtype == torch.uint8
    assert data.images[:, :, :2].max() == 0  # padded border is black
    assert data.num_classes == 10 and data.labels.tolist() == [i % 10 for i in range(12)]
    test = load_dataset(DataConfig(source="fashion-mnist", path=str(fake_fmnist), split="test", resolution=28))
    assert test.images.shape == (5, 1, 28, 28)


def test_fashion_mnist_errors(fake_fmnist, tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(DataConfig(source="fashion-mnist", path=str(tmp_path / "nowhere")))
    f = fake_fmnist / "train-images-idx3-ubyte.gz"
    raw = gzip.open(f).read()
    gzip.open(f, "wb").write(raw[:-100])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset(DataConfig(source="fashion-mnist", path=str(fake_fmnist)))
    f.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read IDX"):
        load_dataset(DataConfig(source="fashion-mnist", path=str(fake_fmnist)))
    with pytest.raises(DataError, match="bad magic"):
        p = tmp_path / "x.idx"
        p.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
        read_idx(p)
    with pytest.raises(DataError, match="split"):
        load_dataset(DataConfig(source="fashion-mnist", path=str(fake_fmnist), split="val"))


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    data = load_dataset(DataConfig(limit=100))
    assert data.images.shape == (100, 1, 32, 32) and data.num_classes == 10


def test_image_folder(tmp_path):
    from PIL import Image

    for cls, color in (("cats", (200, 10, 10)), ("dogs", (10, 10, 200))):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), color).save(tmp_path / cls / f"{i}.png")
    Image.new("L", (20, 20), 128).save(tmp_path / "dogs" / "gray.jpg")  # grayscale among RGB
    (tmp_path / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image, ignored")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        data = load_dataset(DataConfig(source="folder", path=str(tmp_path), resolution=16, fit="resize",
                                                split="all"))
    assert data.images.shape == (7, 3, 16, 16)
    assert data.class_names == ["cats", "dogs"] and data.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert data.images[0, 0].float().mean() == pytest.approx(200, abs=2)
    gray = load_dataset(DataConfig(source="folder", path=str(tmp_path / "cats"), resolution=8, fit="resize",
                                   channels=1, split="all"))
    assert gray.images.shape == (3, 1, 8, 8) and gray.num_classes == 1
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no readable images"):
        load_dataset(DataConfig(source="folder", path=str(empty)))


def test_npz(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, images=np.zeros((4, 16, 16, 3), np.uint8), labels=np.array([0, 1, 1, 2]))
    data = load_dataset(DataConfig(source="npz", path=str(p), resolution=16, split="all"))
    assert data.images.shape == (4, 3, 16, 16) and data.num_classes == 3
    np.savez(p, images=np.zeros((4, 16, 16), np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_dataset(DataConfig(source="npz", path=str(p), resolution=16))
    np.savez(p, pictures=np.zeros((4, 16, 16), np.uint8))
    with pytest.raises(DataError, match="no 'images'"):
        load_dataset(DataConfig(source="npz", path=str(p), resolution=16))
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset(DataConfig(source="npz"))


def test_downsample_is_antialiased_and_exact_on_constants():
    x = torch.full((2, 3, 32, 32), 0.25)
    torch.testing.assert_close(downsample(x, 8), torch.full((2, 3, 8, 8), 0.25))
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2 * 2.0 - 1  # +-1 at the Nyquist frequency
    small = downsample(checker[None, None], 8)
    assert small.abs().max() < 0.05  # aliasing would leave a strong pattern
    assert downsample(x, 32) is x


def test_pixel_round_trip_and_fit():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(to_float(u)), u)
    assert fit_to(torch.zeros(1, 1, 28, 40, dtype=torch.uint8), 32, "pad").shape == (1, 1, 32, 32)
    assert fit_to(torch.zeros(1, 1, 64, 64, dtype=torch.uint8), 32, "pad").shape == (1, 1, 32, 32)


def test_random_flip():
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 2, 2).clone()
    x[:, :, :, 1] += 100
    y = random_flip(x, torch.Generator().manual_seed(0))
    flipped = y[:, 0, 0, 0] > 50
    assert 0 < flipped.sum() < 8
    torch.testing.assert_close(y[flipped], x[flipped].flip(-1))
