"""Memory levers: gradient accumulation trains what one pass trains, activation
checkpointing gives the same gradients from fewer saved activations, and an SR stage trains on
aligned random crops, then samples at full size."""

from __future__ import annotations

import copy

import pytest
import torch

import cdm.unet
from cdm.cascade import StagePlan, sample_stage
from cdm.checkpoint import load_checkpoint, load_stage
from cdm.config import ConfigError
from cdm.distributed import DistributedError, World
from cdm.flops import train_flops_per_image
from cdm.stage import Stage
from cdm.train import train_stage
from cdm.step import Batcher, accumulate_gradients, draw_step_noise, training_step_loss
from cdm.unet import UNet, UNetConfig

from conftest import tiny_config, toy_images


def sr_config(**train):
    """The tiny 4 -> 8 SR stage, label dropout and flips on, fp32."""
    cfg = tiny_config(resolution=8, lowres=4, aug="gaussian", classes=3, data_resolution=16, steps=50,
                      p_uncond=0.25, lr=3e-3, **train)
    cfg.data.flip = True
    return cfg


def train(tmp_path, name: str, steps: int, cfg=None, **train_kw):
    cfg = copy.deepcopy(cfg) if cfg is not None else sr_config(**train_kw)
    cfg.train.steps = steps
    return load_checkpoint(train_stage(cfg, tmp_path / name, progress=False, data=toy_images(16, 16)))


def assert_same_weights(a, b, exact: bool = False):
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 2e-5}  # as 2 processes against 1
    for k in a.model:
        torch.testing.assert_close(b.model[k], a.model[k], **tol)
        torch.testing.assert_close(b.ema[k], a.ema[k], **tol)


# ----------------------------------------------------------------------------- gradient accumulation
def test_grad_accum_trains_the_weights_one_pass_trains(tmp_path):
    """The batch's randomness is drawn once and split among the micro-batches: the same steps, the
    same data stream, the same weights up to float rounding; resuming mid-run is exact, and a run may
    resume with other memory levers (grad_accum, unet.checkpoint) and still train the same weights."""
    one = train(tmp_path, "one", 4)
    two = train(tmp_path, "two", 4, grad_accum=2)
    first = load_checkpoint(sorted((tmp_path / "one" / "checkpoints").glob("step-*"))[0])  # step 2 (ckpt_every)
    assert max((one.model[k] - first.model[k]).abs().max().item() for k in one.model) > 1e-3  # 100x the tolerance
    assert_same_weights(one, two)
    assert torch.equal(one.rng["data"], two.rng["data"])

    train(tmp_path, "resumed", 2, grad_accum=2)
    assert_same_weights(two, train(tmp_path, "resumed", 4, grad_accum=2), exact=True)

    train(tmp_path, "mixed", 2)
    more = sr_config(grad_accum=4)
    more.unet.checkpoint = True  # how the network runs, not what it is: the run directory accepts it
    assert_same_weights(one, train(tmp_path, "mixed", 4, cfg=more))


def test_micro_batches_of_each_rank_make_up_the_single_process_step():
    """Rows of 2 ranks x 2 micro-batches: the ranks' mean loss and gradient are one pass's."""
    cfg = sr_config()
    torch.manual_seed(0)
    stage, data = Stage(cfg), toy_images(16, 16)
    with torch.no_grad():  # zero-initialised output layers would leave most gradients at 0
        for p in stage.net.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def loss_and_grad(rank: int, size: int, micro: int):
        g = torch.Generator().manual_seed(5)
        batch = Batcher(data, cfg, g)(8, World(rank, size).part(8))
        stage.net.zero_grad()
        noise = draw_step_noise(stage, batch[0], batch[1], g, cfg.train.p_uncond, rank, size)
        loss = accumulate_gradients(stage, *batch, noise, micro)
        return loss, [p.grad.clone() for p in stage.net.parameters()], g.get_state()

    g = torch.Generator().manual_seed(5)
    stage.net.zero_grad()
    ref = training_step_loss(stage, *Batcher(data, cfg, g)(8), g, cfg.train.p_uncond)
    ref.backward()
    ref_grads = [p.grad.clone() for p in stage.net.parameters()]
    loss, grads, state = loss_and_grad(0, 1, 1)
    assert torch.equal(loss, ref.detach()) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert torch.equal(state, g.get_state())
    (l0, g0, s0), (l1, g1, s1) = loss_and_grad(0, 2, 2), loss_and_grad(1, 2, 2)
    torch.testing.assert_close((l0 + l1) / 2, loss)
    for a, b, full in zip(g0, g1, grads):
        torch.testing.assert_close((a + b) / 2, full, rtol=1e-4, atol=1e-6)
    assert torch.equal(s0, state) and torch.equal(s1, state)


