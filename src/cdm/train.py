"""Training one stage: the paper's Algorithm 1 (base) / 3 (SR with Gaussian augmentation).

For an SR stage each step draws ``(x0, c)``, makes ``z0 = downsample(x0)``, corrupts it at a
random level through :meth:`Stage.conditioning` (the path sampling uses too), and minimises the
diffusion loss at a random ``t``. Around it: AdamW with warm-up, gradient clipping, an EMA of
the weights, bf16 autocast, periodic atomic checkpoints with exact resume, sample grids, a
progress bar and a JSONL log.

Multi-process (``torchrun``, DDP) is the same code path: every process draws the *global* batch's
indices and per-example randomness (flips, labels dropped, levels, ``t``, noise) from the shared
generator and keeps its own slice, so DDP's averaged gradient is the single-process mean-loss
gradient and the run does not depend on the number of processes (up to float rounding). The
checkpoint holds that global state, so a run resumes on any number of processes. Rank 0 alone
writes files (checkpoints, log, grids); the others wait for each checkpoint. A non-finite loss or
gradient stops every process with a message naming the last good checkpoint.

The step itself (batch, randomness, conditioning, loss, gradient accumulation) is :mod:`cdm.step`.
Memory levers: ``train.grad_accum`` runs each step's batch as equal micro-batches whose
randomness is drawn once for the whole batch and split, so the step's gradient, the logged loss and
the generator's state are those of one pass (up to float rounding, and bar dropout, whose masks come
from the global RNG); ``train.crop`` trains an SR stage on aligned random crops (:class:`cdm.step.Batcher`);
``unet.checkpoint`` recomputes the network's blocks in the backward pass (:mod:`cdm.unet`). A run
directory holds::

    config.json            the resolved stage config
    log.jsonl              one line per log_every steps (and one per config change on resume)
    tb/                    the same as TensorBoard event files, and the grids (cdm.livelog; optional)
    init.json              where a run started with --init took its weights (cdm.start)
    checkpoints/step-*.safetensors
    samples/step-*.png
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import CdmError
from .checkpoint import (Checkpoint, CheckpointError, atomic_write, checkpoint_dir, checkpoint_path, list_checkpoints,
                         newest_intact, prune_checkpoints, remove_stale_temporaries, save_checkpoint)
from .cascade import StagePlan, sample_stage
from .runlock import run_lock
from .config import RUN_CONFIG, StageConfig, resolve_config, to_dict
from .data import ImageSet, load_dataset, stage_input
from .distributed import DistributedError, World, world
from .ema import classic_decay, ema_update, power_decay, remove_snapshots_after, save_snapshot, sigma_rel_to_gamma
from .images import save_grid
from .livelog import NoLiveLog, open_live_log
from .metrics import consistency_psnr
from .samplers import derive_seed
from .stage import Stage
from .step import Batcher, accumulate_gradients, draw_step_noise, lr_at
from .start import (InitFrom, change_lines, check_resume, check_training_dir, describe_start, load_init_weights,
                    record_start, startup_summary)


class TrainingError(CdmError, RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


@torch.no_grad()
def write_sample_grid(stage: Stage, data: ImageSet, path: Path, per_class: int = 4,
                      max_n: int = 40) -> dict | None:
    """Samples of one stage (EMA weights): a row per class; SR stages get real low-res inputs
    (ground-truth conditioning at ``train.sample_level``) shown left of each output. For an SR
    stage, returns how closely the outputs follow their inputs: ``consistency_psnr_db``, and as a
    yardstick ``copy_psnr_db``, what the input itself upsampled (the network's own upsampling)
    scores; None for a base stage."""
    cfg = stage.config
    nc = max(stage.num_classes, 1)
    labels = torch.arange(nc).repeat_interleave(per_class)[:max_n]
    z0 = None
    if stage.is_super_resolution:
        # The first training images of each class, downsampled as in training.
        pick = torch.cat([torch.nonzero(data.labels == c).flatten()[:per_class] for c in range(nc)])[:len(labels)]
        labels = data.labels[pick]
        z0 = stage_input(data.images[pick], cfg.lowres_resolution)
    seeds = [derive_seed(cfg.train.seed, 7919, j) for j in range(len(labels))]
    plan = StagePlan(steps=cfg.train.sample_steps, level=cfg.train.sample_level)
    x, _ = sample_stage(stage, 0, labels, seeds, plan, lowres=z0)
    save_grid(x, path, nrow=2 * per_class if z0 is not None else per_class, inputs=z0)
    if z0 is None:
        return None
    copy = stage.module.upsample_lowres(z0.to(stage.device))
    return {"consistency_psnr_db": round(consistency_psnr(x, z0), 2),
            "copy_psnr_db": round(consistency_psnr(copy, z0), 2)}


def trim_log(path: Path, step: int) -> None:
    """Keep the lines of a run's ``log.jsonl`` for steps ``<= step``: a run resumed from step
    ``step`` logs the later steps again, and a line cut short by a killed process is dropped."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(line + "\n")
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(keep)))


