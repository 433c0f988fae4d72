"""Few-step stages by progressive distillation (Salimans & Ho 2022, arXiv 2202.00512, Algorithm 2).

A student, initialised from the teacher, learns to take in ONE deterministic DDIM step ``t -> t''``
the result of TWO teacher DDIM steps ``t -> t' -> t''``; its EMA then becomes the teacher and the
step count halves, round after round (e.g. 64 -> 32 -> 16 -> 8 -> 4). The result is an ordinary
stage checkpoint (the teacher's config) whose ``extra["distill"]`` says how it must be sampled:
``ddim`` on the uniform grid of exactly its ``steps`` (:func:`sampling_plan`; a cascade that samples
it otherwise warns).

Choices, each as the paper or stated:

- **Grids.** The student's grid is the sampler's own, ``time_grid(T, N)`` (uniform), and the
  teacher's is ``time_grid(T, 2N)``; every other point of the 2N grid must be the N grid
  (``round(T i / N)`` refines when the ratio ``start_steps / final_steps`` is a power of two, and
  :func:`grids` checks it for every round rather than trusting rounding). A training time is a
  uniformly drawn step ``i`` of the N grid: ``t = G_N[i]``, ``t' = G_2N[2i + 1]``, ``t'' = G_N[i + 1]``.
- **Teacher steps**: DDIM with eta = 0 and the stage's static clipping of ``x0_hat`` to [-1, 1]
  (the sampler's default threshold, so the first teacher is the sampler people use); the target
  ``x_tilde`` itself is not clipped.
- **Target** (Algorithm 2): with ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``, ``r = sigma_t''
  / sigma_t``: ``x_tilde = (z_t'' - r z_t) / (alpha_t'' - r alpha_t)``; at ``t'' = 0`` (``r = 0``) it
  is the teacher's ``z_0``.
- **Loss**: the paper's "truncated SNR" weighting, ``max(SNR_t, 1) ||x0_hat - x_tilde||^2`` with the
  student's ``x0_hat`` from its eps or v output (:meth:`GaussianDiffusion.predict_x0_eps`). With
  v-prediction (the SR presets) this is bounded at every ``t``; with eps-prediction ``x0_hat`` is
  ill-conditioned where ``abar_t -> 0`` (the paper's reason for v), and the stage's gradient
  clipping is all that guards it.
- **Conditioning**: batches come from the stage's own :class:`~cdm.step.Batcher` and per-example
  randomness from :func:`~cdm.step.draw_step_noise` (label dropout, SR augmentation levels ``s``
  and their noise), i.e. the training path; teacher and student see the same inputs. A learned
  variance is not distilled (DDIM uses only the mean channels), nor is guidance (the teacher is
  unguided).
- **Optimiser**: AdamW (the stage's betas and weight decay), learning rate linearly annealed to 0
  over each round, the stage's gradient clipping; an EMA of the student (classic, ``ema_decay``).

A run directory ``out`` holds ``steps-<N>/`` per finished round, each a normal run directory with
``config.json`` and ``checkpoints/step-<iters>.safetensors``, and ``distill.json``: the teacher (its
checksum) and the settings that shape the rounds. A round whose checkpoint exists is skipped, so a
stopped run resumes at the round it was in, but only under the same teacher and settings: others
are refused (``fresh`` discards the rounds), and each round records what made it (its teacher's
checksum and the settings, ``extra["distill"]["made_from"]``), so a round copied in from another
distillation is refused too.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .cascade import StagePlan
from .checkpoint import (Checkpoint, CheckpointError, atomic_write, checkpoint_id, checkpoint_path, load_checkpoint,
                         load_stage, newest_intact, resolve_checkpoint_path, save_checkpoint)
from .config import PRECISIONS, ConfigError, to_dict
from .data import ImageSet, load_dataset
from .diffusion import GaussianDiffusion, _bcast, mean_flat, time_grid
from .distributed import pick_device
from .ema import classic_decay, ema_update
from .runlock import run_lock
from .samplers import ModelFn, derive_seed
from .stage import Stage
from .train import TrainingError
from .step import Batcher, StepNoise, draw_step_noise, step_conditioning


@dataclass
class DistillConfig:
    start_steps: int = 64  # the first teacher's DDIM steps (round 1's student takes half)
    final_steps: int = 4  # the last student's steps; start_steps / final_steps must be a power of two
    iters: int = 2000  # optimiser steps per round
    batch_size: int = 64
    lr: float = 1e-4  # AdamW, linearly annealed to 0 over each round
    ema_decay: float = 0.999  # EMA of the student, warmed up as min(decay, (1 + n) / (10 + n)); 0: no EMA
    seed: int = 0
    device: str = "auto"
    precision: str = ""  # "auto", "bf16" or "fp32" (as train.precision); "" = the stage's train.precision
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("start_steps", "final_steps", "iters", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"distill {name} must be >= 1, got {getattr(self, name)}")
        r = self.start_steps // self.final_steps
        if self.start_steps % self.final_steps or r < 2 or r & (r - 1):
            raise ConfigError(f"distill: start steps / final steps must be a power of two >= 2, got "
                              f"{self.start_steps} / {self.final_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not 0 <= self.ema_decay < 1:
            raise ConfigError(f"distill: lr must be > 0 and ema_decay in [0, 1), got {self.lr}, {self.ema_decay}")
        if self.precision not in ("", *PRECISIONS):
            raise ConfigError(f"distill precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def rounds(self) -> list[int]:
        """The students' step counts, e.g. ``[32, 16, 8, 4]`` for 64 -> 4."""
        out, n = [], self.start_steps
        while n > self.final_steps:
            n //= 2
            out.append(n)
        return out


