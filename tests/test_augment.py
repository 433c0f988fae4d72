"""Conditioning augmentation: identities, ranges, and one shared path for training and sampling."""

from __future__ import annotations

import pytest
import torch

from cdm.augment import AugmentConfig, ConditioningAugmentation, gaussian_blur3x3
from cdm.step import training_step_loss

from conftest import tiny_stage


@pytest.mark.parametrize("kind", ["none", "gaussian", "blur"])
def test_level_zero_is_identity(kind):
    aug = ConditioningAugmentation(AugmentConfig(kind=kind, steps=100, s_max=50))
    z = torch.rand(4, 3, 8, 8) * 2 - 1
    out = aug.apply(z, torch.zeros(4), noise=torch.randn_like(z))
    torch.testing.assert_close(out, z)


def test_gaussian_is_the_forward_process():
    aug = ConditioningAugmentation(AugmentConfig(kind="gaussian", schedule="linear", steps=200, s_max=200))
    z, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    s = torch.tensor([0.0, 17.0, 200.0])
    ab = aug.process.alpha_bar[s.long()].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(aug.apply(z, s, noise), ab.sqrt() * z + (1 - ab).sqrt() * noise)
    torch.testing.assert_close(aug.network_level(s), s / 200)


def test_training_levels_follow_the_config():
    aug = ConditioningAugmentation(AugmentConfig(kind="gaussian", steps=1000, s_max=300, p_zero=0.25))
    s = aug.draw_levels(20000, torch.Generator().manual_seed(0))
    assert s.min() == 0 and s.max() <= 300 and (s == s.round()).all()
    assert (s == 0).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert s[s > 0].mean().item() == pytest.approx(150.5, rel=0.03)

    blur = ConditioningAugmentation(AugmentConfig(kind="blur", sigma_min=0.4, sigma_max=0.6, p_blur=0.5))
    sig = blur.draw_levels(20000, torch.Generator().manual_seed(0))
    on = sig > 0
    assert on.float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert sig[on].min() >= 0.4 and sig[on].max() <= 0.6


def test_blur_kernel_preserves_constants_and_smooths():
    x = torch.full((2, 1, 6, 6), 0.3)
    torch.testing.assert_close(gaussian_blur3x3(x, torch.tensor([0.5, 0.6])), x)
    spike = torch.zeros(1, 1, 5, 5)
    spike[0, 0, 2, 2] = 1.0
    y = gaussian_blur3x3(spike, torch.tensor([0.5]))
    assert y.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert 0 < y[0, 0, 2, 2] < 1 and y[0, 0, 1, 2] > 0 and y[0, 0, 0, 0] == 0


def test_inference_levels_are_checked():
    g = ConditioningAugmentation(AugmentConfig(kind="gaussian", steps=100, s_max=50))
    assert g.inference_levels(3, 80).tolist() == [80.0] * 3  # any s in [0, T], not only <= s_max
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        g.inference_levels(3, 101)
    b = ConditioningAugmentation(AugmentConfig(kind="blur"))
    assert b.inference_levels(2, 0).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="pass 0"):
        b.inference_levels(2, 5)


@pytest.mark.parametrize("kind", ["gaussian", "blur", "none"])
def test_training_and_sampling_share_the_conditioning_path(kind, monkeypatch):
    """Capture the network inputs of a training step, then build the sampling-time conditioning
    for the same z0, levels and noise: they must be identical."""
    stage = tiny_stage(resolution=8, lowres=4, aug=kind, classes=3)
    x0, z0 = torch.rand(5, 1, 8, 8) * 2 - 1, torch.rand(5, 1, 4, 4) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0, 1])
    seen = {}
    real_forward = stage.net.forward

    def spy(x, t, **cond):
        seen.update(cond)
        return real_forward(x, t, **cond)

    monkeypatch.setattr(stage.net, "forward", spy)
    g = torch.Generator().manual_seed(3)
    training_step_loss(stage, x0, z0, labels, g)
    # Replay the generator to recover the levels and noise the training step drew.
    g = torch.Generator().manual_seed(3)
    levels = stage.augmentation.draw_levels(5, g)
    noise = torch.randn(z0.shape, generator=g)
    cond = stage.conditioning(labels, z0, levels, noise, corrupt=True)  # what Cascade.sample calls
    assert set(cond) == set(seen)
    for k in cond:
        if cond[k] is None:
            assert seen[k] is None
        else:
            torch.testing.assert_close(seen[k], cond[k])
