"""The same checks on every device this machine has: the CPU always, CUDA when present (skipped
otherwise, so the suite never needs a GPU). ``benchmarks/gpu_check.sh`` runs them on a GPU.

Each check compares the device against the CPU on the same weights and inputs: a network's
forward and backward pass, a short training run whose checkpoint samples on the CPU, and the
cascade's sampling, whose noise comes from per-sample seeds and so must agree across devices."""

from __future__ import annotations

import pytest
import torch

from cdm.cascade import Cascade, SamplingPlan
from cdm.checkpoint import load_stage
from cdm.stage import Stage, autocast
from cdm.train import train_stage
from cdm.step import training_step_loss

from conftest import tiny_config, toy_images

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="no CUDA device here"))]


@pytest.fixture(autouse=True)
def exact_matmuls():
    """fp32 matrix products in full precision on CUDA too (TF32 would blur the comparisons)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def sr_config(train_steps: int = 4, **train):
    cfg = tiny_config(resolution=8, lowres=4, aug="gaussian", classes=3, data_resolution=16, steps=50, **train)
    cfg.train.steps = train_steps
    return cfg


@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_backward_agree_with_the_cpu(device):
    torch.manual_seed(0)
    cpu = Stage(sr_config())
    dev = Stage(sr_config()).to(device)
    dev.net.load_state_dict(cpu.net.state_dict())
    x0, z0 = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 4, 4)
    labels = torch.tensor([0, 1, 2, 0])
    losses, grads = [], []
    for stage in (cpu, dev):
        g = torch.Generator().manual_seed(1)  # the step's draws come from a CPU generator on every device
        loss = training_step_loss(stage, x0.to(stage.device), z0.to(stage.device), labels.to(stage.device), g)
        stage.net.zero_grad()
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().cpu() for p in stage.net.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert torch.allclose(grads[1], grads[0], rtol=1e-3, atol=1e-5)
    with autocast(dev.device, "bf16"):  # bf16 autocast runs on the device and stays finite
        loss = training_step_loss(dev, x0.to(device), z0.to(device), labels.to(device), torch.Generator().manual_seed(1))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(losses[0], rel=0.05)


@pytest.mark.parametrize("device", DEVICES)
def test_a_run_trained_on_the_device_samples_on_the_cpu(device, tmp_path):
    # with its sample grid of outputs beside their (CPU-held) inputs, which once broke on CUDA only
    last = train_stage(sr_config(3, device=device, precision="bf16", sample_every=3), tmp_path / "run",
                       progress=False, data=toy_images(16, 16))
    stage = load_stage(last, "cpu")  # checkpoints hold CPU tensors, whatever trained them
    assert stage.step == 3 and all(torch.isfinite(p).all() for p in stage.net.parameters())
    assert (tmp_path / "run" / "samples" / "step-00000003.png").exists()


@pytest.mark.parametrize("device", DEVICES)
def test_cascade_samples_agree_with_the_cpu(device):
    torch.manual_seed(0)
    stages = [Stage(tiny_config(resolution=4, classes=3, steps=50)), Stage(sr_config())]
    for st in stages:  # a random-init network's last layer is zero: give it an output
        for p in st.net.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
    plan = SamplingPlan.uniform(2, steps=5, levels=[0, 10])
    labels, seeds = torch.tensor([0, 1, 2]), [5, 6, 7]
    out = [Cascade([st.to(d) for st in stages]).sample(labels, seeds, plan).images[-1] for d in ("cpu", device)]
    assert out[1].device.type == "cpu"  # the cascade hands its images back on the CPU
    assert torch.allclose(out[1], out[0], atol=1e-3)


def test_a_sample_grid_pairs_outputs_with_inputs_held_on_another_device():
    # the SR grid's inputs stay on the CPU while the outputs come from the GPU; the "meta" device
    # stands in for the GPU here, so the CPU suite catches a mix-up that once only a GPU showed
    from cdm.images import pair_with_inputs

    paired = pair_with_inputs(torch.zeros(3, 1, 8, 8, device="meta"), torch.zeros(3, 1, 4, 4))
    assert paired.shape == (6, 1, 8, 8) and paired.device.type == "meta"