def grids(T: int, n: int) -> tuple[list[int], list[int]]:
    """The student's and teacher's descending grids ``(G_N, G_2N)`` (``time_grid``, uniform), with
    ``G_2N[::2] == G_N`` checked: each student step ``G_N[i] -> G_N[i + 1]`` is two teacher steps."""
    small, big = time_grid(T, n), time_grid(T, 2 * n)
    if len(big) != 2 * n + 1 or big[::2] != small:
        raise ConfigError(f"distill: the {2 * n}-step grid of T = {T} does not refine the {n}-step grid "
                          f"(need T >= {2 * n} and uniform grids that nest); choose other step counts")
    return small, big


def ddim_step(model: ModelFn, d: GaussianDiffusion, x: Tensor, t: Tensor, p: Tensor, clip_x0: bool) -> Tensor:
    """One DDIM step (eta = 0) from ``x`` ``[B, C, H, W]`` at per-example times ``t`` ``[B]`` to ``p``
    ``[B]`` (:func:`cdm.samplers.ddim` for a batch whose rows sit at different times)."""
    pred, _ = d.split_output(model(x, t), x.shape[1])
    x0, eps = d.predict_x0_eps(pred, x, t)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x - _bcast(d.abar(t).sqrt(), x) * x0) / _bcast((1 - d.abar(t)).sqrt(), x)
    ab_p = d.abar(p)
    return _bcast(ab_p.sqrt(), x) * x0 + _bcast((1 - ab_p).sqrt(), x) * eps


def distill_target(d: GaussianDiffusion, z_t: Tensor, z_pp: Tensor, t: Tensor, t_pp: Tensor) -> Tensor:
    """Algorithm 2's ``x_tilde`` ``[B, C, H, W]``: the x0 for which one DDIM step ``t -> t''`` from
    ``z_t`` lands on ``z_pp`` (the teacher's two-step ``z_t''``)."""
    ab_t, ab_p = d.abar(t), d.abar(t_pp)
    r = ((1 - ab_p) / (1 - ab_t)).sqrt()  # sigma_t'' / sigma_t
    return (z_pp - _bcast(r, z_t) * z_t) / _bcast(ab_p.sqrt() - r * ab_t.sqrt(), z_t)


