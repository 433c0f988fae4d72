"""Multi-process training: the global-batch split is exact, and 2 CPU processes under torchrun
(gloo, loopback) train the same weights as one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from cdm.checkpoint import list_checkpoints, load_checkpoint
from cdm.cli import main
from cdm.distributed import DistributedError, World, pick_device
from cdm.stage import Stage
from cdm.step import Batcher, training_step_loss

from conftest import tiny_config, toy_images
from test_cli import write_tiny


@pytest.fixture
def one_thread():
    """Tiny networks train far faster on one thread on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_world_parts_and_devices():
    assert World().part(8) == slice(0, 8) and World(rank=2, size=4).part(8) == slice(4, 6)
    with pytest.raises(DistributedError, match="multiple of 3"):
        World(rank=0, size=3).part(8)
    assert pick_device("cpu", 1) == torch.device("cpu")
    if torch.cuda.device_count() >= 4:
        assert pick_device("cuda", 3) == torch.device("cuda", 3)  # a bare "cuda" is this process's local GPU
        assert pick_device("cuda:1", 3) == torch.device("cuda", 1)
    elif not torch.cuda.is_available():  # asking for a GPU that is not there is a clear error, not a crash later
        with pytest.raises(DistributedError, match="no CUDA.*--device auto"):
            pick_device("cuda", 3)
    with pytest.raises(DistributedError, match="unknown device 'gpu0'"):
        pick_device("gpu0")
    assert pick_device("auto", 0) == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def test_the_ranks_slices_make_up_the_single_process_step(one_thread):
    """Each rank draws the global batch's randomness and keeps its slice: the mean of the ranks'
    losses and gradients is the single-process loss and gradient, and every generator ends alike."""
    cfg = tiny_config(resolution=8, lowres=4, aug="gaussian", data_resolution=16, steps=50, p_uncond=0.3)
    cfg.data.flip = True
    torch.manual_seed(0)
    stage, data = Stage(cfg), toy_images(16, 16)

    def loss_and_grad(rank: int, size: int):
        g = torch.Generator().manual_seed(5)
        batch = Batcher(data, cfg, g)(8, World(rank, size).part(8))
        stage.net.zero_grad()
        loss = training_step_loss(stage, *batch, g, cfg.train.p_uncond, rank, size)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in stage.net.parameters()], g.get_state()

    loss, grads, g_state = loss_and_grad(0, 1)
    (l0, g0, s0), (l1, g1, s1) = loss_and_grad(0, 2), loss_and_grad(1, 2)
    assert not torch.isclose(l0, l1)  # the ranks saw different examples
    torch.testing.assert_close((l0 + l1) / 2, loss)
    for a, b, full in zip(g0, g1, grads):
        torch.testing.assert_close((a + b) / 2, full, rtol=1e-4, atol=1e-6)
    assert torch.equal(s0, g_state) and torch.equal(s1, g_state)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_train_what_one_process_does(tmp_path, toy_npz, one_thread):
    """... in two micro-batches each (train.grad_accum, DDP's no_sync before the last one) and with
    activation checkpointing (unet.checkpoint), against one process in one pass without it."""
    cfg = write_tiny(tmp_path, toy_npz, "sr", 16, 8, "gaussian")
    sets = [f"--set={kv}" for kv in ("train.steps=2", "train.ckpt_every=1", "train.warmup_steps=0", "train.lr=3e-3",
                                     "train.p_uncond=0.25", "data.flip=true", "train.batch_size=4",
                                     "train.log_every=1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "cdm.cli", "train", str(cfg),
                        "--out", str(tmp_path / "ddp"), "--no-progress", *sets, "--set=train.grad_accum=2",
                        "--set=unet.checkpoint=true"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(["train", str(cfg), "--out", str(tmp_path / "one"), "--no-progress", *sets]) == 0

    # rank 0 alone wrote the log and the checkpoints
    log = [r for r in map(json.loads, (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [rec["step"] for rec in log] == [1, 2]
    assert [s for s, _ in list_checkpoints(tmp_path / "ddp")] == [1, 2]
    one_log = [r for r in map(json.loads, (tmp_path / "one" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [rec["loss"] for rec in log] == pytest.approx([rec["loss"] for rec in one_log], rel=1e-5)

    a1, a, b = (load_checkpoint(list_checkpoints(tmp_path / "one")[0][1]), load_checkpoint(tmp_path / "one"),
                load_checkpoint(tmp_path / "ddp"))
    moved = max((a.model[k] - a1.model[k]).abs().max().item() for k in a.model)
    assert moved > 1e-3  # a step moves weights by ~lr (Adam), 100x the tolerance below
    for k in a.model:
        torch.testing.assert_close(b.model[k], a.model[k], rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(b.ema[k], a.ema[k], rtol=1e-4, atol=2e-5)
    assert torch.equal(a.rng["data"], b.rng["data"])  # the global data stream is where it would be

    # The checkpoint holds the global state: the 2-process run resumes on 1 process.
    more = [s.replace("train.steps=2", "train.steps=4") for s in sets]
    for run in ("ddp", "one"):
        assert main(["train", str(cfg), "--out", str(tmp_path / run), "--no-progress", *more]) == 0
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "ddp")
    assert a.step == b.step == 4
    for k in a.model:
        torch.testing.assert_close(b.model[k], a.model[k], rtol=1e-4, atol=2e-5)