GOOD = "good.json"  # names the newest checkpoint proven good: one after which a whole interval ran finite
DIVERGED = ".diverged"  # suffix of checkpoints set aside when training diverged


def proven_good(out: Path) -> Path | None:
    """The run's newest checkpoint proven good: the next checkpoint interval after it ran with finite
    losses and gradients (a checkpoint written just before a divergence may already hold the weights
    that produced it). None if there is none yet."""
    try:
        p = checkpoint_dir(out) / json.loads((out / GOOD).read_text())["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return p if p.is_file() else None


def set_aside_unproven(out: Path, good: Path | None) -> list[Path]:
    """Rename the checkpoints newer than ``good`` (all, if None) to ``*.diverged``, so that a re-run
    resumes from ``good``; they are kept for inspection, never deleted."""
    found = list_checkpoints(out)
    limit = next((s for s, p in found if p == good), -1)
    moved = []
    for s, p in found:
        if s > limit:
            p.rename(p.with_name(p.name + DIVERGED))
            moved.append(p)
    return moved


def train_stage(cfg: StageConfig, out_dir: str | Path, fresh: bool = False, progress: bool = True,
                data: ImageSet | None = None, init: InitFrom | None = None) -> Path:
    """Train (or resume) one stage into ``out_dir``; returns the last checkpoint's path.

    A fresh run (no checkpoint in ``out_dir``, or ``fresh``) starts from ``init``'s weights if given
    (:mod:`cdm.start`); a run with checkpoints resumes from its own and ignores ``init``. Rank 0
    prints a short summary of the run to stderr before the first step.

    Under ``torchrun`` every process calls this with the same arguments (``train.batch_size`` is
    the global batch, split evenly among them); ``out_dir`` must be on a file system they share."""
    with world(cfg.train.device) as w:
        k = cfg.train.grad_accum
        if k > 1 and cfg.train.batch_size % (k * w.size):  # (k = 1: World.part says what to do)
            raise DistributedError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by train.grad_accum "
                                   f"x processes ({k} x {w.size}): set it to a multiple of {k * w.size}")
        data = data if data is not None else load_dataset(cfg.data)  # bad data fails before any file is made
        resolve_config(cfg, data)
        check_training_dir(Path(out_dir))  # not another command's output (a distillation, an EMA export)
        # one writer per run directory: a second `cdm train --out` the same directory is refused
        with run_lock(out_dir, "training", enabled=w.is_main, agree=w.all_true):
            return _train(cfg, Path(out_dir), fresh, progress, data, w, init)


