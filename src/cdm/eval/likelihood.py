"""The cascade's variational bound on ``-log p(x0)``, in bits per dimension (docs/METHOD.md §3).

One stage (DDPM eq. 5, Improved DDPM eqs. 4-6), in bits per dimension of its own resolution::

    L = L_T(x0) + sum_{t = stop+1..T} L_{t-1},
    L_T     = KL(q(x_T | x0) || N(0, I))
    L_{t-1} = E_{x_t ~ q(x_t|x0)} KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))   (t > 1)
    L_0     = E_{x_1 ~ q(x_1|x0)} -log p(x0 | x1)   (discretised decoder, 8-bit data in [-1, 1])

``stop = 0`` is the full bound; ``stop = s > 0`` keeps the terms above ``s`` only: the part of a lower
stage whose reverse process the cascade truncates at ``s``. The terms come from
:meth:`GaussianDiffusion.prior_bpd` and :meth:`GaussianDiffusion.vlb_terms`, so a model with fixed
variance uses the posterior variance and a learned-sigma model its own.

The cascade, with each resolution's forward process run independently and the SR stage ``i``
conditioned at level ``s_i`` (``z^i_0 = downsample(x, R_i)``; the last stage has ``stop = 0``)::

    -log p(x) <= sum_i E_q[ L_T(z^i_0) + sum_{t > stop_i} L^i_{t-1}(z^i_0 | z^{i-1}_{s_i}) ],
    z^{i-1}_{s_i} ~ q(z_{s_i} | z^{i-1}_0)

- ``truncated`` (docs/METHOD.md §3): ``stop_i = s_{i+1}``; the latent is the lower stage's *forward-process*
  state ``z_s``, so the SR stage's augmentation must be that process (checked as
  :meth:`Cascade.validate` does for truncated sampling).
- ``non-truncated``: ``stop_i = 0`` (every stage's full bound, the lower stage's 8-bit ``z_0`` a
  discrete latent) and the SR stage conditioned on ``z_s ~ q_aug(z_s | z_0)``: the bound of the
  cascade sampled in non-truncated mode, valid for any augmentation.

Both condition the SR stage through :meth:`Stage.conditioning` with ``corrupt=True``, the training
path, so the network sees at evaluation what it saw in training. Every term is an expectation over
``q``; the estimators draw each term's ``x_t`` independently (unbiased: the sum of expectations does
not depend on how the draws are coupled). Image ``j`` depends only on its seed, never on its batch.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..cascade import Cascade, CascadeError, Mode, SamplingPlan
from ..cascade_file import load_cascade
from ..files import atomic_write
from ..data import DataError, downsample, to_float
from ..diffusion import GaussianDiffusion
from ..runlock import holding_lock
from ..samplers import SeededNoise, derive_seed
from .reference import ReferenceSpec, load_reference

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x_t [N, C, H, W], t [N]) -> raw network output


class Estimator(str, enum.Enum):
    EXACT = "exact"  # all T - stop terms, one network call per t
    MONTE_CARLO = "monte-carlo"  # (T - stop) * E_t[L_{t-1}] from t_samples uniform draws of t


# ----------------------------------------------------------------------------- one diffusion model
def _uniform_times(noise: SeededNoise, low: int, high: int, k: int) -> Tensor:
    """``[N, k]`` integers uniform on ``{low..high}``, row ``i`` from image ``i``'s generator."""
    return torch.stack([torch.randint(low, high + 1, (k,), generator=g) for g in noise.generators])


def _check_8bit(x0: Tensor) -> None:
    if not x0.numel():
        return
    levels = (x0.float() + 1) * 127.5
    off = (levels - levels.round()).abs().max().item()
    if off > 1e-3 or x0.min() < -1 - 1e-6 or x0.max() > 1 + 1e-6:
        raise ValueError("the decoder term -log p(x0 | x1) needs 8-bit data in [-1, 1] (to_float of uint8 "
                         f"images); got values {off / 127.5:.2g} off the 8-bit grid or outside [-1, 1]")


