"""The reproduction report's diagnostics, on hand-made samples (no data set needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cdm.eval.ledger import save_samples

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from cdmrepro.report import _border_noise  # noqa: E402


def test_border_noise_is_the_fraction_of_bright_pixels_in_the_padding_border(tmp_path):
    x = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    x[0, 0, 0, :] = 255  # 32 border pixels of image 0
    x[0, 0, 1, 5] = 16  # not brighter than 16/255: black
    x[1, 0, 2:30, 2:30] = 255  # the central 28x28 is not border
    path = save_samples(tmp_path / "s.npz", x, torch.tensor([0, 1]))
    pad = {"fit": "pad", "resolution": 32}
    assert _border_noise(path, pad) == pytest.approx(32 / (2 * (32 * 32 - 28 * 28)))
    assert _border_noise(tmp_path / "missing.npz", pad) is None
    assert _border_noise(path, {"fit": "resize", "resolution": 32}) is None  # resized data have no border
    big = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)
    big[0, 0, 18:46, 18:46] = 255  # padded to 64: the 18-pixel border around the central 28x28 is black
    assert _border_noise(save_samples(tmp_path / "b.npz", big, torch.tensor([0])), pad) == 0.0
