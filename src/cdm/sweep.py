"""The paper's search over the augmentation level s (METHOD.md §2c), in both sampling modes.

For SR stage ``i`` and candidate levels ``S``:

- **non-truncated**: the stages below are sampled once to ``z_0`` (stored in ``lower-z0.npz``),
  and for every ``s`` the SR stage re-noises that same ``z_0`` — the mode's practical advantage;
- **truncated**: for every ``s`` the stage below is run from ``T`` down to ``s`` and its ``z_s``
  stored (``lower-zs-{s}.npz``); the stages further below are sampled once.

Each (mode, s) is scored with one metric (lower is better) and appended to ``results.jsonl`` as
soon as it is done, so an interrupted sweep resumes where it stopped. The best s can be written
into the cascade file's sampling settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .cascade import Cascade, CascadeError, CascadeSampling, Mode
from .checkpoint import atomic_write
from .report import line_plot_svg


@dataclass
class SweepConfig:
    stage: int = -1  # the SR stage whose level is searched (-1: the last)
    levels: list[int] = field(default_factory=lambda: [0, 50, 100, 200, 300, 500])
    modes: list[str] = field(default_factory=lambda: ["non-truncated", "truncated"])
    n: int = 500  # samples per candidate
    seed: int = 0
    batch_size: int = 250


def _save_tensor(path: Path, x: Tensor) -> None:
    atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), x.cpu().numpy(), allow_pickle=False))


def _load_tensor(path: Path) -> Tensor | None:
    if not path.exists():
        return None
    try:
        return torch.from_numpy(np.load(path, allow_pickle=False))
    except (OSError, ValueError):
        return None  # a damaged intermediate is recomputed


def _batched(fn: Callable[[slice], Tensor], n: int, bs: int) -> Tensor:
    return torch.cat([fn(slice(a, min(n, a + bs))).cpu() for a in range(0, n, bs)])


def run_sweep(cascade: Cascade, sampling: CascadeSampling, cfg: SweepConfig, scorer: Callable[[Tensor, Tensor], float],
              out_dir: str | Path, metric_name: str, progress: Callable[[str], None] = print) -> list[dict]:
    """Score every (mode, level) for one SR stage; returns all result rows (old and new).
    ``scorer(images [N, C, R, R] in [-1, 1], labels [N]) -> float``, lower is better."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = len(cascade.stages)
    i = cfg.stage % k
    if i == 0 or not cascade.stages[i].is_super_resolution:
        raise CascadeError(f"stage {i} is the base stage; the sweep searches an SR stage's level (1..{k - 1})")
    modes = [Mode(m) for m in cfg.modes]
    for m in modes:
        cascade.validate(m)
    for s in cfg.levels:
        try:
            cascade.stages[i].augmentation.check_level(s)
            if s >= cascade.stages[i - 1].diffusion.T and Mode.TRUNCATED in modes:
                raise ValueError(f"truncated mode needs s < {cascade.stages[i - 1].diffusion.T}")
        except ValueError as e:
            raise CascadeError(f"sweep level {s}: {e}") from None
    nc = max(cascade.num_classes, 1)
    labels = torch.arange(cfg.n) % nc
    seeds = list(range(cfg.seed, cfg.seed + cfg.n))
    st = sampling.stages
    results_path = out / "results.jsonl"
    rows = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()] \
        if results_path.exists() else []
    done = {(r["mode"], r["level"]) for r in rows if r.get("metric") == metric_name and r.get("n") == cfg.n
            and r.get("stage") == i}

    def run(j: int, lowres: Tensor | None, level: int, corrupt: bool, stop: int) -> Tensor:
        return _batched(lambda sl: cascade.sample_stage(
            j, labels[sl], seeds[sl], st[j].steps, lowres=None if lowres is None else lowres[sl], level=level,
            corrupt=corrupt, stop=stop, sampler=sampling.sampler, spacing=sampling.spacing)[0], cfg.n, cfg.batch_size)

    # The stages below i-1 are the same for every candidate: sample them once (non-truncated, at
    # their configured levels), and keep the result.
    below = _load_tensor(out / "below.npy") if i >= 2 else None
    if i >= 2 and below is None:
        progress(f"sampling stages 0..{i - 2} once")
        below = None
        for j in range(i - 1):
            below = run(j, below, st[j].level, True, 0).clamp(-1, 1)
        _save_tensor(out / "below.npy", below)
    lower_level = st[i - 1].level

    for mode in modes:
        for s in cfg.levels:
            if (mode.value, s) in done:
                continue
            if mode is Mode.NON_TRUNCATED:
                z = _load_tensor(out / "lower-z0.npy")
                if z is None:
                    progress(f"sampling stage {i - 1} to z0 once")
                    z = run(i - 1, below, lower_level, True, 0).clamp(-1, 1)
                    _save_tensor(out / "lower-z0.npy", z)
                x = run(i, z, s, True, 0)
            else:
                z = _load_tensor(out / f"lower-zs-{s}.npy")
                if z is None:
                    progress(f"sampling stage {i - 1} down to s={s}")
                    z = run(i - 1, below, lower_level, True, s)
                    if s == 0:
                        z = z.clamp(-1, 1)
                    _save_tensor(out / f"lower-zs-{s}.npy", z)
                x = run(i, z, s, False, 0)
            value = float(scorer(x.clamp(-1, 1), labels))
            row = {"stage": i, "mode": mode.value, "level": s, "metric": metric_name, "value": value, "n": cfg.n,
                   "steps": st[i].steps, "sampler": sampling.sampler}
            rows.append(row)
            with open(results_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            progress(f"{mode.value:14s} s={s:5d}  {metric_name}={value:.4f}")
    return [r for r in rows if r.get("metric") == metric_name and r.get("n") == cfg.n and r.get("stage") == i]


def best_level(rows: list[dict]) -> dict:
    """The row with the lowest value (ties: the smaller s)."""
    return min(rows, key=lambda r: (r["value"], r["level"]))


def sweep_plot(rows: list[dict], metric_name: str, stage: int) -> str:
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        series.setdefault(r["mode"], []).append((r["level"], r["value"]))
    return line_plot_svg(series, "augmentation level s", metric_name,
                         f"stage {stage}: {metric_name} against s (lower is better)")
