"""Training one stage: the paper's Algorithm 1 (base) / 3 (SR with Gaussian augmentation).

For an SR stage each step draws ``(x0, c)``, makes ``z0 = downsample(x0)``, corrupts it at a
random level through :meth:`Stage.conditioning` (the path sampling uses too), and minimises the
diffusion loss at a random ``t``. Around it: AdamW with warm-up, gradient clipping, an EMA of
the weights, bf16 autocast, periodic atomic checkpoints with exact resume, sample grids, a
progress bar and a JSONL log. A run directory holds::

    config.json            the resolved stage config
    log.jsonl              one line per log_every steps
    checkpoints/step-*.safetensors
    samples/step-*.png
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import (Checkpoint, CheckpointError, checkpoint_path, list_checkpoints, load_checkpoint,
                         prune_checkpoints, save_checkpoint, atomic_write)
from .config import StageConfig, to_dict
from .data import ImageSet, downsample, load_dataset, random_flip, to_float
from .diffusion import time_grid
from .images import save_grid
from .samplers import SAMPLERS, SeededNoise, derive_seed
from .stage import Stage


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# Parts of a stage config that define the model; a run directory can only be resumed with the same.
_MODEL_KEYS = ("resolution", "lowres_resolution", "class_conditional", "unet", "diffusion", "augment")


def _check_same_model(saved: dict, new: dict, run_dir: Path) -> None:
    diffs = [k for k in _MODEL_KEYS if saved.get(k) != new.get(k)]
    if diffs:
        raise CheckpointError(f"{run_dir} holds a run of a different stage (its {', '.join(diffs)} "
                              f"differ); pass another --out, or --fresh to start over there")


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * net`` for parameters; buffers are copied."""
    e_params = [p for p in ema.parameters()]
    n_params = [p.detach() for p in net.parameters()]
    torch._foreach_lerp_(e_params, n_params, 1.0 - decay)
    for eb, nb in zip(ema.buffers(), net.buffers()):
        eb.copy_(nb)


