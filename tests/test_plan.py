"""The training plan (cdm.plan): parameters, FLOPs and the memory estimate's accounting, checked
analytically and against real tensors on tiny networks; the paper's configs and the folder preset
plan through the CLI without their data. How close the estimate comes to a measured peak is a
benchmark (benchmarks/memory.py --plan), not a test."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from cdm.cli import main
from cdm.config import ConfigError, load_stage_config
from cdm.data import DataConfig, DataError, load_dataset
from cdm.flops import train_flops_per_image
from cdm.plan import (CPU_RUNTIME_BYTES, WORKSPACE_FRACTION, format_plan, resolve_for_plan, saved_activation_bytes,
                      training_plan)
from cdm.stage import Stage
from cdm.step import training_step_loss

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.toml"))


def test_parameter_count_is_the_sum_of_numel():
    cfg = tiny_config(16, 8, "gaussian")
    torch.manual_seed(0)
    assert training_plan(cfg).params == sum(p.numel() for p in Stage(cfg).net.parameters())


def test_state_is_four_bytes_per_parameter_per_copy():
    """fp32 state = 4 bytes x params x (weights + gradients + 2 Adam moments + EMA + k profiles)."""
    k = 2
    plan = training_plan(tiny_config(8, ema_profiles=[0.05, 0.1][:k]))
    p, m = plan.params, plan.cpu
    assert (m.weights, m.gradients, m.optimizer, m.ema) == (4 * p, 4 * p, 8 * p, 4 * p * (1 + k))
    assert m.state == 4 * p * (1 + 1 + 2 + 1 + k) and plan.ema_copies == 1 + k
    assert m.total == m.state + CPU_RUNTIME_BYTES + m.activations + m.workspace
    # CUDA: no CPU runtime; AdamW's multi-tensor scratch (one copy of the parameters) counts when larger
    assert plan.cuda.optimizer_scratch == 4 * p and plan.cuda.runtime == 0
    # two processes: DDP's gradient buckets, and half the batch each
    two = training_plan(tiny_config(8, ema_profiles=[0.05, 0.1]), processes=2)
    assert two.cpu.ddp_buckets == 4 * p and two.batch_size == plan.batch_size // 2
    with pytest.raises(ConfigError, match="divide evenly"):
        training_plan(tiny_config(8), processes=3)  # batch 8


def test_fake_counts_match_real_tensors():
    """The plan runs on fake tensors; what it counts is what real tensors save, and the FLOPs
    are cdm.flops' on real tensors."""
    for precision in ("fp32", "bf16"):
        cfg = tiny_config(16, 8, "gaussian", precision=precision)
        torch.manual_seed(0)
        stage = Stage(copy.deepcopy(cfg))
        params = {id(p) for p in stage.net.parameters()}
        seen = {}

        def pack(t):
            if id(t) not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        g = torch.Generator().manual_seed(0)
        x0, z0 = torch.rand(3, 1, 16, 16) * 2 - 1, torch.rand(3, 1, 8, 8) * 2 - 1
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            training_step_loss(stage, x0, z0, torch.zeros(3, dtype=torch.long), g)
        # exact in fp32; under bf16 autocast the real CPU kernels save a few bytes more (0.2% here)
        assert saved_activation_bytes(cfg, 3) == pytest.approx(sum(seen.values()), rel=0 if precision == "fp32"
                                                               else 0.01), precision
    plan = training_plan(cfg)
    assert plan.flops_per_image == train_flops_per_image(cfg)


def test_estimate_is_linear_in_the_batch():
    plans = {b: training_plan(tiny_config(16, 8, "gaussian", batch_size=b)) for b in (2, 4, 8)}
    t = {b: p.cpu.total for b, p in plans.items()}
    assert abs((t[8] - t[4]) - 2 * (t[4] - t[2])) <= 2  # int rounding
    assert t[8] > t[4] > t[2]
    # and the saved activations really are linear: batch 5 is predicted from batches 1 and 2
    cfg = tiny_config(16, 8, "gaussian")
    one, two = saved_activation_bytes(cfg, 1), saved_activation_bytes(cfg, 2)
    assert saved_activation_bytes(cfg, 5) == one + 4 * (two - one)


def test_bf16_activations_are_about_half_of_fp32():
    f32, b16 = (training_plan(tiny_config(16, 8, "gaussian", precision=p)) for p in ("fp32", "bf16"))
    assert 0.45 <= b16.activation_bytes_per_image / f32.activation_bytes_per_image <= 0.6
    # the workspace is float32-sized in both (measured on the CPU); bf16's counts the elements it saves
    assert f32.cpu.workspace == pytest.approx(WORKSPACE_FRACTION * f32.activation_bytes_per_image * 8, rel=0.01)
    assert b16.cpu.workspace == pytest.approx(f32.cpu.workspace, rel=0.01)


def test_gpu_hours_and_the_report():
    plan = training_plan(tiny_config(8, batch_size=8))  # train.steps = 4
    assert plan.total_flops == plan.flops_per_image * 8 * 4
    assert plan.gpu_hours(100.0) == pytest.approx(plan.total_flops / 100e12 / 3600)
    text = format_plan(plan, gpu_tflops=100.0, measured_img_s=50.0)
    for want in ("parameters", "GFLOP per image", "CPU ", "CUDA ", "GPU-hours at 100 TFLOP/s", "50.0 img/s"):
        assert want in text, want


