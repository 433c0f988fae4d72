"""One training step's maths: the batch, its randomness and its loss (the paper's Algorithms 1 and 3).

- :class:`Batcher` draws a global batch (and, with ``train.crop``, aligned SR crops);
- :func:`draw_step_noise` draws the step's per-example randomness (:class:`StepNoise`: labels
  dropped, augmentation levels and noise, ``t``, the diffusion's noise) for the *global* batch and
  keeps this process's rows, so that a multi-process or gradient-accumulated step is the
  single-process step;
- :func:`step_conditioning` makes the network's conditioning from it (the path sampling uses too),
  :func:`batch_loss` the mean loss, :func:`accumulate_gradients` the forward and backward passes of
  one optimiser step in ``train.grad_accum`` micro-batches;
- :func:`lr_at` is the learning rate of a step.

:mod:`cdm.train` runs these in its loop; :mod:`cdm.distill` reuses the batch and its conditioning.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .config import StageConfig
from .data import ImageSet, crop, stage_input
from .recipe import loss_weight, lr_factor
from .stage import Stage


@dataclass(frozen=True)
class BatchDraw:
    """What a batch's draw from the run's generator decided for this process's rows: which images
    (``rows`` ``[b]``, indices into the data set), which are flipped (``flip`` ``[b]`` bool or None)
    and each crop's corner in low-res pixels (``corners`` ``[b, 2]`` or None)."""

    rows: Tensor
    flip: Tensor | None
    corners: Tensor | None

    def same(self, other: "BatchDraw") -> bool:
        return all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                   for a, b in ((self.rows, other.rows), (self.flip, other.flip), (self.corners, other.corners)))


