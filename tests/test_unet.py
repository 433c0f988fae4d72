"""Network shapes and input checks."""

from __future__ import annotations

import pytest
import torch

from cdm.unet import UNet, UNetConfig


@pytest.mark.parametrize("lowres,classes,learn_sigma,channels", [(0, 0, False, 1), (0, 5, True, 3), (8, 5, False, 3)])
def test_output_shape(lowres, classes, learn_sigma, channels):
    cfg = UNetConfig(resolution=16, in_channels=channels, base_channels=8, channel_mult=[1, 2, 2], num_res_blocks=1,
                     attention_resolutions=[8], head_channels=8, num_classes=classes,
                     lowres_channels=channels if lowres else 0, aug_level_embedding=bool(lowres),
                     learn_sigma=learn_sigma, dropout=0.1)
    net = UNet(cfg)
    x = torch.randn(3, channels, 16, 16)
    kw = {}
    if classes:
        kw["label"] = torch.tensor([0, classes - 1, classes])  # the last one is "no class"
    if lowres:
        kw["lowres"] = torch.randn(3, channels, lowres, lowres)
        kw["aug_level"] = torch.rand(3)
    out = net(x, torch.rand(3), **kw)
    assert out.shape == (3, channels * (2 if learn_sigma else 1), 16, 16)


def test_upsample_once_equals_upsample_inside():
    cfg = UNetConfig(resolution=8, base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[],
                     lowres_channels=1, lowres_upsample="bicubic")
    net = UNet(cfg).eval()
    torch.nn.init.normal_(net.out[-1].weight)  # the output conv starts at zero
    x, lo, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 4, 4), torch.rand(2)
    torch.testing.assert_close(net(x, t, lowres=lo), net(x, t, lowres_up=net.upsample_lowres(lo)))


def test_bad_inputs_are_explained():
    net = UNet(UNetConfig(resolution=8, base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                          attention_resolutions=[], num_classes=3, lowres_channels=1))
    x, t, lo = torch.randn(2, 1, 8, 8), torch.rand(2), torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\]"):
        net(x, t, label=torch.tensor([0, 4]), lowres=lo)
    with pytest.raises(ValueError, match="pass label"):
        net(x, t, lowres=lo)
    with pytest.raises(ValueError, match="pass lowres"):
        net(x, t, label=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="2 channels"):
        net(x, t, label=torch.tensor([0, 1]), lowres=torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"x must be \[N, 1, 8, 8\]"):
        net(torch.randn(2, 1, 16, 16), t, label=torch.tensor([0, 1]), lowres=lo)
    with pytest.raises(ValueError, match="not divisible"):
        UNetConfig(resolution=12, channel_mult=[1, 2, 2, 2])


def test_condition_embedding_once_equals_inside():
    cfg = UNetConfig(resolution=8, base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[],
                     num_classes=3, lowres_channels=1, aug_level_embedding=True)
    net = UNet(cfg).eval()
    torch.nn.init.normal_(net.out[-1].weight)
    x, lo, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 4, 4), torch.rand(2)
    label, level = torch.tensor([0, 3]), torch.tensor([0.0, 0.3])
    emb = net.embed_condition(label, level)
    assert emb.shape == (2, 32)
    torch.testing.assert_close(net(x, t, label=label, lowres=lo, aug_level=level),
                               net(x, t, lowres=lo, cond_emb=emb))
    with pytest.raises(ValueError, match="either cond_emb or label"):
        net(x, t, label=label, lowres=lo, cond_emb=emb)


def test_sampling_embeds_class_and_level_once_per_sample():
    """The class and level embeddings do not depend on t: a 6-step SR sampling run computes them
    once, the time embedding six times."""
    from cdm.cascade import StagePlan, sample_stage
    from conftest import tiny_stage

    stage = tiny_stage(resolution=8, lowres=4, aug="gaussian")
    calls = {"label": 0, "level": 0, "time": 0}
    for name, mod in (("label", stage.net.label_embed), ("level", stage.net.level_embed), ("time", stage.net.time_embed)):
        mod.register_forward_hook(lambda *_, k=name: calls.__setitem__(k, calls[k] + 1))
    sample_stage(stage, 1, torch.tensor([0, 1]), [0, 1], StagePlan(steps=6, level=10, sampler="ddim"),
                 lowres=torch.zeros(2, 1, 4, 4))
    assert calls == {"label": 1, "level": 1, "time": 6}