def test_a_batch_that_the_processes_cannot_split_into_micro_batches_is_refused(tmp_path, monkeypatch):
    import contextlib

    import cdm.train

    monkeypatch.setattr(cdm.train, "world", lambda device: contextlib.nullcontext(World(rank=0, size=2)))
    cfg = sr_config(batch_size=6, grad_accum=2)  # 3 rows per process: not 2 micro-batches
    with pytest.raises(DistributedError, match=r"train.batch_size \(6\) must be divisible by train.grad_accum x "
                                               r"processes \(2 x 2\): set it to a multiple of 4"):
        train_stage(cfg, tmp_path / "run", progress=False, data=toy_images(16, 16))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"train.batch_size \(8\) must be divisible by train.grad_accum \(3\)"):
        sr_config(grad_accum=3)


# ----------------------------------------------------------------------------- activation checkpointing
def rich_unet(checkpoint: bool, dropout: float = 0.2) -> UNet:
    """A small SR network with attention at two levels, dropout, and no zero-initialised layer."""
    cfg = UNetConfig(resolution=16, base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=2,
                     attention_resolutions=[8, 4], head_channels=8, dropout=dropout, num_classes=3,
                     lowres_channels=1, aug_level_embedding=True, checkpoint=checkpoint)
    torch.manual_seed(0)
    net = UNet(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def inputs(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 1, 16, 16, generator=g), torch.rand(n, generator=g),
            {"label": torch.tensor([0, 1, 2, 3][:n]), "lowres": torch.randn(n, 1, 8, 8, generator=g),
             "aug_level": torch.rand(n, generator=g)})