class Batcher:
    """Draws training batches from an :class:`ImageSet` (in memory, or a prepared set read on
    demand) with the run's generator, whose state goes into checkpoints, so a resumed run sees the
    same batches. Each process reads only its own rows of the global batch.

    :meth:`prefetch` makes the next step's batch in a background thread while this step computes
    (``data.workers`` threads; prepared sets only, whose rows come from disk). It draws on a copy of
    the generator, which it never advances: the next call draws for real and takes the prefetched
    batch only if the draws agree (they do when nothing else drew from the generator in between),
    else makes it itself. So prefetching never changes which images a step sees."""

    def __init__(self, data: ImageSet, cfg: StageConfig, generator: torch.Generator):
        self.data, self.cfg, self.g = data, cfg, generator
        self.workers = cfg.data.workers if data.prepared is not None else 0
        self._pool = self._readers = None
        self._pending: tuple[BatchDraw, Future] | None = None

    def draw(self, batch_size: int, part: slice, g: torch.Generator) -> BatchDraw:
        """The draws of a global batch of ``batch_size`` from ``g`` (every process draws the whole batch,
        so all advance ``g`` alike), kept for rows ``part``."""
        cfg = self.cfg
        idx = torch.randint(len(self.data), (batch_size,), generator=g)
        flip = torch.rand(batch_size, generator=g) < 0.5 if cfg.data.flip else None
        c, f = cfg.train.crop, cfg.resolution // max(cfg.lowres_resolution, 1)
        corners = torch.randint((cfg.resolution - c) // f + 1, (batch_size, 2), generator=g) if c else None
        return BatchDraw(idx[part], None if flip is None else flip[part], None if corners is None else corners[part])

    def make(self, d: BatchDraw) -> tuple[Tensor, Tensor | None, Tensor]:
        """The batch a draw names: ``(x0 [b, C, R, R], z0 [b, C, r, r] or None, labels [b])`` in [-1, 1]."""
        cfg = self.cfg
        x = self._read(d.rows)  # uint8: only this process's rows are read
        if d.flip is not None:
            x = torch.where(d.flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x0 = stage_input(x, cfg.resolution)
        z0 = stage_input(x, cfg.lowres_resolution) if cfg.is_super_resolution else None
        if d.corners is not None:
            c, f = cfg.train.crop, cfg.resolution // cfg.lowres_resolution
            x0, z0 = crop(x0, d.corners * f, c), crop(z0, d.corners, c // f)
        return x0, z0, self.data.labels[d.rows]

    def _read(self, rows: Tensor) -> Tensor:
        k = min(self.workers, len(rows))
        if k <= 1:
            return self.data.images[rows]
        if self._readers is None:
            self._readers = ThreadPoolExecutor(self.workers, thread_name_prefix="cdm-read")
        parts = torch.tensor_split(rows, k)  # the rows read by k threads at once (a disk serves them in parallel)
        return torch.cat(list(self._readers.map(self.data.images.__getitem__, parts)))

    def __call__(self, batch_size: int, part: slice = slice(None)) -> tuple[Tensor, Tensor | None, Tensor]:
        """Rows ``part`` of a global batch of ``batch_size``: ``(x0 [B, C, R, R], z0 [B, C, r, r] or
        None, labels [B])`` in [-1, 1]. The generator draws for the whole global batch, so every
        process of a multi-process run advances it alike and sees its own slice of one batch.

        With ``train.crop = c`` (SR stages) ``x0`` is a random ``c x c`` window of each image and
        ``z0`` the same window of its low-res input, ``[B, C, c/f, c/f]`` with ``f = R / r``: both are
        made whole, exactly as without crops, and then cut at a corner that is a multiple of ``f``,
        so a crop's conditioning is exactly the part of the whole image's that covers it. Augmentation
        then corrupts the crop's ``z0`` (Gaussian noise is per pixel, so this is the whole input's
        corruption cut to the window; a blur sees the window's edge as an image border)."""
        d = self.draw(batch_size, part, self.g)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0].same(d):
            return pending[1].result()
        return self.make(d)

    def prefetch(self, batch_size: int, part: slice = slice(None)) -> None:
        """Start making the batch the next call will draw, if the generator is not drawn from meanwhile."""
        if not self.workers:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cdm-prefetch")
        ahead = torch.Generator().set_state(self.g.get_state())
        d = self.draw(batch_size, part, ahead)
        self._pending = (d, self._pool.submit(self.make, d))

    def close(self) -> None:
        """Stop the background threads (a pending batch is dropped)."""
        for pool in (self._pool, self._readers):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._readers = None
        self._pending = None


@dataclass
class StepNoise:
    """The per-example randomness of a training step (Algorithms 1 and 3) for ``n`` rows of a batch."""

    drop: Tensor | None  # [n] bool: label replaced by "no class" (None without label dropout)
    levels: Tensor | None  # [n] augmentation levels (SR stages)
    aug_noise: Tensor | None  # [n, C, r, r] the augmentation's noise (SR stages)
    t: Tensor  # [n] diffusion times
    eps: Tensor  # [n, C, R, R] the diffusion's noise

    def __getitem__(self, rows: slice) -> "StepNoise":
        return StepNoise(*(None if v is None else v[rows] for v in (getattr(self, f.name) for f in fields(self))))


def draw_step_noise(stage: Stage, x0: Tensor, z0: Tensor | None, g: torch.Generator, p_uncond: float = 0.0,
                    rank: int = 0, world_size: int = 1) -> StepNoise:
    """The randomness of the training step on ``x0`` ``[n, C, R, R]`` (and ``z0``), rows ``[rank * n,
    (rank + 1) * n)`` of a global batch of ``n * world_size``: every draw from ``g`` is made for the
    global batch and sliced, so every process advances ``g`` alike and the processes' rows make up
    the single-process step."""
    n = x0.shape[0]
    part, big = slice(rank * n, (rank + 1) * n), n * world_size
    drop = (torch.rand(big, generator=g) < p_uncond)[part] if stage.num_classes and p_uncond > 0 else None
    levels = aug_noise = None
    if stage.is_super_resolution:
        levels = stage.augmentation.draw_levels(big, g)[part]
        aug_noise = torch.randn((big, *z0.shape[1:]), generator=g)[part]
    t = stage.diffusion.sample_t(big, g)[part]
    eps = torch.randn((big, *x0.shape[1:]), generator=g)[part]
    return StepNoise(drop, levels, aug_noise, t, eps)


def training_step_loss(stage: Stage, x0: Tensor, z0: Tensor | None, labels: Tensor,
                       g: torch.Generator, p_uncond: float = 0.0, rank: int = 0, world_size: int = 1) -> Tensor:
    """The per-batch loss (a scalar) of Algorithms 1 and 3. All randomness comes from ``g``.

    ``x0`` ``[n, C, R, R]`` (and ``z0``, ``labels``) are rows ``[rank * n, (rank + 1) * n)`` of a
    global batch of ``n * world_size``: the random draws are made for the global batch and
    sliced, so the mean of the ranks' losses is the single-process loss of the whole batch."""
    return batch_loss(stage, x0, z0, labels, draw_step_noise(stage, x0, z0, g, p_uncond, rank, world_size))


def step_conditioning(stage: Stage, z0: Tensor | None, labels: Tensor, noise: StepNoise) -> dict:
    """The network's conditioning for a training step's rows: ``labels`` ``[n]`` with the step's
    dropped labels replaced by "no class", and for an SR stage ``z0`` ``[n, C, r, r]`` corrupted at
    the step's augmentation levels with its augmentation noise."""
    dev = stage.device
    if noise.drop is not None:
        labels = torch.where(noise.drop, stage.num_classes, labels)
    if stage.is_super_resolution:
        return stage.conditioning(labels.to(dev), z0.to(dev), noise.levels.to(dev), noise.aug_noise.to(dev),
                                  corrupt=True)
    return stage.conditioning(labels.to(dev))


def batch_loss(stage: Stage, x0: Tensor, z0: Tensor | None, labels: Tensor, noise: StepNoise) -> Tensor:
    """The mean loss (a scalar) of Algorithms 1 and 3 over ``x0`` ``[n, C, R, R]`` (``z0``, ``labels``),
    given the step's randomness for these rows."""
    dev = stage.device
    cond = step_conditioning(stage, z0, labels, noise)
    x0, t, eps = x0.to(dev), noise.t.to(dev), noise.eps.to(dev)
    xt = stage.diffusion.q_sample(x0, t, eps)
    tc = stage.config.train
    if tc.channels_last:
        xt = xt.contiguous(memory_format=torch.channels_last)
    out = stage(xt, t, cond)
    weight = loss_weight(stage.diffusion.snr(t), stage.diffusion.prediction, tc.loss_weight, tc.min_snr_gamma)
    return stage.diffusion.training_loss(out, x0, xt, t, eps, weight).mean()


def accumulate_gradients(stage: Stage, x0: Tensor, z0: Tensor | None, labels: Tensor, noise: StepNoise,
                         micro: int) -> Tensor:
    """The forward and backward passes of one optimiser step over this process's rows ``x0`` ``[n, C,
    R, R]`` (``z0``, ``labels``) of the global batch, in ``micro`` equal micro-batches; returns the
    rows' mean loss (detached). ``noise`` is the step's randomness for these rows
    (:func:`draw_step_noise`, drawn once for the global batch), split among the micro-batches, and
    each micro-batch's loss is scaled by ``1 / micro``, so the accumulated gradient is the rows'
    mean-loss gradient. Under DDP the gradients are averaged over the processes at the last
    micro-batch only (``no_sync`` before it)."""
    m, losses = x0.shape[0] // micro, []
    for j in range(micro):
        rows = slice(j * m, (j + 1) * m)
        last = j == micro - 1 or not isinstance(stage.net, DistributedDataParallel)
        with contextlib.nullcontext() if last else stage.net.no_sync():
            loss = batch_loss(stage, x0[rows], None if z0 is None else z0[rows], labels[rows], noise[rows])
            (loss / micro).backward()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


def lr_at(step: int, cfg: StageConfig) -> float:
    """The learning rate of optimiser step ``step`` (0-based)."""
    tc = cfg.train
    return tc.lr * lr_factor(step, tc.steps, tc.warmup_steps, tc.lr_schedule)