def _train(cfg: StageConfig, out: Path, fresh: bool, progress: bool, data: ImageSet, w: World,
           init: InitFrom | None = None) -> Path:
    from tqdm.auto import tqdm

    tc = cfg.train
    part = w.part(tc.batch_size)
    torch.manual_seed(tc.seed)
    g = torch.Generator().manual_seed(tc.seed)

    stage = Stage(cfg).to(w.device)
    net = stage.net  # the bare network: its weights are what checkpoints hold
    # the newest checkpoint that loads and passes its checksum (a damaged newer one is skipped, with a warning)
    intact = None if fresh else newest_intact(out)
    origin = None  # where the run's starting weights came from (--init), kept in init.json and checkpoints
    if init is not None and intact is None:  # before the EMAs are copied from net: they start at these weights
        origin = load_init_weights(net, init, cfg)
    if tc.channels_last:
        net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).requires_grad_(False)
    # Power-function EMAs kept for post-hoc EMA (cdm.ema): one copy of the network per sigma_rel.
    profiles = [copy.deepcopy(net).requires_grad_(False) for _ in tc.ema_profiles]
    gammas = [sigma_rel_to_gamma(r) for r in tc.ema_profiles]
    ema_gamma = sigma_rel_to_gamma(tc.ema_sigma_rel) if tc.ema_sigma_rel > 0 else None
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay)
    step = 0
    changes: dict[str, list] = {}  # config keys changed on resume: {key: [old, new]}
    changed: list[str] = []  # ... as lines for the start-up summary

    if intact:
        ckpt = intact[1]
        changes = check_resume(ckpt.config, cfg, out)  # refuses what a resume cannot change
        changed = change_lines(changes, ckpt.step, ckpt.config, cfg)
        origin = (ckpt.extra or {}).get("init")
        net.load_state_dict(ckpt.model)
        ema.load_state_dict(ckpt.ema)
        for prof, sd in zip(profiles, ckpt.ema_profiles or []):
            prof.load_state_dict(sd)
        opt.load_state_dict(ckpt.optimizer)
        torch.set_rng_state(ckpt.rng["torch"])
        g.set_state(ckpt.rng["data"])
        step = ckpt.step
    if not w.same(step):
        raise DistributedError(f"the processes found different checkpoints in {out}; the run directory must "
                               f"be on a file system that every node shares")
    if w.is_main:
        if fresh and out.exists():
            for _, p in list_checkpoints(out):
                p.unlink()
            (out / "log.jsonl").unlink(missing_ok=True)
            (out / GOOD).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        remove_snapshots_after(out, step)
        trim_log(out / "log.jsonl", step)
        atomic_write(out / RUN_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(to_dict(cfg), indent=2)))
        record_start(out, step, origin, changes)
        device = f"{w.device}" + (f" x {w.size} processes" if w.size > 1 else "")
        start = describe_start(intact[0] if intact else None, step, init, origin) + \
            ("; the run is already done" if step >= tc.steps else "")
        print("\n".join(startup_summary(cfg, data, out, device, sum(p_.numel() for p_ in net.parameters()), start,
                                        changed)), file=sys.stderr, flush=True)
        if cfg.class_conditional and data.num_classes > 1 and tc.p_uncond == 0 and step < tc.steps:
            warnings.warn(f"{cfg.name} is class-conditional but trains without label dropout (train.p_uncond = 0): "
                          f"it cannot be guided (cdm sample --guidance needs its unconditional prediction); set "
                          f"train.p_uncond = 0.1 to allow it")
    w.barrier()
    if w.size > 1:  # forward passes go through DDP, which averages the gradients over the processes
        from torch.nn.parallel import DistributedDataParallel

        stage = Stage(cfg, net=DistributedDataParallel(net, device_ids=[w.device.index] if w.device.type == "cuda"
                                                       else None))

    batcher = Batcher(data, cfg, g)
    ema_stage = Stage(cfg, net=ema)

    def on_main(write, p: Path) -> None:
        """Rank 0 writes; every process learns whether it could (also the barrier: no process runs
        ahead of a checkpoint)."""
        err = None
        if w.is_main:
            try:
                write()
            except CheckpointError as e:
                err = e
        if not w.all_true(err is None):
            raise err or TrainingError(f"rank 0 could not write {p}; see its message")

    def save(step: int) -> Path:
        p = checkpoint_path(out, step)

        def write() -> None:
            save_checkpoint(p, Checkpoint(
                config=cfg, step=step, model=net.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
                rng={"torch": torch.get_rng_state(), "data": g.get_state()},
                ema_profiles=[prof.state_dict() for prof in profiles] or None,
                extra={"init": origin} if origin else None))
            if last is not None:  # every step since the previous checkpoint was finite: it is proven good
                atomic_write(out / GOOD, lambda tmp: Path(tmp).write_text(json.dumps({"path": last.name})))
            prune_checkpoints(out, tc.keep_checkpoints, protect=proven_good(out))

        on_main(write, p)
        return p

    def snapshot(step: int) -> None:
        on_main(lambda: save_snapshot(out, step, [(r, prof.state_dict()) for r, prof in zip(tc.ema_profiles, profiles)]),
                out / "ema")

    def stop(what: str, value: float, at: int | None = None) -> TrainingError:
        good = proven_good(out)
        aside = set_aside_unproven(out, good) if w.is_main else []
        kept = (f"the last good checkpoint, {good}, is kept and a re-run resumes from it" if good else
                "no checkpoint was proven good yet, so a re-run starts over")
        moved = (f" ({len(aside)} newer checkpoint(s), which may hold the diverged weights, renamed to "
                 f"*{DIVERGED})" if aside else "")
        return TrainingError(f"{what} became {value} at step {at or step + 1}; {kept}{moved}. Lower train.lr, raise "
                             f"train.warmup_steps or set train.grad_clip, then re-run")

    last = intact[0] if intact else None
    snapshot_every = tc.ema_snapshot_every or tc.ckpt_every
    if step >= tc.steps:
        return last
    net.train()
    live = open_live_log(out, tc.tensorboard, step, fresh) if w.is_main else NoLiveLog()
    bar = tqdm(total=tc.steps, initial=step, disable=not (progress and w.is_main), desc=cfg.name,
               dynamic_ncols=True, unit="step", mininterval=1.0)
    log = open(out / "log.jsonl", "a") if w.is_main else None
    t_win, n_win, k_win, loss_win, gn_win = time.perf_counter(), 0, 0, 0.0, 0.0
    try:
        while step < tc.steps:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            x0, z0, labels = batcher(tc.batch_size, part)
            noise = draw_step_noise(stage, x0, z0, g, tc.p_uncond, w.rank, w.size)
            batcher.prefetch(tc.batch_size, part)  # the next step's batch is read while this one computes
            opt.zero_grad(set_to_none=True)
            loss = accumulate_gradients(stage, x0, z0, labels, noise, tc.grad_accum)
            loss_all = w.mean(loss)  # the whole batch's loss, the same on every process
            if not torch.isfinite(loss_all):
                raise stop("the loss", loss_all.item())
            gn = nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
            if not torch.isfinite(gn):
                raise stop("the gradient norm", gn.item())
            opt.step()
            step += 1
            ema_update(ema, net, classic_decay(step, tc.ema_decay) if ema_gamma is None else power_decay(step, ema_gamma))
            for prof, gamma in zip(profiles, gammas):
                ema_update(prof, net, power_decay(step, gamma))
            n_win += tc.batch_size
            k_win += 1
            loss_win += loss_all.item()
            gn_win += float(gn)
            bar.update(1)
            if log and (step % tc.log_every == 0 or step == tc.steps):
                dt = time.perf_counter() - t_win  # the window: the steps since the last line (or the resume)
                rec = {"step": step, "loss": loss_win / k_win, "grad_norm": gn_win / k_win,
                       "lr": opt.param_groups[0]["lr"], "img_per_s": n_win / dt, "time": time.time()}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                live.scalars(step, rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
            if step % tc.log_every == 0 or step == tc.steps:
                t_win, n_win, k_win, loss_win, gn_win = time.perf_counter(), 0, 0, 0.0, 0.0
            if profiles and (step % snapshot_every == 0 or step == tc.steps):
                snapshot(step)
            if step % tc.ckpt_every == 0 or step == tc.steps:
                if not all(torch.isfinite(p_).all() for p_ in net.parameters()):  # finite loss, broken weights
                    raise stop("a weight", float("nan"), at=step)
                last = save(step)
            if w.is_main and tc.sample_every and (step % tc.sample_every == 0 or step == tc.steps):
                ema.eval()
                grid = out / "samples" / f"step-{step:08d}.png"
                follow = write_sample_grid(ema_stage, data, grid)
                live.image(step, "samples", grid)
                if follow is not None:  # does the SR stage follow its input? (logged beside the loss)
                    log.write(json.dumps({"step": step, "samples": str(grid.relative_to(out)), **follow}) + "\n")
                    log.flush()
                    live.scalars(step, follow)
                    if not bar.disable:
                        bar.write(f"{cfg.name} step {step}: {grid}; its outputs follow their inputs to "
                                  f"{follow['consistency_psnr_db']:.1f} dB (copying the input: "
                                  f"{follow['copy_psnr_db']:.1f} dB)")
                t_win = time.perf_counter()  # sampling time is not training time
                n_win = 0
    finally:
        bar.close()
        live.close()
        if log:
            log.close()
        batcher.close()
    return last