def step_times(small: Tensor, big: Tensor, i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(t, t', t'')`` ``[B]`` of the student's steps ``i`` ``[B]`` on the grids of :func:`grids`
    (as tensors): ``G_N[i]``, ``G_2N[2i + 1]``, ``G_N[i + 1]``."""
    return small[i], big[2 * i + 1], small[i + 1]


def sampling_plan(n: int) -> StagePlan:
    """How a stage distilled for ``n`` steps is sampled: DDIM on the uniform n-step grid."""
    return StagePlan(steps=n, sampler="ddim", spacing="uniform")


def round_dir(out: Path, n: int) -> Path:
    return Path(out) / f"steps-{n}"


RECORD = "distill.json"  # in ``out``: the teacher and the settings its rounds were made with
_FLAGS = {"start_steps": "--from-steps", "iters": "--iters", "batch_size": "--batch-size", "lr": "--lr",
          "seed": "--seed", "ema_decay": "ema_decay", "precision": "precision"}


def settings(cfg: DistillConfig) -> dict:
    """The settings that shape every round's weights (``final_steps`` only says where to stop: the
    rounds down to it are the same for any later one, so a run may be extended to fewer steps)."""
    return {k: getattr(cfg, k) for k in _FLAGS}


def _read_record(out: Path) -> dict | None:
    path = out / RECORD
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        if isinstance(rec, dict) and isinstance(rec.get("teacher"), dict) and isinstance(rec.get("settings"), dict):
            return rec
    except (OSError, ValueError):
        pass
    raise CheckpointError(f"{path} is unreadable or corrupt: delete it (and the rounds beside it), or use another "
                          f"--out or --fresh")


def check_out(out: Path, teacher_path: Path, teacher_id: str, cfg: DistillConfig, fresh: bool = False) -> dict:
    """The record ``out`` must hold for this distillation (:data:`RECORD`); refuses, in one line,
    an ``out`` that is a file, holds the teacher, or (unless ``fresh``: they are to be discarded)
    holds rounds of another teacher or settings."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: name a directory")
    if teacher_path.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"the teacher {teacher_path} lies inside --out {out}: distil into another --out")
    rec = {"format": "cdm-distill", "teacher": {"path": str(teacher_path.resolve()), "id": teacher_id},
           "settings": settings(cfg)}
    old = None if fresh else _read_record(out)
    if old is None and not fresh and any(out.glob("steps-*/checkpoints")):
        raise CheckpointError(f"{out} holds distillation rounds without a record of their teacher and settings "
                              f"(an older cdm, or copied in): use another --out, or --fresh to discard them")
    if old is not None and (old["teacher"].get("id") != teacher_id or old["settings"] != rec["settings"]):
        was = " ".join(f"{_FLAGS.get(k, k)} {v}" for k, v in old["settings"].items()
                       if rec["settings"].get(k) != v) or "the same settings"
        raise CheckpointError(f"{out} holds rounds distilled from {old['teacher'].get('path')} with {was}; use "
                              f"another --out, or --fresh to discard them (or repeat that teacher and those settings "
                              f"to resume)")
    return rec


def _finished(out: Path, n: int, iters: int, made_from: dict) -> Path | None:
    """The checkpoint of a finished round for ``n`` steps in ``out``, or None; one made from
    another teacher or with other settings (``made_from``) is refused."""
    found = newest_intact(round_dir(out, n), hint="delete that round's directory to redo it")
    if found is None:
        return None
    path, ckpt = found
    info = (ckpt.extra or {}).get("distill") or {}
    if info.get("steps") != n or ckpt.step != iters:
        raise CheckpointError(f"{path} is not a finished {n}-step round of {iters} iterations (it holds "
                              f"{info.get('steps')} steps, {ckpt.step} iterations): delete {round_dir(out, n)} or "
                              f"choose another --out")
    if info.get("made_from") != made_from:
        raise CheckpointError(f"{path} was distilled from another teacher or with other settings than this run's "
                              f"(rounds mixed by hand?): delete {round_dir(out, n)} to redo it, or use another --out")
    return path


