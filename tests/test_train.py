"""Training a stage: it learns, checkpoints round-trip, and resume is exact."""

from __future__ import annotations

import json

import pytest
import torch

from cdm.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, load_stage
from cdm.stage import Stage
from cdm.train import TrainingError, train_stage
from cdm.step import Batcher, training_step_loss

from conftest import tiny_config, toy_images


@pytest.mark.slow
def test_a_tiny_stage_overfits_a_few_images():
    torch.manual_seed(0)
    cfg = tiny_config(resolution=8, lowres=4, aug="gaussian", classes=3, data_resolution=16)
    stage = Stage(cfg)
    data = toy_images(8, 16)
    g = torch.Generator().manual_seed(0)
    batch = Batcher(data, cfg, g)(8)
    opt = torch.optim.AdamW(stage.net.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = training_step_loss(stage, *batch, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.6 * first, (first, last)


def make_cfg(train_steps: int, **train):
    cfg = tiny_config(resolution=8, lowres=4, aug="gaussian", classes=3, data_resolution=16, steps=50)
    cfg.train.steps = train_steps
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_run_directory_and_checkpoint_round_trip(tmp_path):
    data = toy_images(16, 16)
    last = train_stage(make_cfg(4, sample_every=2), tmp_path / "run", progress=False, data=data)
    run = tmp_path / "run"
    assert last == list_checkpoints(run)[-1][1] and last.name == "step-00000004.safetensors"
    assert len(list_checkpoints(run)) == 2  # keep_checkpoints
    assert (run / "samples" / "step-00000002.png").exists() and (run / "samples" / "step-00000004.png").exists()
    saved = json.loads((run / "config.json").read_text())
    assert saved["unet"]["lowres_channels"] == 1 and saved["unet"]["num_classes"] == 3
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    log = [r for r in lines if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["img_per_s"] > 0 for r in log)
    # Each sample grid of an SR stage logs how closely it follows its (real) inputs.
    grids = [r for r in lines if "samples" in r]
    assert [(r["step"], r["samples"]) for r in grids] == [(2, "samples/step-00000002.png"),
                                                         (4, "samples/step-00000004.png")]
    assert all(0 < r["consistency_psnr_db"] < r["copy_psnr_db"] < 100 for r in grids)  # untrained: far from copying
    from PIL import Image
    # 8px tiles (each input left of its output, 4 per class: 8 columns) enlarged to 64px, so a person can judge them
    assert Image.open(run / "samples" / "step-00000004.png").size == ((8 * 10 + 2) * 8, (3 * 10 + 2) * 8)

    # A loaded stage reproduces the EMA network's outputs exactly.
    ckpt = load_checkpoint(last)
    stage = load_stage(run)
    ref = Stage(ckpt.config)
    ref.net.load_state_dict(ckpt.ema)
    ref.net.eval()
    x, t, lo = torch.randn(2, 1, 8, 8), torch.tensor([3, 40]), torch.randn(2, 1, 4, 4)
    cond = stage.conditioning(torch.tensor([0, 2]), lo, torch.tensor([0.0, 10.0]), torch.randn(2, 1, 4, 4))
    torch.testing.assert_close(stage(x, t, cond), ref(x, t, cond))


def test_sample_every_zero_writes_no_grids(tmp_path):
    train_stage(make_cfg(3, sample_every=0), tmp_path / "run", progress=False, data=toy_images(16, 16))
    assert not (tmp_path / "run" / "samples").exists()
    assert not any("samples" in json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines())


def test_resume_is_exact(tmp_path):
    data = toy_images(16, 16)
    straight = train_stage(make_cfg(6), tmp_path / "a", progress=False, data=data)
    train_stage(make_cfg(3), tmp_path / "b", progress=False, data=data)
    resumed = train_stage(make_cfg(6), tmp_path / "b", progress=False, data=data)  # picks up at step 3
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a.step == b.step == 6
    for k in a.model:
        torch.testing.assert_close(a.model[k], b.model[k], rtol=0, atol=0)
        torch.testing.assert_close(a.ema[k], b.ema[k], rtol=0, atol=0)


def test_resume_refuses_a_different_stage(tmp_path):
    data = toy_images(16, 16)
    train_stage(make_cfg(2), tmp_path / "r", progress=False, data=data)
    other = make_cfg(4)
    other.unet.base_channels = 16
    with pytest.raises(CheckpointError, match="different stage.*unet"):
        train_stage(other, tmp_path / "r", progress=False, data=data)
    train_stage(other, tmp_path / "r", progress=False, data=data, fresh=True)  # --fresh starts over


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    data = toy_images(16, 16)
    cfg = make_cfg(4, lr=1e30, grad_clip=0.0)
    with pytest.raises(TrainingError, match="became (inf|nan) at step"):
        train_stage(cfg, tmp_path / "nan", progress=False, data=data)
    ok = list_checkpoints(tmp_path / "nan")
    for _, p in ok:  # whatever was written is a loadable, finite checkpoint
        assert all(torch.isfinite(v).all() for v in load_checkpoint(p).model.values())


def test_bf16_training_keeps_fp32_weights_and_follows_the_fp32_run(tmp_path):
    """bf16 autocast computes in bf16 but keeps float32 master weights and optimiser state; from the same
    initial weights and batches its losses are the fp32 run's to bf16's precision, its weights not bit
    for bit the fp32 run's (autocast did run)."""
    data = toy_images(16, 16)
    runs, losses = {}, {}
    for precision in ("bf16", "fp32"):
        run = tmp_path / precision
        train_stage(make_cfg(3, precision=precision, log_every=1), run, progress=False, data=data)
        runs[precision] = load_checkpoint(run)
        losses[precision] = [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                             if "loss" in r]
    a, b = runs["bf16"], runs["fp32"]
    assert a.step == b.step == 3 and len(losses["bf16"]) == len(losses["fp32"]) == 3
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in a.model.values())
    assert all(v.dtype == torch.float32 for state in a.optimizer["state"].values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
    assert any(not torch.equal(a.model[k], b.model[k]) for k in a.model)  # bf16 did compute: not an fp32 run