@torch.no_grad()
def diffusion_bound(model: ModelFn, diffusion: GaussianDiffusion, x0: Tensor, noise: SeededNoise,
                    stop: int = 0, t_samples: int | None = None) -> Tensor:
    """One diffusion model's bound ``L_T + sum_{t=stop+1..T} L_{t-1}`` (module docstring) in bits per
    dimension, per example ``[N]``.

    ``x0`` ``[N, C, H, W]`` (on the 8-bit grid when ``stop = 0``: the decoder term is discrete);
    ``model(x_t, t)`` returns the network's raw output; ``noise`` holds one generator per example.

    - ``t_samples=None``: the exact sum, one network call per ``t`` for the whole batch, each term
      with one draw ``x_t ~ q(x_t | x0)`` (drawn from ``t = T`` down, so the term at ``t`` sees the
      same noise whatever ``stop`` is).
    - ``t_samples=K``: ``L_T + (T - stop) / K * sum_k L_{t_k - 1}`` with ``t_k ~ U{stop+1..T}`` drawn
      per example; an unbiased estimate of the exact sum (``K`` network calls). Its variance is high
      where a few terms dominate (the t = 1 decoder; with the clipped cosine schedule also t = T): the
      standard errors of :meth:`CascadeBound.summary` show it. Use the exact sum for final numbers.
    """
    if x0.dim() != 4:
        raise ValueError(f"x0 must be [N, C, H, W], got {list(x0.shape)}")
    n, T = x0.shape[0], diffusion.T
    if len(noise.generators) != n:
        raise ValueError(f"noise has {len(noise.generators)} generators for {n} examples")
    if not 0 <= stop <= T:
        raise ValueError(f"stop must lie in [0, {T}], got {stop}")
    if t_samples is not None and t_samples < 1:
        raise ValueError(f"t_samples must be >= 1, got {t_samples}")
    if stop == 0:
        _check_8bit(x0)
    dev = x0.device
    total = diffusion.prior_bpd(x0).double()
    if stop == T:
        return total
    if t_samples is None:
        times = [torch.full((n,), t, dtype=torch.long) for t in range(T, stop, -1)]
        weight = 1.0
    else:
        times = list(_uniform_times(noise, stop + 1, T, t_samples).T)
        weight = (T - stop) / t_samples
    for t in times:
        t = t.to(dev)
        xt = diffusion.q_sample(x0, t, noise.randn(*x0.shape[1:]).to(x0.dtype))
        total += weight * diffusion.vlb_terms(model(xt, t), x0, xt, t).double()
    return total


# ----------------------------------------------------------------------------- the cascade
@dataclass
class StageBound:
    """One stage's share of the cascade bound, per image."""
    name: str
    resolution: int
    dims: int  # C * H * W at this stage's resolution
    level: int  # augmentation level s of its low-resolution input (0 for the base)
    stop: int  # its terms are t = stop+1..T (the next stage's s when truncated, else 0)
    steps: int  # T
    bits: Tensor  # [N] float64, bits per image

    @property
    def bpd(self) -> Tensor:
        """``[N]`` bits per dimension of this stage's own resolution."""
        return self.bits / self.dims


@dataclass
class CascadeBound:
    stages: list[StageBound]
    mode: Mode
    estimator: Estimator
    t_samples: int | None

    @property
    def dims(self) -> int:
        """C * H * W of the final image."""
        return self.stages[-1].dims

    @property
    def total_bits(self) -> Tensor:
        """``[N]`` the bound on ``-log2 p(x)`` per image: the sum of the stages' bits."""
        return torch.stack([s.bits for s in self.stages]).sum(0)

    @property
    def bpd(self) -> Tensor:
        """``[N]`` the bound in bits per dimension of the final image."""
        return self.total_bits / self.dims

    def summary(self) -> dict:
        """Means over the images and their standard errors (``std / sqrt(N)``: they include the
        estimator's own noise, as each image's estimate is independent)."""
        stages = []
        for s in self.stages:
            bits, bits_se = mean_se(s.bits)
            stages.append({"name": s.name, "resolution": s.resolution, "dims": s.dims, "level": s.level,
                           "terms": f"L_T + t={s.stop + 1}..{s.steps}" if s.stop < s.steps else "L_T",
                           "bits": bits, "bits_se": bits_se, "bpd": bits / s.dims, "bpd_se": bits_se / s.dims})
        bits, bits_se = mean_se(self.total_bits)
        return {"n_images": len(self.total_bits), "mode": self.mode.value, "estimator": self.estimator.value,
                "t_samples": self.t_samples, "stages": stages,
                "total": {"dims": self.dims, "bits": bits, "bits_se": bits_se,
                          "bpd": bits / self.dims, "bpd_se": bits_se / self.dims}}


def mean_se(x: Tensor) -> tuple[float, float]:
    """Mean of ``[N]`` values and its standard error (0 for one value)."""
    n = x.numel()
    return x.mean().item(), (x.std().item() / math.sqrt(n) if n > 1 else 0.0)