def distill_stage(teacher_checkpoint: str | Path, cfg: DistillConfig, out_dir: str | Path,
                  data: ImageSet | None = None, fresh: bool = False) -> Path:
    """Distil the stage in ``teacher_checkpoint`` (a checkpoint file or run directory; its EMA weights
    are the first teacher, sampled with ``cfg.start_steps`` DDIM steps) down to ``cfg.final_steps``
    steps, one round per halving, into ``out_dir``; returns the final checkpoint. Finished rounds
    are skipped (resume) when ``out_dir`` records the same teacher and settings (:data:`RECORD`),
    else refused; ``fresh`` discards them. ``data`` defaults to the stage's own data set."""
    out = Path(out_dir)
    teacher_path = resolve_checkpoint_path(teacher_checkpoint)
    teacher = load_checkpoint(teacher_path, weights_only=True)
    tcfg, teacher_id = teacher.config, checkpoint_id(teacher_path)
    was = (teacher.extra or {}).get("distill")
    if was and was.get("steps") != cfg.start_steps:
        raise ConfigError(f"the teacher {teacher_path} is a stage distilled for {was.get('steps')} DDIM steps: "
                          f"distil it further with --from-steps {was.get('steps')}")
    for n in cfg.rounds():
        grids(tcfg.diffusion.steps, n)  # every round's grids nest, before any work
    record = check_out(out, teacher_path, teacher_id, cfg, fresh)
    data = data if data is not None else load_dataset(tcfg.data)
    dev = pick_device(cfg.device)
    with run_lock(out, "distilling"):
        if fresh:
            for d in out.glob("steps-*"):
                shutil.rmtree(d)
        atomic_write(out / RECORD, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
        for n in cfg.rounds():
            made_from = {"teacher_id": teacher_id, **settings(cfg)}
            done = _finished(out, n, cfg.iters, made_from)
            if done is None:
                done = _round(teacher_path, n, cfg, out, data, dev, made_from)
            elif cfg.progress:
                print(f"distill: the {n}-step round is done ({done}); skipped", file=sys.stderr)
            teacher_path, teacher_id = done, checkpoint_id(done)
    return teacher_path


def _round(teacher_path: Path, n: int, cfg: DistillConfig, out: Path, data: ImageSet, dev: torch.device,
           made_from: dict) -> Path:
    """One round: a student for ``n`` steps from the ``2n``-step teacher at ``teacher_path``."""
    teacher = load_stage(teacher_path, device=dev)  # EMA weights, eval mode
    teacher.net.requires_grad_(False)
    scfg = teacher.config
    tc, d = scfg.train, teacher.diffusion
    student = Stage(scfg, net=copy.deepcopy(teacher.net).requires_grad_(True).train())
    ema = copy.deepcopy(teacher.net)
    for st in (teacher, student):
        st.precision = cfg.precision or tc.precision
    small, big = (torch.tensor(gr, device=dev) for gr in grids(d.T, n))
    opt = torch.optim.AdamW(student.net.parameters(), lr=cfg.lr, betas=tuple(tc.adam_betas),
                            weight_decay=tc.weight_decay)
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, n))
    torch.manual_seed(derive_seed(cfg.seed, n, 1))  # dropout
    batcher = Batcher(data, scfg, g)
    losses: list[float] = []
    for it in range(cfg.iters):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * (1 - it / cfg.iters)
        batch = batcher(cfg.batch_size)
        noise = draw_step_noise(student, batch[0], batch[1], g, tc.p_uncond)
        i = torch.randint(n, (cfg.batch_size,), generator=g).to(dev)  # the student's step
        loss = distill_loss(teacher, student, batch, noise, step_times(small, big, i))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.net.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        opt.step()
        ema_update(ema, student.net, classic_decay(it + 1, cfg.ema_decay) if cfg.ema_decay else 0.0)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise TrainingError(f"distill: the loss became {losses[-1]} at iteration {it + 1} of the {n}-step "
                                  f"round; nothing of this round was kept: lower --lr and re-run")
        if cfg.progress and ((it + 1) % max(cfg.iters // 10, 1) == 0):
            print(f"distill {2 * n}->{n} steps: iteration {it + 1}/{cfg.iters}, loss "
                  f"{sum(losses[-50:]) / len(losses[-50:]):.5f}", file=sys.stderr)
    run = round_dir(out, n)
    atomic_write(run / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(to_dict(scfg), indent=2)))
    info = {"steps": n, "sampler": "ddim", "spacing": "uniform", "teacher": str(teacher_path), "teacher_steps": 2 * n,
            "iters": cfg.iters, "made_from": made_from, "loss_first": losses[0],
            "loss_last": sum(losses[-50:]) / len(losses[-50:])}
    return save_checkpoint(checkpoint_path(run, cfg.iters), Checkpoint(
        config=scfg, step=cfg.iters, model=student.net.state_dict(), ema=ema.state_dict(),
        extra={"distill": info}))


def distill_loss(teacher: Stage, student: Stage, batch: tuple[Tensor, Tensor | None, Tensor], noise: StepNoise,
                 times: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """The mean truncated-SNR-weighted loss (a scalar) of the student's one step ``t -> t''`` against
    the teacher's two ``t -> t' -> t''``, over ``batch = (x0 [B, C, R, R], z0, labels)`` (as
    :class:`~cdm.step.Batcher` draws it), the step's randomness ``noise`` (whose ``t`` is unused) and
    ``times = (t, t', t'')`` ``[B]`` (:func:`step_times`)."""
    (x0, z0, labels), (t, t_mid, t_pp) = batch, times
    dev, d = student.device, student.diffusion

    def cond(stage: Stage) -> dict:  # the training path; each network embeds the same inputs itself
        return step_conditioning(stage, z0, labels, noise)

    x0 = x0.to(dev)
    z_t = d.q_sample(x0, t, noise.eps.to(dev))
    with torch.no_grad():
        c = cond(teacher)
        model = lambda x, tt: teacher(x, tt, c)  # noqa: E731
        z_pp = ddim_step(model, d, ddim_step(model, d, z_t, t, t_mid, True), t_mid, t_pp, True)
        target = distill_target(d, z_t, z_pp, t, t_pp)
    pred, _ = d.split_output(student(z_t, t, cond(student)), x0.shape[1])
    x0_hat, _ = d.predict_x0_eps(pred, z_t, t)
    weight = d.snr(t).clamp(min=1).to(x0_hat)  # "truncated SNR", max(SNR_t, 1)
    return (weight * mean_flat((x0_hat - target) ** 2)).mean()
