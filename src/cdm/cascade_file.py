"""The cascade file: which stage checkpoints make a cascade, and its :class:`SamplingPlan`.

A cascade file is JSON; checkpoint paths are relative to the file (or absolute)::

    {"stages": ["base", "sr"],
     "sampling": {"mode": "non-truncated",
                  "stages": [{"steps": 25, "level": 0, "sampler": "dpmpp-2m-sde", "spacing": "uniform"},
                             {"steps": 25, "level": 100, "sampler": "dpmpp-2m-sde", "spacing": "uniform"}]}}

``sampling.sampler`` and ``sampling.spacing`` may also be given once, for every stage that does
not name its own. ``cdm demo`` and ``cdm sample`` write one; ``cdm sample/eval/sweep/nll
--cascade FILE`` read it, and ``cdm sweep`` writes the level it found back into it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .cascade import Cascade, SamplingPlan, StagePlan
from .checkpoint import atomic_write, load_stage, resolve_checkpoint_path
from .config import PRECISIONS, ConfigError, from_dict, to_dict
from .distributed import pick_device

CASCADE_FILE = "cascade.json"  # the name `cdm sample` and `cdm demo` give it in their output folder


def load_cascade(checkpoints: list[str | Path], device: torch.device | str = "auto",
                 precision: str | None = None) -> Cascade:
    """Build and validate a cascade from stage checkpoints (files or run directories), base first.
    ``device`` "auto" picks this process's GPU if there is one; ``precision`` ("auto", "bf16" autocast
    or "fp32": ``train.precision``) overrides the precision each stage was trained in."""
    if precision not in (None, *PRECISIONS):
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = pick_device(device) if isinstance(device, str) else device
    stages = [load_stage(p, dev) for p in checkpoints]
    for st in stages:
        st.precision = precision or st.precision
    return Cascade(stages)


def read_cascade_file(path: str | Path) -> tuple[list[Path], SamplingPlan]:
    """``(stage checkpoint paths, sampling plan)`` of a cascade file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cascade file {path} does not exist (cdm sample and cdm demo write one: "
                          f"OUT/{CASCADE_FILE})")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot parse cascade file {path}: {e}") from e
    if not isinstance(d, dict) or "stages" not in d or set(d) - {"stages", "sampling"}:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise ConfigError(f"cascade file {path} must hold 'stages' (checkpoint paths) and 'sampling' "
                          f"(see docs/SAMPLING.md, 'Cascade files'); found {keys}")
    samp = dict(d.get("sampling", {}))
    shared = {k: samp.pop(k) for k in ("sampler", "spacing") if k in samp}  # defaults for every stage
    stages = [from_dict(StagePlan, {**shared, **s}, prefix="sampling.stages.") for s in samp.pop("stages", [])]
    plan = from_dict(SamplingPlan, samp, prefix="sampling.")
    plan.stages = stages
    if len(stages) != len(d["stages"]):
        raise ConfigError(f"cascade file {path} names {len(d['stages'])} stages but plans {len(stages)}")
    return [(path.parent / p) for p in d["stages"]], plan


def write_cascade_file(path: str | Path, checkpoints: list[str | Path], plan: SamplingPlan) -> Path:
    """Write a cascade file, its checkpoint paths relative to the file (``../runs/base/...``), so that
    a folder holding the file and the runs can be moved or copied whole; absolute only where no
    relative path exists (another drive)."""
    path = Path(path)
    rel = []
    for p in checkpoints:
        p = Path(p).resolve()
        try:
            rel.append(Path(os.path.relpath(p, path.parent.resolve())).as_posix())
        except ValueError:
            rel.append(str(p))
    text = json.dumps({"stages": rel, "sampling": to_dict(plan)}, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def resolve_cascade(cascade_file: str | Path | None, stages: list[str | Path]) -> tuple[list[Path], SamplingPlan]:
    """``(checkpoint files, plan)`` from a cascade file or from stage checkpoints (base first; the
    plan is then :meth:`SamplingPlan.uniform`'s default). Exactly one of the two must be given."""
    if bool(cascade_file) == bool(stages):
        raise ConfigError("pass either --cascade FILE or one --stage CHECKPOINT per stage (base first)")
    if cascade_file:
        paths, plan = read_cascade_file(cascade_file)
    else:
        paths, plan = [Path(p) for p in stages], SamplingPlan.uniform(len(stages))
    return [resolve_checkpoint_path(p) for p in paths], plan
