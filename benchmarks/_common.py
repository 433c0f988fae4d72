"""Shared pieces of the benchmark scripts: machine facts, a preset's training step, interleaved
timed repeats, summaries, tables and JSON output.

Every comparison runs its sides in one process, one repeat of each side after the other (the
order rotating between repeats), so that drift in the machine's speed (other jobs, clock changes)
hits all sides alike. Reported: the median and the min–max over repeats.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cdm.config import StageConfig, load_stage_config
from cdm.stage import Stage
from cdm.step import training_step_loss

PRESETS = "fmnist-base8,fmnist-sr8to32,fmnist-single32"


# ----------------------------------------------------------------------------- machine facts
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what :mod:`platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: well above 0 means other jobs shared the cores."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_facts() -> dict:
    """What the numbers depend on: CPU, cores, torch build and threads, load at the start."""
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "load_average_at_start": load_average(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def facts_line(facts: dict) -> str:
    load = facts.get("load_average_at_start")
    return (f"# {facts['cpu']} ({facts['machine']}), {facts['usable_cores']} usable cores, torch {facts['torch']}, "
            f"{facts['torch_threads']} threads" + (f", load average {load[0]:.2f}" if load else ""))


# ----------------------------------------------------------------------------- a preset's training step
def resolved_config(preset: str, overrides: Sequence[str] = ()) -> StageConfig:
    """A preset's config resolved for Fashion-MNIST (1 channel, 10 classes)."""
    cfg = load_stage_config(preset, list(overrides))
    cfg.resolve(channels=1, num_classes=10)
    return cfg


@dataclass
class SyntheticBatch:
    """Random training inputs at a stage's shapes: ``x0`` in [-1, 1], SR input ``z0``, labels."""
    x0: torch.Tensor
    z0: torch.Tensor | None
    labels: torch.Tensor

    @classmethod
    def for_config(cls, cfg: StageConfig, batch: int | None = None, device: str = "cpu") -> "SyntheticBatch":
        b, c = batch or cfg.train.batch_size, cfg.unet.in_channels
        x0 = torch.rand(b, c, cfg.resolution, cfg.resolution) * 2 - 1
        z0 = (torch.rand(b, c, cfg.lowres_resolution, cfg.lowres_resolution) * 2 - 1
              if cfg.is_super_resolution else None)
        labels = torch.randint(0, max(cfg.unet.num_classes, 1), (b,))
        return cls(x0.to(device), None if z0 is None else z0.to(device), labels.to(device))


@dataclass
class TrainStep:
    """One training step (loss, backward, AdamW step) as a closure, and its batch size."""
    step: Callable[[], None]
    batch_size: int


def optimizer_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """``loss_fn``'s training step with AdamW (lr 1e-4), as in training."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def cdm_train_step(preset: str, precision: str, channels_last: bool = False, overrides: Sequence[str] = (),
                   device: str = "cpu") -> TrainStep:
    """The training step of ``preset`` (with ``overrides``) at its batch size on synthetic inputs on
    ``device``: cdm's own :func:`cdm.train.training_step_loss` (times, noise, augmentation levels
    drawn from one seeded generator), in ``precision`` (``fp32`` or ``bf16`` autocast)."""
    cfg = resolved_config(preset, [*overrides, f"train.precision={precision}", f"train.channels_last={channels_last}"])
    torch.manual_seed(0)
    stage = Stage(cfg).to(device)
    if channels_last:
        stage.net.to(memory_format=torch.channels_last)
    batch = SyntheticBatch.for_config(cfg, device=device)
    g = torch.Generator().manual_seed(0)
    step = optimizer_step(stage.net, lambda: training_step_loss(stage, batch.x0, batch.z0, batch.labels, g))
    return TrainStep(step, cfg.train.batch_size)


# ----------------------------------------------------------------------------- timing
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_rates(cases: dict[str, tuple[Callable[[], None], int]], steps: int, repeats: int,
                      warmup: int = 3) -> dict[str, list[float]]:
    """Items per second of each case ``name -> (step, items per step)``.

    Every case first runs ``warmup`` untimed steps; then each repeat times ``steps`` steps of every
    case in turn, rotating the order by one case per repeat. Returns one rate per repeat."""
    for fn, _ in cases.values():
        for _ in range(warmup):
            fn()
    names = list(cases)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, items = cases[name]
            _sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync()
            rates[name].append(steps * items / (time.perf_counter() - t0))
    return rates


def summary(values: Sequence[float]) -> dict:
    """Median, min and max of a list of repeats (and the repeats themselves)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "repeats": list(values)}


def fmt(s: dict, digits: int = 0) -> str:
    """``median (min–max)``."""
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


# ----------------------------------------------------------------------------- output
def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table, so that it can be pasted into docs/BENCHMARKS.md."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print(flush=True)


def write_json(path: str, payload: dict) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path}")