def test_plan_without_data_needs_channels_and_classes(tmp_path, toy_npz):
    cfg = load_stage_config("folder-sr32to64")  # folder not given: its channels suffice (unconditional)
    resolved, data, note = resolve_for_plan(cfg)
    assert data is None and resolved.unet.in_channels == 3 and resolved.unet.num_classes == 0 and not note
    # a class-conditional folder preset before its folder is named: planned with one class, and said so
    resolved, data, note = resolve_for_plan(load_stage_config("folder-base16"))
    assert data is None and resolved.unet.num_classes == 1 and "classes: unknown" in note
    missing = load_stage_config("fmnist-base8", ["data.source=npz", f"data.path={tmp_path}/none.npz"])
    with pytest.raises(DataError, match="data.classes"):
        resolve_for_plan(missing)
    # stated classes are checked against the data set when it is loaded
    with pytest.raises(DataError, match="data.classes = 7, but the data set has 3 classes"):
        load_dataset(DataConfig(source="npz", path=str(toy_npz), resolution=16, classes=7))
    assert load_dataset(DataConfig(source="npz", path=str(toy_npz), resolution=16, classes=3)).num_classes == 3


@pytest.mark.slow
@pytest.mark.parametrize("config,gpus", [(str(p), "64") for p in PAPER] + [("folder-sr32to64", "1")],
                         ids=[p.stem for p in PAPER] + ["folder-sr32to64"])
def test_dry_run_plans_without_data(config, gpus, tmp_path, capsys):
    assert main(["train", config, "--out", str(tmp_path / "run"), "--dry-run", "--gpus", gpus]) == 0
    out, err = capsys.readouterr()
    resolved = json.loads(out)  # stdout stays the resolved config alone
    assert resolved["unet"]["in_channels"] == 3 and not (tmp_path / "run").exists()
    for want in ("plan of", "parameters", "GFLOP per image", "peak memory", "GPU-hours"):
        assert want in err, want
    if gpus != "1":
        assert resolved["unet"]["num_classes"] == 1000 and "on 64 processes" in err


def test_paper_configs_are_the_papers_cascade():
    stages = [load_stage_config(str(p)) for p in PAPER]
    by_res = {c.resolution: c for c in stages}
    assert sorted(by_res) == [32, 64, 256]
    base, sr64, sr256 = by_res[32], by_res[64], by_res[256]
    assert (base.lowres_resolution, sr64.lowres_resolution, sr256.lowres_resolution) == (0, 32, 64)
    # truncated sampling needs the 32->64 augmentation to be the base's forward process
    assert (sr64.augment.kind, sr64.augment.schedule, sr64.augment.steps) == \
        ("gaussian", base.diffusion.schedule, base.diffusion.steps)
    assert (sr256.augment.kind, sr256.augment.sigma_min, sr256.augment.sigma_max, sr256.augment.p_blur) == \
        ("blur", 0.4, 0.6, 0.5)
    assert sr256.train.batch_size == 1024 and all(c.train.lr == 1e-4 for c in stages)


def test_measure_times_real_steps(tmp_path, toy_npz, capsys):
    from test_cli import write_tiny

    cfg = write_tiny(tmp_path, toy_npz, "base", 8, 0, "none")
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--measure", "2"]) == 0
    out, err = capsys.readouterr()
    assert "img/s per process" in err and json.loads(out)["name"] == "base"
    assert not (tmp_path / "run").exists()


def test_the_memory_levers_shrink_the_planned_activations():
    """Accumulation divides the batch per pass, checkpointing keeps fewer activations, and a
    crop-trained SR stage saves a crop's activations (tiny SR net, attention-free for crops)."""
    from cdm.plan import training_plan

    base = tiny_config(resolution=16, lowres=4, aug="gaussian", classes=3)
    base.unet.attention_resolutions, base.unet.mid_attention = [], False
    plain = training_plan(base)
    for key, value in (("train.grad_accum", 4), ("unet.checkpoint", True), ("train.crop", 8)):
        cfg = copy.deepcopy(base)
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
        lever = training_plan(cfg)
        assert lever.cpu.activations < 0.6 * plain.cpu.activations, key
        assert lever.params == plain.params


def test_a_plan_never_reads_the_images_of_its_data_set(tmp_path, monkeypatch):
    """A folder's classes come from its listing and its channels from image headers, an .npz's from
    its arrays' headers: no loader runs, so a plan answers in seconds for a data set of any size."""
    import numpy as np
    from PIL import Image

    import cdm.peek
    import cdm.plan

    for name, mode in (("cats", "RGB"), ("dogs", "L")):
        (tmp_path / "f" / name).mkdir(parents=True)
        Image.new(mode, (70, 70)).save(tmp_path / "f" / name / "0.png")
    np.savez(tmp_path / "a.npz", images=np.zeros((9, 16, 16, 3), np.uint8), labels=np.arange(9) % 4)
    for module in (cdm.plan, cdm.peek):
        monkeypatch.setattr(module, "load_dataset", lambda d: pytest.fail("the plan loaded the data set"))
    folder = load_stage_config("folder-base16", [f"data.path={tmp_path / 'f'}", "data.channels=0"])
    cfg, data, note = resolve_for_plan(folder)
    assert data is None and cfg.unet.in_channels == 3 and cfg.data.class_names == ["cats", "dogs"]
    assert "2 images listed" in note
    npz = load_stage_config("fmnist-base8", ["data.source=npz", f"data.path={tmp_path / 'a.npz'}",
                                             "data.resolution=16"])
    cfg, data, note = resolve_for_plan(npz)
    assert data is None and (cfg.unet.in_channels, cfg.unet.num_classes) == (3, 4) and "9 images listed" in note