class Batcher:
    """Draws training batches from an in-memory :class:`ImageSet` with its own generator (whose
    state goes into checkpoints, so a resumed run sees the same batches)."""

    def __init__(self, data: ImageSet, cfg: StageConfig, generator: torch.Generator):
        self.data, self.cfg, self.g = data, cfg, generator

    def __call__(self, batch_size: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(x0 [B, C, R, R], z0 [B, C, r, r] or None, labels [B])`` in [-1, 1]."""
        idx = torch.randint(len(self.data), (batch_size,), generator=self.g)
        x = to_float(self.data.images[idx])
        if self.cfg.data.flip:
            x = random_flip(x, self.g)
        x0 = downsample(x, self.cfg.resolution)
        z0 = downsample(x, self.cfg.lowres_resolution) if self.cfg.is_super_resolution else None
        return x0, z0, self.data.labels[idx]


def training_step_loss(stage: Stage, x0: Tensor, z0: Tensor | None, labels: Tensor,
                       g: torch.Generator, p_uncond: float = 0.0) -> Tensor:
    """The per-batch loss (a scalar) of Algorithms 1 and 3. All randomness comes from ``g``."""
    n, dev = x0.shape[0], stage.device
    if stage.num_classes and p_uncond > 0:
        drop = torch.rand(n, generator=g) < p_uncond
        labels = torch.where(drop, stage.num_classes, labels)
    if stage.is_super_resolution:
        levels = stage.augmentation.draw_levels(n, g)
        aug_noise = torch.randn(z0.shape, generator=g)
        cond = stage.conditioning(labels.to(dev), z0.to(dev), levels.to(dev), aug_noise.to(dev), corrupt=True)
    else:
        cond = stage.conditioning(labels.to(dev))
    t = stage.diffusion.sample_t(n, g)
    eps = torch.randn(x0.shape, generator=g)
    x0, t, eps = x0.to(dev), t.to(dev), eps.to(dev)
    xt = stage.diffusion.q_sample(x0, t, eps)
    if stage.config.train.channels_last:
        xt = xt.contiguous(memory_format=torch.channels_last)
    out = stage(xt, t, cond)
    return stage.diffusion.training_loss(out, x0, xt, t, eps).mean()


def lr_at(step: int, cfg: StageConfig) -> float:
    w = cfg.train.warmup_steps
    return cfg.train.lr * min(1.0, (step + 1) / w) if w > 0 else cfg.train.lr


@torch.no_grad()
def write_sample_grid(stage: Stage, data: ImageSet, path: Path, per_class: int = 4, max_n: int = 40) -> Path:
    """Samples of one stage (EMA weights): a row per class; SR stages get real low-res inputs
    (ground-truth conditioning at ``train.sample_level``) shown left of each output."""
    cfg = stage.config
    nc = max(stage.num_classes, 1)
    labels = torch.arange(nc).repeat_interleave(per_class)[:max_n]
    n = len(labels)
    noise = SeededNoise([derive_seed(cfg.train.seed, 7919, j) for j in range(n)], stage.device)
    if stage.is_super_resolution:
        # The first training images of each class, downsampled as in training.
        pick = torch.cat([torch.nonzero(data.labels == c).flatten()[:per_class] for c in range(nc)])[:n]
        labels = data.labels[pick]
        x = to_float(data.images[pick])
        z0 = downsample(x, cfg.lowres_resolution)
        lv = stage.augmentation.inference_levels(len(pick), cfg.train.sample_level)
        cond = stage.conditioning(labels.to(stage.device), z0.to(stage.device), lv.to(stage.device),
                                  noise.randn(*z0.shape[1:]), corrupt=True)
        inputs = z0
    else:
        cond = stage.conditioning(labels.to(stage.device))
        inputs = None
    grid = time_grid(stage.diffusion.T, cfg.train.sample_steps)
    x = noise.randn(stage.channels, stage.resolution, stage.resolution)
    x, _ = SAMPLERS["ancestral"](lambda a, t: stage(a, t, cond), stage.diffusion, x, grid, noise)
    return save_grid(x, path, nrow=2 * per_class if inputs is not None else per_class, inputs=inputs)


def train_stage(cfg: StageConfig, out_dir: str | Path, fresh: bool = False, progress: bool = True,
                data: ImageSet | None = None) -> Path:
    """Train (or resume) one stage into ``out_dir``; returns the last checkpoint's path."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    data = data if data is not None else load_dataset(cfg.data)
    cfg.data.class_names = data.class_names
    cfg.resolve(channels=data.images.shape[1], num_classes=data.num_classes)
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    g = torch.Generator().manual_seed(cfg.train.seed)

    stage = Stage(cfg).to(device)
    if cfg.train.channels_last:
        stage.net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(stage.net).requires_grad_(False)
    opt = torch.optim.AdamW(stage.net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    step = 0

    found = [] if fresh else list_checkpoints(out)
    if found:
        ckpt = load_checkpoint(found[-1][1])
        _check_same_model(to_dict(ckpt.config), to_dict(cfg), out)
        stage.net.load_state_dict(ckpt.model)
        ema.load_state_dict(ckpt.ema)
        opt.load_state_dict(ckpt.optimizer)
        torch.set_rng_state(ckpt.rng["torch"])
        g.set_state(ckpt.rng["data"])
        step = ckpt.step
    elif fresh and out.exists():
        for _, p in list_checkpoints(out):
            p.unlink()
        (out / "log.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(to_dict(cfg), indent=2)))

    batcher = Batcher(data, cfg, g)
    ema_stage = Stage(cfg, net=ema)
    tc = cfg.train

    def save(step: int) -> Path:
        p = save_checkpoint(checkpoint_path(out, step), Checkpoint(
            config=cfg, step=step, model=stage.net.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
            rng={"torch": torch.get_rng_state(), "data": g.get_state()}))
        prune_checkpoints(out, tc.keep_checkpoints)
        return p

    last = found[-1][1] if found else None
    if step >= tc.steps:
        return last
    stage.net.train()
    bar = tqdm(total=tc.steps, initial=step, disable=not progress, desc=cfg.name, dynamic_ncols=True,
               unit="step")
    log = open(out / "log.jsonl", "a")
    t_win, n_win, loss_win, gn_win = time.perf_counter(), 0, 0.0, 0.0
    try:
        while step < tc.steps:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            x0, z0, labels = batcher(tc.batch_size)
            loss = training_step_loss(stage, x0, z0, labels, g, tc.p_uncond)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {step + 1}; the last good checkpoint "
                                    f"({last}) is kept. Lower train.lr or raise train.warmup_steps, then resume")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = nn.utils.clip_grad_norm_(stage.net.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
            opt.step()
            step += 1
            ema_update(ema, stage.net, min(tc.ema_decay, (1 + step) / (10 + step)))
            n_win += tc.batch_size
            loss_win += loss.item()
            gn_win += float(gn)
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                k = tc.log_every if step % tc.log_every == 0 else (step % tc.log_every)
                dt = time.perf_counter() - t_win
                rec = {"step": step, "loss": loss_win / k, "grad_norm": gn_win / k,
                       "lr": opt.param_groups[0]["lr"], "img_per_s": n_win / dt, "time": time.time()}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
                t_win, n_win, loss_win, gn_win = time.perf_counter(), 0, 0.0, 0.0
            if step % tc.ckpt_every == 0 or step == tc.steps:
                last = save(step)
            if (tc.sample_every and step % tc.sample_every == 0) or step == tc.steps:
                ema.eval()
                write_sample_grid(ema_stage, data, out / "samples" / f"step-{step:08d}.png")
                t_win = time.perf_counter()  # sampling time is not training time
                n_win = 0
    finally:
        bar.close()
        log.close()
    return last

