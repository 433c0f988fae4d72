"""Training-recipe options: Min-SNR-gamma weighting, the learning-rate schedules, the shifted
noise schedule and the SR stage's consistency PSNR, each against its closed form."""

from __future__ import annotations

import math

import pytest
import torch

from cdm.config import ConfigError, load_stage_config
from cdm.data import downsample
from cdm.diffusion import DiffusionConfig, GaussianDiffusion, alpha_bar_schedule
from cdm.metrics import consistency_psnr
from cdm.recipe import loss_weight, lr_factor


def test_min_snr_weight_at_known_snrs():
    snr = torch.tensor([0.5, 1.0, 5.0, 20.0], dtype=torch.float64)
    eps = loss_weight(snr, "eps", "min-snr", gamma=5.0)
    v = loss_weight(snr, "v", "min-snr", gamma=5.0)
    torch.testing.assert_close(eps, torch.tensor([1.0, 1.0, 1.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(v, torch.tensor([0.5 / 1.5, 0.5, 5 / 6, 5 / 21], dtype=torch.float64))
    assert torch.equal(loss_weight(snr, "v", "uniform"), torch.ones_like(snr))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_loss_is_min_snr_times_the_x0_error_for_either_target(prediction):
    """Whatever the network predicts, the weighted loss is min(SNR, gamma) * ||x0 - x0_hat||^2."""
    torch.manual_seed(0)
    d = GaussianDiffusion(DiffusionConfig(steps=1000, prediction=prediction))
    x0, eps = torch.randn(64, 1, 4, 4), torch.randn(64, 1, 4, 4)
    t = torch.randint(1, 1001, (64,))
    xt = d.q_sample(x0, t, eps)
    pred = d.target(x0, eps, t) + 0.3 * torch.randn_like(x0)  # an imperfect network output
    x0_hat, _ = d.predict_x0_eps(pred, xt, t)
    gamma = 5.0
    w = loss_weight(d.snr(t), prediction, "min-snr", gamma)
    loss = d.training_loss(pred, x0, xt, t, eps, weight=w)
    want = d.snr(t).clamp(max=gamma).float() * ((x0 - x0_hat) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-6)


def test_lr_schedules():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)  # warm-up
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    for kind in ("cosine", "linear"):
        assert lr_factor(10, 100, 10, kind) == pytest.approx(1.0)
        assert lr_factor(55, 100, 10, kind) == pytest.approx(0.5)  # halfway through the decay
        assert lr_factor(100, 100, 10, kind) == pytest.approx(0.0)
    assert lr_factor(32, 100, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))
    assert all(lr_factor(s, 100, 10, "constant") == 1.0 for s in range(10, 100))


def test_a_shifted_schedule_moves_log_snr_by_the_shift():
    base = alpha_bar_schedule("cosine", 1000)
    shifted = alpha_bar_schedule("cosine", 1000, logsnr_shift=1.5)
    assert shifted[0] == 1.0
    lsnr = lambda ab: torch.log(ab[1:-1]) - torch.log1p(-ab[1:-1])  # noqa: E731
    torch.testing.assert_close(lsnr(shifted) - lsnr(base), torch.full((999,), 1.5, dtype=torch.float64))
    assert torch.all(shifted[1:] > base[1:]) and shifted[-1] < 1e-6  # more signal, still pure noise at T
    torch.testing.assert_close(GaussianDiffusion(DiffusionConfig(logsnr_shift=0.0)).alpha_bar, base)


def test_consistency_psnr_is_the_psnr_of_the_downsampled_output():
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    z0 = downsample(x, 8)
    assert consistency_psnr(x, z0) > 100  # follows its input exactly
    flat = torch.zeros(4, 1, 32, 32)  # ignores it: the PSNR of z0 against 0, per image, averaged
    want = (10 * torch.log10(4 / (z0 ** 2).flatten(1).mean(1))).mean()
    assert consistency_psnr(flat, z0) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("override, words", [
    ("train.lr_schedule=step", "cosine"), ("train.loss_weight=snr", "min-snr"),
    ("train.adam_betas=0.9", "two numbers"), ("train.ema_sigma_rel=0.5", "0.289"),
    ("train.ema_profiles=0,0.1", "> 0"), ("train.min_snr_gamma=0", "> 0"),
])
def test_bad_recipe_keys_are_refused_with_the_valid_choices(override, words):
    with pytest.raises(ConfigError, match=words):
        load_stage_config("fmnist-sr8to32", [override])

