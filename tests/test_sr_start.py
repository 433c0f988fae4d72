"""StagePlan.start: an SR stage that starts its reverse process at t = start * T from its
upsampled input, noised by the forward process (CCDF), instead of from pure noise at T."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cdm.cascade import Cascade, CascadeError, SamplingPlan, StagePlan, sample_stage
from cdm.diffusion import time_grid

from conftest import tiny_stage


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "logsnr", "edm"])
def test_a_grid_that_starts_lower_is_the_grid_of_the_shorter_process(spacing):
    ab = torch.cos(torch.linspace(0, 1, 101, dtype=torch.float64) * torch.pi / 2 * 0.99) ** 2
    assert time_grid(100, 6, spacing=spacing, alpha_bar=ab, start=100) == time_grid(100, 6, spacing=spacing,
                                                                                       alpha_bar=ab)
    g = time_grid(100, 6, spacing=spacing, alpha_bar=ab, start=40)
    assert g[0] == 40 and g[-1] == 0 and len(g) == 7 and all(a > b for a, b in zip(g, g[1:]))
    with pytest.raises(ValueError, match="start"):
        time_grid(100, 6, alpha_bar=ab, start=101)


def test_start_one_is_the_plain_sampler_and_a_low_start_returns_the_upsampled_input():
    sr = tiny_stage(resolution=8, lowres=4, aug="gaussian")
    sr.net.eval()
    lowres = torch.rand(3, 1, 4, 4) * 2 - 1
    labels, seeds = torch.tensor([0, 1, 2]), [5, 6, 7]
    plan = StagePlan(steps=4, sampler="ddim", level=0)
    plain = sample_stage(sr, 1, labels, seeds, plan, lowres=lowres)[0]
    assert torch.equal(sample_stage(sr, 1, labels, seeds, replace(plan, start=1.0), lowres=lowres)[0], plain)
    # started at t = 1 (nearly clean), one step leaves what it was started from: the upsampled input
    low = sample_stage(sr, 1, labels, seeds, replace(plan, start=0.01), lowres=lowres)[0]
    up = sr.module.upsample_lowres(lowres, 8)
    assert (low - up).abs().max() < 0.1 < 0.5 < (plain - up).abs().max()  # sigma_1 ~ 0.03 here
    mid = sample_stage(sr, 1, labels, seeds, replace(plan, start=0.5), lowres=lowres)[0]
    assert torch.isfinite(mid).all() and not torch.equal(mid, plain)


def test_start_is_refused_where_it_has_no_input_to_start_from():
    base, sr = tiny_stage(resolution=4, name="base"), tiny_stage(resolution=8, lowres=4, aug="gaussian")
    labels, seeds = torch.tensor([0, 1]), [0, 1]
    with pytest.raises(CascadeError, match="base stage"):
        sample_stage(base, 0, labels, seeds, StagePlan(steps=2, start=0.5))
    with pytest.raises(CascadeError, match="non-truncated"):
        sample_stage(sr, 1, labels, seeds, StagePlan(steps=2, start=0.5), lowres=torch.zeros(2, 1, 4, 4),
                     corrupt=False)
    with pytest.raises(CascadeError, match="start must be a fraction"):
        StagePlan(start=0).check()
    plan = SamplingPlan.uniform(2, steps=2)
    assert [st.start for st in plan.override(start=[1, 0.4]).stages] == [1, 0.4]
    with pytest.raises(CascadeError, match="start needs 2 values"):
        plan.override(start=[0.4])
    out = Cascade([base, sr]).sample(labels, seeds, plan.override(start=[1, 0.4], levels=[0, 10]))
    assert out.images[-1].shape == (2, 1, 8, 8)
