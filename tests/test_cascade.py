"""Cascades of 1, 2 and 3 stages: shapes, modes, seeding and validation."""

from __future__ import annotations

import pytest
import torch

from cdm.cascade import Cascade, CascadeError, SamplingPlan, StagePlan
from cdm.stage import Stage

from conftest import tiny_config


def settings(levels, mode="non-truncated", steps=3):
    return SamplingPlan(mode=mode, stages=[StagePlan(steps=steps, level=s) for s in levels])


def chain(n_stages: int, classes: int, aug: str = "gaussian"):
    res = [4, 8, 16][:n_stages]
    stages = []
    stages.append(Stage(tiny_config(resolution=res[0], classes=classes, name="base")))
    for lo, hi in zip(res[:-1], res[1:]):
        stages.append(Stage(tiny_config(resolution=hi, lowres=lo, aug=aug, classes=classes, name=f"sr{hi}")))
    for st in stages:
        st.net.eval()
    return Cascade(stages)


@pytest.mark.parametrize("n_stages", [1, 2, 3])
@pytest.mark.parametrize("classes", [0, 3])
@pytest.mark.parametrize("mode", ["truncated", "non-truncated"])
def test_shapes(n_stages, classes, mode):
    c = chain(n_stages, classes)
    labels = torch.tensor([0, 1, 2, 0]) if classes else torch.zeros(4, dtype=torch.long)
    out = c.sample(labels, [0, 1, 2, 3], settings([0] + [20] * (n_stages - 1), mode))
    assert [tuple(im.shape) for im in out.images] == [(4, 1, r, r) for r in [4, 8, 16][:n_stages]]
    assert out.inputs[0] is None
    for i in range(1, n_stages):
        assert out.inputs[i].shape == out.images[i - 1].shape
    for im in out.images:
        assert im.min() >= -1 and im.max() <= 1


def test_truncated_hands_over_the_noisy_state():
    c = chain(2, 3)
    labels = torch.tensor([0, 1, 2])
    trunc = c.sample(labels, [5, 6, 7], settings([0, 60], "truncated"))
    non = c.sample(labels, [5, 6, 7], settings([0, 60], "non-truncated"))
    # truncated: the SR input is exactly the base's own reverse process stopped at s = 60 (z_s: noisy,
    # unclamped); non-truncated: the clean z0, the base's final sample
    z_s, _ = c.sample_stage(0, labels, [5, 6, 7], settings([0, 60], "truncated").stages[0], stop=60)
    torch.testing.assert_close(trunc.inputs[1], z_s)
    torch.testing.assert_close(non.inputs[1], non.images[0])
    assert not torch.allclose(trunc.inputs[1], non.inputs[1])
    # z_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps about the base's last estimate of x0: its noise has the
    # forward process's variance 1 - abar_s at s = 60 (48 values: within a factor of two)
    ab = c.stages[0].diffusion.abar(torch.tensor([60])).item()
    noise = trunc.inputs[1] - ab ** 0.5 * trunc.images[0]
    assert 0.5 * (1 - ab) < noise.pow(2).mean().item() < 2 * (1 - ab)
    # at s = 0 the two modes coincide exactly
    a = c.sample(labels, [5, 6, 7], settings([0, 0], "truncated"))
    b = c.sample(labels, [5, 6, 7], settings([0, 0], "non-truncated"))
    for x, y in zip(a.images, b.images):
        torch.testing.assert_close(x, y)


def test_a_sample_depends_on_its_seed_not_its_batch():
    c = chain(2, 3)
    full = c.sample(torch.tensor([0, 1, 2, 1]), [10, 11, 12, 13], settings([0, 30]))
    part = c.sample(torch.tensor([2, 1]), [12, 13], settings([0, 30]))
    torch.testing.assert_close(full.images[1][2:], part.images[1])


def test_validation_says_what_to_fix():
    base = Stage(tiny_config(resolution=4, name="base"))
    sr8 = Stage(tiny_config(resolution=8, lowres=4, aug="gaussian", name="sr8"))
    with pytest.raises(CascadeError, match="starts with a base stage"):
        Cascade([sr8])
    with pytest.raises(CascadeError, match="expects 8px inputs but the stage below makes 4px"):
        Cascade([base, Stage(tiny_config(resolution=16, lowres=8, aug="gaussian"))])
    with pytest.raises(CascadeError, match="3-channel inputs"):
        Cascade([base, Stage(tiny_config(resolution=8, lowres=4, aug="gaussian", channels=3))])
    with pytest.raises(CascadeError, match="only the first stage may be a base"):
        Cascade([base, Stage(tiny_config(resolution=8))])
    with pytest.raises(CascadeError, match="number of classes"):
        Cascade([base, Stage(tiny_config(resolution=8, lowres=4, classes=5))])
    other = Stage(tiny_config(resolution=8, lowres=4, aug="gaussian", aug_steps=50))
    c = Cascade([base, other])
    with pytest.raises(CascadeError, match="augment.steps=100"):
        c.validate("truncated")
    c.validate("non-truncated")  # fine: non-truncated needs no matching process
    with pytest.raises(CascadeError, match="needs Gaussian augmentation"):
        Cascade([base, Stage(tiny_config(resolution=8, lowres=4, aug="blur"))]).validate("truncated")
    good = Cascade([base, sr8])
    with pytest.raises(CascadeError, match=r"integer in \[0, 100\]"):
        good.sample(torch.tensor([0]), [0], settings([0, 101]))
    with pytest.raises(CascadeError, match=r"class labels must lie in \[0, 2\]"):
        good.sample(torch.tensor([7]), [0], settings([0, 10]))
    with pytest.raises(CascadeError, match="each of the 2 stages"):
        good.sample(torch.tensor([0]), [0], settings([0]))