def grads(net: UNet, seed: int, precision: str = "fp32") -> list[torch.Tensor]:
    x, t, kw = inputs()
    net.zero_grad()
    torch.manual_seed(seed)  # dropout's masks
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    with ctx:
        out = net(x, t, **kw)
    (out.float() ** 2).mean().backward()
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpointing_gives_the_same_gradients_with_dropout(precision, monkeypatch):
    calls = []
    real = cdm.unet.checkpoint
    monkeypatch.setattr(cdm.unet, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain, ckpt = grads(rich_unet(False), 7, precision), grads(rich_unet(True), 7, precision)
    assert len(calls) == 3 * 2 + 1 + 3 * 3  # encoder blocks (3 levels x 2), the middle, decoder blocks (3 x 3)
    for a, b in zip(plain, ckpt):  # (bit for bit on this CPU, in either precision)
        torch.testing.assert_close(b, a)
    other = grads(rich_unet(False), 8, precision)  # the test covers dropout: other masks, other gradients
    assert max((a - b).abs().max().item() for a, b in zip(plain, other)) > 1e-3


def test_checkpointing_only_while_training(monkeypatch):
    calls = []
    monkeypatch.setattr(cdm.unet, "checkpoint", lambda *a, **k: calls.append(1))
    net = rich_unet(True)
    x, t, kw = inputs()
    net.eval()(x, t, **kw)  # sampling
    with torch.no_grad():
        net.train()(x, t, **kw)  # training mode without gradients (e.g. a loss evaluation)
    assert calls == []


def saved_activation_bytes(net: UNet, monkeypatch) -> int:
    """Bytes of the activations a forward pass keeps for the backward pass: the tensors autograd saves
    (``saved_tensors_hooks``) outside checkpointed blocks, plus the inputs each checkpointed block
    keeps to recompute itself; each storage once, parameters not counted."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    kept: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t

    real = cdm.unet.checkpoint

    def counting_checkpoint(fn, *args, **kw):
        for a in args:
            if isinstance(a, torch.Tensor):
                keep(a)
        return real(fn, *args, **kw)

    monkeypatch.setattr(cdm.unet, "checkpoint", counting_checkpoint)
    x, t, kw = inputs()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = net(x, t, **kw)
    out.sum().backward()  # the graph is complete and runs
    return sum(kept.values())


def test_checkpointing_keeps_far_fewer_activations(monkeypatch):
    plain, ckpt = (saved_activation_bytes(rich_unet(c, dropout=0.0), monkeypatch) for c in (False, True))
    assert ckpt < 0.25 * plain, (ckpt, plain)  # 15% here


# ----------------------------------------------------------------------------- random crops for SR stages
def crop_config(crop: int = 8, **train):
    """A 4 -> 16 SR stage (resolution ratio 4) from 32px data, attention-free, trained on crops."""
    cfg = tiny_config(resolution=16, lowres=4, aug="gaussian", classes=3, data_resolution=32, steps=50, **train)
    cfg.unet.attention_resolutions, cfg.unet.mid_attention, cfg.train.crop = [], False, crop
    cfg.check()
    return cfg


def test_a_crop_is_the_same_window_of_the_image_and_of_its_lowres_input():
    """Both are made whole, exactly as without crops, then cut at a corner that is a multiple of the
    resolution ratio: a crop's low-res input is exactly the part of the whole low-res input (made
    with the anti-aliased bicubic downsample, not a local one) that covers the crop."""
    cfg, data = crop_config(), toy_images(16, 32)
    cfg.data.flip = True
    whole = copy.deepcopy(cfg)
    whole.train.crop = 0
    x0, z0, labels = Batcher(data, whole, torch.Generator().manual_seed(3))(16)
    x0c, z0c, labels_c = Batcher(data, cfg, torch.Generator().manual_seed(3))(16)
    assert x0c.shape == (16, 1, 8, 8) and z0c.shape == (16, 1, 2, 2) and torch.equal(labels, labels_c)
    corners = []
    for i in range(16):
        hits = [(r, c) for r in (0, 4, 8) for c in (0, 4, 8)
                if torch.equal(x0c[i], x0[i, :, r:r + 8, c:c + 8])
                and torch.equal(z0c[i], z0[i, :, r // 4:r // 4 + 2, c // 4:c // 4 + 2])]
        assert hits, i
        corners.append(hits[0])
    assert len(set(corners)) > 3  # each example its own corner

    # The ranks of a multi-process run cut their rows' crops from one global draw.
    g = torch.Generator().manual_seed(3)
    rows = Batcher(data, cfg, g)(16, World(1, 2).part(16))
    assert torch.equal(rows[0], x0c[8:]) and torch.equal(rows[1], z0c[8:])


def test_a_crop_trained_sr_stage_trains_on_crops_and_samples_at_full_size(tmp_path, monkeypatch):
    import cdm.step

    seen = []
    real = cdm.step.batch_loss
    monkeypatch.setattr(cdm.step, "batch_loss", lambda stage, x0, z0, *a: seen.append((x0.shape, z0.shape))
                        or real(stage, x0, z0, *a))
    cfg = crop_config()
    cfg.train.steps = cfg.train.sample_every = 2  # and one sample grid, at the end
    train_stage(cfg, tmp_path / "crop", progress=False, data=toy_images(16, 32))
    assert seen == [((8, 1, 8, 8), (8, 1, 2, 2))] * 2
    log = (tmp_path / "crop" / "log.jsonl").read_text()
    assert "consistency_psnr_db" in log  # its sample grid: full-size samples from whole low-res inputs
    stage = load_stage(tmp_path / "crop")
    x, _ = sample_stage(stage, 0, torch.tensor([0, 1]), [0, 1], StagePlan(steps=2, level=5),
                        lowres=torch.zeros(2, 1, 4, 4))
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()


def test_training_flops_count_the_crop_not_the_other_levers():
    cfg = crop_config()
    whole = copy.deepcopy(cfg)
    whole.train.crop = 0
    crop, full = train_flops_per_image(cfg), train_flops_per_image(whole)
    assert 0.25 <= crop / full < 0.27, crop / full  # a quarter of the pixels (the embeddings do not shrink)
    levers = copy.deepcopy(whole)
    levers.unet.checkpoint, levers.train.grad_accum = True, 2
    assert train_flops_per_image(levers) == full  # recomputation is not counted; accumulation changes nothing