def stage_images(images: Tensor, resolution: int) -> Tensor:
    """uint8 ``[N, C, R, R]`` -> float ``[N, C, r, r]`` in [-1, 1] on the 8-bit grid: the image a stage
    of resolution ``r`` models, made by :func:`downsample` (as in training, rounded to 8 bits)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 [N, C, R, R], got {images.dtype}")
    return to_float(downsample(images, resolution))


def check_bound_levels(cascade: Cascade, levels: list[int], mode: Mode | str) -> None:
    """Raise :class:`CascadeError` unless the cascade's bound at ``levels`` (one per stage, 0 for
    the base) in ``mode`` is defined."""
    mode = Mode(mode)
    truncated = mode is Mode.TRUNCATED and any(levels[1:])
    try:
        cascade.validate(Mode.TRUNCATED if truncated else None, levels)
    except CascadeError as e:
        why = (" (the truncated bound conditions each SR stage on the forward-process state z_s of the "
               "stage below, so its augmentation must be that process)") if truncated else ""
        raise CascadeError(f"cannot compute the {mode.value} likelihood bound{why}: {e}") from None


@torch.no_grad()
def cascade_bound(cascade: Cascade, data, levels: list[int],
                  mode: Mode | str = Mode.TRUNCATED, t_samples: int | None = None, seed: int = 0,
                  batch_size: int = 64, progress: bool = False) -> CascadeBound:
    """The cascade's bound on ``-log p(x | c)`` for real images (module docstring).

    ``data``: real images, ``data.images`` uint8 ``[N, C, R, R]`` at the data resolution and
    ``data.labels`` ``[N]`` (an :class:`ImageSet` or a :class:`ReferenceSet`); ``levels`` one per
    stage (0 for the base); ``t_samples`` None for the exact sum, else the Monte-Carlo estimator with
    that many ``t`` per image and stage. Image ``j`` uses seed ``seed + j`` only."""
    from tqdm.auto import tqdm

    images, labels = data.images, data.labels
    mode = Mode(mode)
    check_bound_levels(cascade, levels, mode)
    n = images.shape[0]
    if images.dim() != 4 or labels.shape != (n,):
        raise ValueError(f"need images [N, C, R, R] and labels [N], got {list(images.shape)} and {list(labels.shape)}")
    top = cascade.stages[-1]
    if images.shape[1] != top.channels or images.shape[-1] < top.resolution:
        raise DataError(f"images {list(images.shape[1:])} cannot feed the cascade: it needs {top.channels}-channel "
                        f"images of at least {top.resolution}px")
    cascade.check_labels(labels)
    seeds = list(range(seed, seed + n))
    k = len(cascade.stages)
    stops = [levels[i + 1] if mode is Mode.TRUNCATED and i + 1 < k else 0 for i in range(k)]
    bits: list[list[Tensor]] = [[] for _ in range(k)]
    for b in tqdm(range(0, n, batch_size), disable=not progress, desc="nll", dynamic_ncols=True):
        x, seed = images[b:b + batch_size], seeds[b:b + batch_size]
        lower: Tensor | None = None  # the stage below's clean image z_0
        for i, stage in enumerate(cascade.stages):
            dev = stage.device
            x0 = stage_images(x, stage.resolution).to(dev)
            lab = labels[b:b + batch_size].to(dev)
            if stage.is_super_resolution:
                lv = stage.augmentation.inference_levels(len(x), levels[i]).to(dev)
                aug = SeededNoise([derive_seed(s, i, 1) for s in seed], dev).randn(*lower.shape[1:])
                cond = stage.conditioning(lab, lower.to(dev), lv, noise=aug, corrupt=True)
            else:
                cond = stage.conditioning(lab)
            noise = SeededNoise([derive_seed(s, i) for s in seed], dev)
            bpd = diffusion_bound(lambda x_, t_: stage(x_, t_, cond), stage.diffusion, x0, noise,
                                  stop=stops[i], t_samples=t_samples)
            bits[i].append(bpd.cpu() * x0[0].numel())
            lower = x0
    parts = [StageBound(name=st.config.name, resolution=st.resolution,
                        dims=st.channels * st.resolution ** 2, level=levels[i], stop=stops[i],
                        steps=st.diffusion.T, bits=torch.cat(bits[i]))
             for i, st in enumerate(cascade.stages)]
    return CascadeBound(stages=parts, mode=mode, t_samples=t_samples,
                        estimator=Estimator.EXACT if t_samples is None else Estimator.MONTE_CARLO)


# ----------------------------------------------------------------------------- data and reports
def bound_table(summary: dict) -> str:
    """A Markdown table of :meth:`CascadeBound.summary`."""
    est = summary["estimator"] + (f", {summary['t_samples']} t per image" if summary["t_samples"] else "")
    rows = [f"Variational bound on -log p(x), {summary['n_images']} images, {summary['mode']}, {est} "
            f"(± one standard error).", "",
            "| stage | resolution | level s | terms | bits | bits/dim (own resolution) |",
            "|---|---|---|---|---|---|"]
    for s in summary["stages"]:
        rows.append(f"| {s['name']} | {s['resolution']} | {s['level']} | {s['terms']} | "
                    f"{s['bits']:.1f} ± {s['bits_se']:.1f} | {s['bpd']:.4f} ± {s['bpd_se']:.4f} |")
    t = summary["total"]
    rows.append(f"| **total** | {summary['stages'][-1]['resolution']} | | | {t['bits']:.1f} ± {t['bits_se']:.1f} | "
                f"**{t['bpd']:.4f} ± {t['bpd_se']:.4f}** |")
    hint = noise_hint(summary)
    return "\n".join(rows) + "\n" + (f"\n{hint}\n" if hint else "")


def noise_hint(summary: dict) -> str:
    """A warning when the bound's standard error is large (over 2% of it), saying what lowers it."""
    t = summary["total"]
    if t["bpd_se"] <= 0.02 * abs(t["bpd"]):
        return ""
    fix = (f"raise --t-samples (now {summary['t_samples']}; the error falls as 1/sqrt(K)) or drop it for the "
           f"exact sum" if summary["t_samples"] else "evaluate more images (--n)")
    return (f"Note: the standard error ({t['bpd_se']:.3g} bits/dim) is {100 * t['bpd_se'] / abs(t['bpd']):.0f}% of "
            f"the bound: {fix}.")


