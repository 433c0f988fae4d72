"""The paper's search over the augmentation level s (docs/METHOD.md §2c), in both sampling modes,
and the same sweep with ground-truth low-resolution inputs (the paper's ablation).

For SR stage ``i`` and candidate levels ``S``, with ``conditioning = "generated"``:

- **non-truncated**: the stages below are sampled once to ``z_0`` (stored in ``lower-z0.npy``),
  and for every ``s`` the SR stage re-noises that same ``z_0`` — the mode's practical advantage;
- **truncated**: for every ``s`` the stage below is run from ``T`` down to ``s`` and its ``z_s``
  stored (``lower-zs-{s}.npy``); the stages further below are sampled once (``below.npy``).

With ``conditioning = "ground-truth"`` the SR stage is conditioned on *real* low-resolution
images instead (a seeded subset of a split, downsampled exactly as in training,
:func:`ground_truth_inputs`), corrupted by the forward process at ``s``: the
non-truncated path with a real ``z_0``. It shows what augmentation costs when the input has no
generation errors to hide.

With ``weights`` each level is also sampled at each classifier-free guidance weight (the (s, w)
grid); the base stage (``stage = 0``) has no level, and its sweep is over ``weights`` alone.

Each point (conditioning, mode, s) is scored by ``scorer(images, labels)``, which returns one
number (lower is better) or a dict of several, one of which (``primary``) ranks the levels. The
row is added to ``results.jsonl`` (rewritten atomically) as soon as it is scored, and carries
everything it depends on: fingerprints of the stages' weights, ``n``, the seed, sampler, steps and
grid, and the caller's ``tags``. A re-run skips the points already there and re-scores any whose
settings or weights changed, so an interrupted sweep resumes where it stopped and several sweeps
(of different SR stages, say) can share one directory and one results file. The lower stages'
samples are cached with a manifest (``lower.json``) of what made them, and thrown away when it
differs. With ``keep_samples`` each point's samples are saved (uint8 ``.npz`` under
``samples/``) before scoring, so a run killed while scoring does not sample again.
:func:`cdm.eval.ledger.score_point` is that resumable score-one-point step on its own, for
sample sets that are not an SR stage's sweep (a single-stage baseline, say).

:mod:`cdm.eval.search` is ``cdm sweep``: this engine with error bars, and the level it finds written into
the cascade file only when it wins beyond the noise.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..cascade import Cascade, CascadeError, Mode, SamplingPlan, StagePlan
from ..files import atomic_write
from ..config import ConfigError
from .ledger import Judge, load_tensor, matches, read_rows, save_tensor, score_point, stage_fingerprint, \
    tensor_fingerprint
from .reference import ReferenceSpec, load_reference


class Conditioning(str, enum.Enum):
    GENERATED = "generated"  # the stage below's samples (the paper's search)
    GROUND_TRUTH = "ground-truth"  # real low-resolution images (the paper's ablation)


@dataclass
class SweepConfig:
    stage: int = -1  # the SR stage whose level is searched (-1: the last)
    levels: list[int] = field(default_factory=lambda: [0, 50, 100, 200, 300, 500])
    # None: both modes with generated inputs; ground-truth inputs are always non-truncated
    modes: list[str] | None = None
    conditioning: str = "generated"  # Conditioning
    ground_truth_split: str = "train"  # real inputs come from here: keep them out of the test reference
    n: int = 500  # samples per candidate
    seed: int = 0  # sample j uses seed + j; also seeds the choice of ground-truth images
    batch_size: int = 250
    keep_samples: bool = False  # save each point's samples (samples/*.npz, uint8) before scoring
    weights: list[float] | None = None  # guidance weights searched jointly with s (None: the plan's weight only)
    metric: str = "fid"  # sweep_cascade ranks by fid or kid (each with its error bar)
    write_best: bool = True  # sweep_cascade writes a level into the cascade file only when it wins clearly

    def conditioning_kind(self) -> Conditioning:
        try:
            return Conditioning(self.conditioning)
        except ValueError:
            raise ConfigError(f"unknown conditioning {self.conditioning!r} (choose from "
                              f"{', '.join(c.value for c in Conditioning)})") from None

    def resolved_modes(self) -> list[Mode]:
        """The sampling modes to sweep; ground-truth conditioning allows only non-truncated."""
        gt = self.conditioning_kind() is Conditioning.GROUND_TRUTH
        names = self.modes if self.modes is not None else (["non-truncated"] if gt else
                                                           ["non-truncated", "truncated"])
        try:
            modes = [Mode(m) for m in names]
        except ValueError as e:
            raise ConfigError(f"sweep modes: {e} (choose from truncated, non-truncated)") from None
        if gt and Mode.TRUNCATED in modes:
            raise ConfigError("ground-truth conditioning corrupts real low-resolution images with the forward "
                              "process, which is the non-truncated mode; truncated mode needs the stage below's "
                              "reverse process. Sweep modes = ['non-truncated']")
        return modes


# ----------------------------------------------------------------------------- the sweep
def run_sweep(cascade: Cascade, plan: SamplingPlan, cfg: SweepConfig, judge: Judge, out_dir: str | Path,
              progress: Callable[[str], None] = print, *, tags: dict | None = None,
              ground_truth: tuple[Tensor, Tensor] | None = None) -> list[dict]:
    """Score every (mode, level, guidance weight) of one SR stage; returns this sweep's result rows
    (old and new). The base stage (``cfg.stage = 0``) has no input to augment: its sweep is over the
    guidance weights ``cfg.weights`` alone, each row at the plan's mode and the base's level (0).

    ``judge`` scores each point's samples (a value, lower is better, or several metrics of which
    ``judge.primary`` is the row's ``value``; all of them go into the row's ``metrics``). ``tags``
    (JSON values) are added to every row and are part of its identity. ``ground_truth = (z0 [n, C,
    r, r] in [-1, 1], labels [n])`` gives the real inputs of ``conditioning = "ground-truth"``
    (default: :func:`ground_truth_inputs` of the SR stage's data set, ``cfg.ground_truth_split``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = len(cascade.stages)
    i = cfg.stage % k
    if i == 0:
        if not cfg.weights:
            raise CascadeError(f"stage 0 is the base stage: it has no augmentation level to search; search its "
                               f"guidance weight (--weights W,...) or an SR stage's level (--stage-index 1..{k - 1})")
        if cfg.conditioning_kind() is Conditioning.GROUND_TRUTH:
            raise CascadeError("the base stage has no low-resolution input: ground-truth conditioning applies "
                               f"to an SR stage (--stage-index 1..{k - 1})")
        cfg = replace(cfg, levels=[plan.stages[0].level], modes=[Mode(plan.mode).value])
    elif not cascade.stages[i].is_super_resolution:
        raise CascadeError(f"stage {i} is not a super-resolution stage; the sweep searches an SR stage's level")
    cond = cfg.conditioning_kind()
    modes = cfg.resolved_modes()
    for m in modes:
        cascade.validate(m)
    for s in cfg.levels:
        try:
            cascade.stages[i].augmentation.check_level(s)
            if s >= cascade.stages[i - 1].diffusion.T and Mode.TRUNCATED in modes:
                raise ValueError(f"truncated mode needs s < {cascade.stages[i - 1].diffusion.T}")
        except ValueError as e:
            raise CascadeError(f"sweep level {s}: {e}") from None
    sp = plan.stages[i]
    seeds = list(range(cfg.seed, cfg.seed + cfg.n))
    ident = {**(tags or {}), "stage": i, "conditioning": cond.value, "metric": judge.name, "n": cfg.n,
             "seed": cfg.seed, "steps": sp.steps, "sampler": sp.sampler, "spacing": sp.spacing,
             "fingerprint": stage_fingerprint(cascade.stages[i])}
    if cond is Conditioning.GROUND_TRUTH:
        z_gt, labels = ground_truth if ground_truth is not None else _default_ground_truth(cascade, i, cfg)
        if len(z_gt) != cfg.n or len(labels) != cfg.n:
            raise CascadeError(f"ground-truth inputs: need {cfg.n} images and labels, "
                               f"got {len(z_gt)} and {len(labels)}")
        ident["ground_truth"] = tensor_fingerprint(z_gt, labels)
        lower = None
    else:
        z_gt, labels = None, torch.arange(cfg.n) % max(cascade.num_classes, 1)
        lower = _LowerSamples(cascade, plan, cfg, i, labels, seeds, out, progress) if i else None  # base: none below
        if lower is not None:
            ident.update(lower.identity)

    def sample(mode: Mode, s: int, w: float) -> tuple[Tensor, Tensor, Tensor | None]:
        z, corrupt = (z_gt, True) if lower is None else lower.inputs(mode, s)
        at_s = replace(sp, level=s, guidance=w)
        x = _batched(lambda sl: cascade.sample_stage(i, labels[sl], seeds[sl], at_s, lowres=None if z is None else z[sl],
                                                     corrupt=corrupt)[0], cfg.n, cfg.batch_size)
        return x.clamp(-1, 1), labels, z

    named = [v for v in (tags or {}).values() if isinstance(v, str)]  # readable sample file names
    for mode in modes:
        for s in cfg.levels:
            for w in cfg.weights or [sp.guidance]:
                gid = plan_identity(replace(sp, guidance=w))  # none at the defaults: older rows still match
                score_point(out, {**ident, "mode": mode.value, "level": s, **gid}, lambda: sample(mode, s, w), judge,
                            keep_samples=cfg.keep_samples, progress=progress,
                            name="-".join([*named, cond.value, mode.value, f"s{s}", *([f"w{w:g}"] if gid else [])]))
    return [r for r in read_rows(out / "results.jsonl") if matches(r, ident)]


def _batched(fn: Callable[[slice], Tensor], n: int, bs: int) -> Tensor:
    return torch.cat([fn(slice(a, min(n, a + bs))).cpu() for a in range(0, n, bs)])


def plan_identity(sp: StagePlan) -> dict:
    """The guidance (and churn) settings of a stage's plan that identify a point: none when they
    are the defaults, so points scored before these settings existed keep their identity."""
    d = StagePlan()
    keys = ("guidance", "guidance_interval", "threshold", "churn", "churn_interval", "start")
    return {k: getattr(sp, k) for k in keys} if any(getattr(sp, k) != getattr(d, k) for k in keys) else {}


def ground_truth_inputs(data, split: str, n: int, resolution: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Real low-resolution inputs for an SR stage (the paper's ground-truth conditioning): a
    seeded, class-stratified random subset of ``n`` images of ``split`` of the data set ``data``,
    made as training makes the stage's input (:meth:`ReferenceSet.inputs`).
    Returns ``(z0 float [n, C, resolution, resolution], labels int64 [n])``."""
    real = load_reference(data, ReferenceSpec(split=split, n=n, seed=seed))
    if len(real) != n:
        real = real.take(n, seed)
    return real.inputs(resolution), real.labels


def _default_ground_truth(cascade: Cascade, i: int, cfg: SweepConfig) -> tuple[Tensor, Tensor]:
    stage = cascade.stages[i]
    return ground_truth_inputs(stage.config.data, cfg.ground_truth_split, cfg.n, stage.lowres_resolution, cfg.seed)


class _LowerSamples:
    """The stages below SR stage ``i``, sampled once per input and cached in ``out`` under a
    manifest (``lower.json``) of what made them: weights, ``n``, seed, sampler, grid, steps, levels."""

    def __init__(self, cascade: Cascade, plan: SamplingPlan, cfg: SweepConfig, i: int, labels: Tensor,
                 seeds: list[int], out: Path, progress: Callable[[str], None]):
        self.cascade, self.plan, self.cfg, self.i = cascade, plan, cfg, i
        self.labels, self.seeds, self.out, self.progress = labels, seeds, out, progress
        st = plan.stages
        self.identity = {"lower_fingerprints": [stage_fingerprint(s) for s in cascade.stages[:i]],
                         "lower_steps": [s.steps for s in st[:i]], "lower_levels": [s.level for s in st[:i]],
                         "lower_samplers": [[s.sampler, s.spacing] for s in st[:i]]}
        if any(plan_identity(s) for s in st[:i]):
            self.identity["lower_guidance"] = [plan_identity(s) for s in st[:i]]
        manifest = {**self.identity, "n": cfg.n, "seed": cfg.seed}
        mpath = out / "lower.json"
        try:
            old = json.loads(mpath.read_text()) if mpath.exists() else None
        except json.JSONDecodeError:
            old = None
        if old != manifest:
            for p in [*out.glob("lower-*.npy"), out / "below.npy"]:
                p.unlink(missing_ok=True)
            atomic_write(mpath, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
        self._below: Tensor | None = None

    def _run(self, j: int, lowres: Tensor | None, stop: int) -> Tensor:
        plan = self.plan.stages[j]
        return _batched(lambda sl: self.cascade.sample_stage(
            j, self.labels[sl], self.seeds[sl], plan, lowres=None if lowres is None else lowres[sl], stop=stop)[0],
            self.cfg.n, self.cfg.batch_size)

    def below(self) -> Tensor | None:
        """Stage ``i - 2``'s output (the same for every candidate), or None when ``i = 1``."""
        if self.i < 2:
            return None
        if self._below is None:
            path = self.out / "below.npy"
            self._below = load_tensor(path, self.cfg.n)
            if self._below is None:
                self.progress(f"sampling stages 0..{self.i - 2} once")
                z = None
                for j in range(self.i - 1):
                    z = self._run(j, z, 0).clamp(-1, 1)
                save_tensor(path, z)
                self._below = z
        return self._below

    def inputs(self, mode: Mode, s: int) -> tuple[Tensor, bool]:
        """``(input of the SR stage, corrupt)`` at level ``s``: non-truncated, the clean ``z_0``
        (to be corrupted at ``s``); truncated, the stage below stopped at ``s`` (``z_s``, as is)."""
        j = self.i - 1
        name = "lower-z0.npy" if mode is Mode.NON_TRUNCATED else f"lower-zs-{s}.npy"
        z = load_tensor(self.out / name, self.cfg.n)
        if z is None:
            stop = 0 if mode is Mode.NON_TRUNCATED else s
            self.progress(f"sampling stage {j} to z0 once" if stop == 0 and mode is Mode.NON_TRUNCATED
                          else f"sampling stage {j} down to s={s}")
            z = self._run(j, self.below(), stop)
            if stop == 0:
                z = z.clamp(-1, 1)
            save_tensor(self.out / name, z)
        return z, mode is Mode.NON_TRUNCATED


def best_level(rows: list[dict], metric: str | None = None) -> dict:
    """The row with the lowest ``value`` (or ``metrics[metric]``); ties: the smaller s."""
    if metric is None:
        return min(rows, key=lambda r: (r["value"], r["level"]))
    have = [r for r in rows if np.isfinite(r.get("metrics", {}).get(metric, float("nan")))]
    if not have:
        raise ValueError(f"no row has a finite metric {metric!r}")
    return min(have, key=lambda r: (r["metrics"][metric], r["level"]))


def condition_label(row: dict) -> str:
    """How a row's inputs were made: ``truncated``, ``non-truncated`` or ``ground-truth``."""
    return Conditioning.GROUND_TRUTH.value if row.get("conditioning") == Conditioning.GROUND_TRUTH.value \
        else row["mode"]


# ----------------------------------------------------------------------------- rows
def weight(row: dict) -> float:
    """A row's guidance weight (rows without one were sampled unguided)."""
    return row.get("guidance", 0.0)


def _setting(mode: str, level: int, w: float) -> str:
    return f"{mode}, s = {level}" + (f", w = {w:g}" if w else "")


def describe(row: dict) -> str:
    """A row's setting in words: ``w = 1`` for the base stage, ``non-truncated, s = 100, w = 1`` above it."""
    return f"w = {weight(row):g}" if row.get("stage") == 0 else _setting(condition_label(row), row["level"], weight(row))
