"""Progressive distillation (cdm.distill): the target identity, the nested grids, that a round
teaches the student the teacher's two steps, and the checkpoints, resume and CLI around it."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from cdm.cascade import Cascade, SamplingPlan, StagePlan
from cdm.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_stage, save_checkpoint
from cdm.cli import main
from cdm.config import ConfigError
from cdm.diffusion import DiffusionConfig, GaussianDiffusion
from cdm.distill import (RECORD, DistillConfig, ddim_step, distill_loss, distill_stage, distill_target, grids,
                         round_dir, sampling_plan, step_times)
from cdm.samplers import ddim
from cdm.stage import Stage
from cdm.step import Batcher, draw_step_noise

from conftest import tiny_config, toy_images


def _teacher(tmp_path, data_path: str = "unused.npz", name: str = "teacher.safetensors", std: float = 0.03):
    """An SR 4->8 v-prediction stage with Gaussian augmentation, whose output layer is random (a
    fresh U-Net's is zero, which would make every teacher trivial) and small (so that its x0
    estimates mostly lie in [-1, 1], as a trained stage's do), saved as a checkpoint."""
    cfg = tiny_config(resolution=8, lowres=4, aug="gaussian", prediction="v", steps=100)
    cfg.data.path = data_path
    torch.manual_seed(0)
    stage = Stage(cfg)
    torch.nn.init.normal_(stage.net.out[-1].weight, std=std)
    sd = stage.net.state_dict()
    return save_checkpoint(tmp_path / name, Checkpoint(config=cfg, step=0, model=sd,
                                                       ema={k: v.clone() for k, v in sd.items()}))


def _arbitrary(x, t):  # a teacher that is no diffusion model at all
    return torch.tanh(1.3 * x + t.view(-1, 1, 1, 1).float() / 50) - 0.2


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_target_makes_one_ddim_step_land_on_the_teachers_two(prediction):
    d = GaussianDiffusion(DiffusionConfig(steps=100, prediction=prediction))
    small, big = grids(100, 4)
    z = torch.randn(3, 1, 8, 8)
    for i in range(4):  # the last step ends at t'' = 0, where the target is the teacher's z_0
        t, tm, tpp = small[i], big[2 * i + 1], small[i + 1]
        z_pp, _ = ddim(_arbitrary, d, z, [t, tm, tpp], None, clip_x0=True)  # the library sampler
        tt = lambda v: torch.full((3,), v)  # noqa: E731
        mine = ddim_step(_arbitrary, d, ddim_step(_arbitrary, d, z, tt(t), tt(tm), True), tt(tm), tt(tpp), True)
        torch.testing.assert_close(mine, z_pp, atol=1e-5, rtol=1e-5)
        x_tilde = distill_target(d, z, z_pp, tt(t), tt(tpp))

        def student(x, ts):  # the network output whose x0 estimate is x_tilde
            ab = d.alpha_bar[ts].float().view(-1, 1, 1, 1)
            eps = (x - ab.sqrt() * x_tilde) / (1 - ab).sqrt()
            return eps if prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x_tilde

        one, _ = ddim(student, d, z, [t, tpp], None, clip_x0=False)
        torch.testing.assert_close(one, z_pp, atol=1e-4, rtol=1e-4)
        if tpp == 0:
            torch.testing.assert_close(x_tilde, z_pp)


def test_ddim_step_takes_rows_at_different_times():
    d = GaussianDiffusion(DiffusionConfig(steps=100, prediction="v"))
    z, t, p = torch.randn(3, 1, 8, 8), torch.tensor([100, 50, 25]), torch.tensor([75, 25, 0])
    out = ddim_step(_arbitrary, d, z, t, p, True)
    for r in range(3):
        want, _ = ddim(_arbitrary, d, z[r:r + 1], [int(t[r]), int(p[r])], None, clip_x0=True)
        torch.testing.assert_close(out[r:r + 1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [100, 1000, 4000])
def test_the_student_grid_is_every_other_point_of_the_teachers(T):
    for n in (1, 2, 4, 8, 16, 32):
        small, big = grids(T, n)
        assert big[::2] == small and len(small) == n + 1 and len(big) == 2 * n + 1
        assert small[0] == T and small[-1] == 0
    with pytest.raises(ConfigError, match="does not refine"):
        grids(100, 64)


def test_config_checks_and_rounds():
    assert DistillConfig(start_steps=64, final_steps=4).rounds() == [32, 16, 8, 4]
    for bad in (dict(start_steps=12, final_steps=4), dict(start_steps=4, final_steps=4), dict(lr=0.0)):
        with pytest.raises(ConfigError):
            DistillConfig(**bad)


def _held_out(teacher: Stage, student: Stage, n: int = 4, rows: int = 64) -> tuple[float, list[float]]:
    """On held-out data, noise and conditioning: the distillation loss, and per student step ``i``
    the mean squared distance between the student's one DDIM step t -> t'' and the teacher's two
    (clipped, as sampled)."""
    g = torch.Generator().manual_seed(1234)
    batch = x0, z0, labels = Batcher(toy_images(24, 8), teacher.config, g)(rows)
    noise = draw_step_noise(teacher, x0, z0, g)
    small, big = (torch.tensor(gr) for gr in grids(100, n))
    i = torch.randint(n, (rows,), generator=g)
    t, tm, tpp = times = step_times(small, big, i)
    d = teacher.diffusion
    z = d.q_sample(x0, t, noise.eps)
    with torch.no_grad():
        loss = distill_loss(teacher, student, batch, noise, times).item()

        def model(stage):
            c = stage.conditioning(labels, z0, noise.levels, noise.aug_noise)
            return lambda x, tt: stage(x, tt, c)
        two = ddim_step(model(teacher), d, ddim_step(model(teacher), d, z, t, tm, True), tm, tpp, True)
        one = ddim_step(model(student), d, z, t, tpp, True)
    return loss, [((one - two)[i == k] ** 2).mean().item() for k in range(n)]


@pytest.mark.slow
def test_a_round_teaches_the_student_the_teachers_two_steps(tmp_path):
    teacher_path = _teacher(tmp_path)
    cfg = DistillConfig(start_steps=8, final_steps=4, iters=150, batch_size=16, lr=2e-3, ema_decay=0.0,
                        device="cpu", progress=False)
    out = distill_stage(teacher_path, cfg, tmp_path / "d", data=toy_images(24, 8))
    teacher, student = load_stage(teacher_path), load_stage(out)
    (loss0, gap0), (loss1, gap1) = _held_out(teacher, teacher), _held_out(teacher, student)  # starts as the teacher
    assert loss1 < 0.5 * loss0, (loss0, loss1)
    # from T, where the teacher's one and two steps differ most, the student's one step is nearer its two
    assert gap1[0] < 0.5 * gap0[0], (gap0, gap1)
    info = load_checkpoint(out).extra["distill"]
    assert info["loss_last"] < info["loss_first"]
    assert (info["steps"], info["sampler"], info["spacing"], info["teacher_steps"]) == (4, "ddim", "uniform", 8)


def test_the_loss_is_differentiable_and_sees_the_conditioning():
    """The loss is finite, > 0 for a student that is not the teacher, trains the student, and sees
    the SR stage's conditioning (another augmentation level changes it)."""
    cfg = tiny_config(resolution=8, lowres=4, aug="gaussian", prediction="v", steps=100)
    torch.manual_seed(0)
    teacher = Stage(cfg)
    torch.nn.init.normal_(teacher.net.out[-1].weight, std=0.03)
    student = Stage(cfg)
    g = torch.Generator().manual_seed(0)
    batch = x0, z0, _ = Batcher(toy_images(24, 8), cfg, g)(8)
    noise = draw_step_noise(student, x0, z0, g)
    small, big = (torch.tensor(gr) for gr in grids(100, 4))
    times = step_times(small, big, torch.randint(4, (8,), generator=g))
    loss = distill_loss(teacher, student, batch, noise, times)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.net.parameters())
    noise.levels = torch.zeros_like(noise.levels) + 49
    assert distill_loss(teacher, student, batch, noise, times) != loss


def test_the_result_samples_in_a_cascade_with_ddim_on_its_grid(tmp_path):
    out = distill_stage(_teacher(tmp_path), DistillConfig(start_steps=4, final_steps=2, iters=2, batch_size=4,
                                                          device="cpu", progress=False),
                        tmp_path / "d", data=toy_images(24, 8))
    sr = load_stage(out)
    assert sr.distill["steps"] == 2 and sr.config == load_checkpoint(tmp_path / "teacher.safetensors").config
    torch.manual_seed(0)
    base = Stage(tiny_config(resolution=4, steps=100))
    base.net.eval()
    cascade = Cascade([base, sr])
    labels, seeds = torch.tensor([0, 1]), [0, 1]
    plan = SamplingPlan(stages=[StagePlan(steps=3, sampler="ddim"), StagePlan(**{**vars(sampling_plan(2)),
                                                                                   "level": 10})])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right plan: no warning
        r = cascade.sample(labels, seeds, plan)
    assert r.images[1].shape == (2, 1, 8, 8) and torch.isfinite(r.images[1]).all()
    wrong = plan.override(steps=[3, 8])
    with pytest.warns(UserWarning, match="distilled for ddim on the uniform grid of 2 steps"):
        cascade.sample(labels, seeds, wrong)


def test_resume_skips_finished_rounds(tmp_path):
    teacher = _teacher(tmp_path)
    cfg = DistillConfig(start_steps=8, final_steps=2, iters=2, batch_size=4, device="cpu", progress=False)
    data = toy_images(24, 8)
    final = distill_stage(teacher, cfg, tmp_path / "d", data=data)
    files = {n: next((round_dir(tmp_path / "d", n) / "checkpoints").iterdir()) for n in (4, 2)}
    assert final == files[2]
    stamps = {n: p.stat().st_mtime_ns for n, p in files.items()}
    for p in files[2].parent.iterdir():  # the last round lost: only it is redone
        p.unlink()
    assert distill_stage(teacher, cfg, tmp_path / "d", data=data) == final
    assert files[4].stat().st_mtime_ns == stamps[4]
    assert load_checkpoint(final).extra["distill"]["teacher"] == str(files[4])
    again = final.stat().st_mtime_ns
    distill_stage(teacher, cfg, tmp_path / "d", data=data)  # everything done: nothing is rewritten
    assert final.stat().st_mtime_ns == again
    other = DistillConfig(start_steps=8, final_steps=2, iters=3, batch_size=4, device="cpu", progress=False)
    with pytest.raises(CheckpointError, match=r"d holds rounds distilled from .*teacher.safetensors with --iters 2; "
                                              r"use another --out, or --fresh"):
        distill_stage(teacher, other, tmp_path / "d", data=data)
    assert final.stat().st_mtime_ns == again  # refused before any work
    # a round copied in from another distillation (the same steps and iterations) is caught by its record
    distill_stage(_teacher(tmp_path, name="other.safetensors", std=0.05), cfg, tmp_path / "o", data=data)
    shutil.rmtree(round_dir(tmp_path / "d", 2))
    shutil.copytree(round_dir(tmp_path / "o", 2), round_dir(tmp_path / "d", 2))
    with pytest.raises(CheckpointError, match="steps-2.*was distilled from another teacher or with other settings"):
        distill_stage(teacher, cfg, tmp_path / "d", data=data)
    # --fresh discards the rounds and distils anew with the new settings
    final = distill_stage(teacher, other, tmp_path / "d", data=data, fresh=True)
    assert load_checkpoint(final).step == 3
    assert json.loads((tmp_path / "d" / RECORD).read_text())["settings"]["iters"] == 3


def test_a_run_extends_to_fewer_steps_and_refuses_what_it_cannot_use(tmp_path):
    teacher, data = _teacher(tmp_path), toy_images(24, 8)
    cfg = DistillConfig(start_steps=8, final_steps=4, iters=2, batch_size=4, device="cpu", progress=False)
    four = distill_stage(teacher, cfg, tmp_path / "d", data=data)
    stamp = four.stat().st_mtime_ns
    # --steps only says where to stop: 8 -> 4 is the first round of 8 -> 2, which reuses it
    two = distill_stage(teacher, replace(cfg, final_steps=2), tmp_path / "d", data=data)
    assert four.stat().st_mtime_ns == stamp and load_checkpoint(two).extra["distill"]["teacher"] == str(four)
    with pytest.raises(ConfigError, match="a stage distilled for 4 DDIM steps: distil it further with --from-steps 4"):
        distill_stage(four, cfg, tmp_path / "e", data=data)
    with pytest.raises(ConfigError, match="lies inside --out"):
        distill_stage(four, replace(cfg, start_steps=4, final_steps=2), tmp_path / "d", data=data)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--out .*file is a file: name a directory"):
        distill_stage(teacher, cfg, tmp_path / "file", data=data)


def test_cli_end_to_end_and_a_missing_teacher(tmp_path, capsys):
    data = toy_images(24, 8)
    npz = tmp_path / "toy8.npz"
    np.savez(npz, images=data.images.numpy(), labels=data.labels.numpy())
    teacher = _teacher(tmp_path, data_path=str(npz))
    rc = main(["distill", str(teacher), "--out", str(tmp_path / "d"), "--steps", "2", "--from-steps", "4",
               "--iters", "2", "--batch-size", "4", "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "--sampler ddim --spacing uniform" in out and '"steps": 2' in out
    assert load_stage(round_dir(tmp_path / "d", 2)).distill["steps"] == 2
    rc = main(["distill", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("cdm: error:") and "does not exist" in err
    rc = main(["distill", str(teacher), "--out", str(tmp_path / "e"), "--steps", "3", "--from-steps", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "power of two" in err