def write_bound(summary: dict, out_dir: str | Path) -> list[Path]:
    """Write ``nll.json`` and ``nll.md`` (:func:`bound_table`) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "nll.json", out / "nll.md"]
    atomic_write(paths[0], lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    atomic_write(paths[1], lambda tmp: Path(tmp).write_text(bound_table(summary)))
    return paths


@dataclass
class NllConfig:
    """What ``cdm nll`` evaluates and how."""
    reference: ReferenceSpec = field(default_factory=lambda: ReferenceSpec(n=1000))  # the real images
    levels: list[int] | None = None  # one per SR stage or one per stage (0 for the base); None: the plan's
    mode: str | None = None  # truncated or non-truncated; None: the cascade file's, else truncated (the paper's bound)
    t_samples: int | None = None  # None: the exact sum; K: Monte-Carlo with K times per image and stage
    seed: int = 0  # image j uses seed + j
    batch_size: int = 64
    device: str = "auto"
    progress: bool = True


NLL_MODE = "truncated"  # the bound without a cascade file: docs/METHOD.md section 3's


def _levels(k: int, given: list[int] | None, plan: SamplingPlan | None) -> list[int]:
    if not given:
        return plan.levels if plan is not None else [0] * k
    if len(given) not in (1, k) or (len(given) == 1 and k == 1 and given[0]):
        raise CascadeError(f"--level needs one value for every super-resolution stage or {k} values "
                           f"(0 for the base stage), got {len(given)}")
    return [0] + given * (k - 1) if len(given) == 1 else list(given)


@holding_lock("evaluating the likelihood")
def evaluate_nll(checkpoints: list[Path], plan: SamplingPlan | None, cfg: NllConfig, out_dir: str | Path) -> dict:
    """``cdm nll``: the cascade's bound on real images (``cfg.reference`` of the last stage's data:
    the held-out split by default, a random class-stratified subset of ``n``), at the levels and mode
    of ``plan`` (a cascade file's; None for stages named one by one: levels 0, :data:`NLL_MODE`)
    unless ``cfg`` overrides them. Writes ``nll.json`` and ``nll.md``; returns the summary with
    ``table`` (Markdown) and ``written`` (paths)."""
    cascade = load_cascade(checkpoints, cfg.device)
    levels = _levels(len(cascade.stages), cfg.levels, plan)
    mode = cfg.mode or (plan.mode if plan is not None else NLL_MODE)
    data = cascade.stages[-1].config.data
    real = load_reference(data, cfg.reference)
    n = len(real)
    if cfg.reference.n > n:
        raise DataError(f"asked for {cfg.reference.n} images, but {real.source} holds {n}")
    bound = cascade_bound(cascade, real, levels, mode, t_samples=cfg.t_samples,
                          seed=cfg.seed, batch_size=cfg.batch_size, progress=cfg.progress)
    summary = {**bound.summary(), "levels": levels, "images": real.source, "images_fingerprint": real.fingerprint,
               "seed": cfg.seed, "stages_from": [str(p) for p in checkpoints]}
    written = write_bound(summary, out_dir)
    return {**summary, "table": bound_table(summary), "written": [str(p) for p in written]}
