"""Stage checkpoints: one safetensors file holding tensors and a plain JSON config.

Nothing in a checkpoint is code: tensors (network, EMA, optimiser moments, RNG states) plus
string metadata (the resolved stage config, the step, the optimiser's hyper-parameters, a
format version and a SHA-256 checksum of all of it). Loading one never unpickles anything: a
pickle (a PyTorch ``.pt`` file, whatever its name) is refused before it is read, and a file whose
checksum does not match its contents is refused as corrupt. Files are written atomically
(temporary file, fsync, rename), so an interrupted write -- a killed process, a full disk --
leaves the previous checkpoint intact; they get the mode the user's umask gives (0644 by default).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import CdmError
from .files import atomic_write, current_umask, write_hint  # noqa: F401 (re-exported)
from .config import StageConfig, stage_config_from_json, to_dict

FORMAT = "cdm-stage"
FORMAT_VERSION = 3  # the only version read: files of any other are refused
_NAME = re.compile(r"^step-(\d+)\.safetensors$")


class CheckpointError(CdmError, ValueError):
    """A checkpoint is missing, corrupt, or of another format; the message says what to do."""


@dataclass
class Checkpoint:
    config: StageConfig
    step: int
    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    optimizer: dict | None = None  # torch optimizer state_dict, or None (weights only)
    rng: dict[str, Tensor] | None = None  # named RNG states (uint8 tensors)
    extra: dict | None = None  # small JSON-able training state (e.g. timings)
    ema_profiles: list[dict[str, Tensor]] | None = None  # power-function EMAs for post-hoc EMA (cdm.ema)


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files that writes interrupted by a killed process left in a run's
    ``checkpoints/`` (never a finished checkpoint); returns what was deleted."""
    d = checkpoint_dir(run_dir)
    stale = sorted(d.glob(".step-*.safetensors.*.tmp")) if d.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def checksum(tensors: dict[str, Tensor], meta: dict[str, str]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, and every metadata entry
    (both in sorted order); what a checkpoint's ``checksum`` entry holds."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    for k in sorted(meta):
        if k != "checksum":
            h.update(f"{k}={meta[k]}\n".encode())
    return "sha256:" + h.hexdigest()


def _flatten_optimizer(state: dict) -> tuple[dict[str, Tensor], dict]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, st in state["state"].items():
        plain["state"][str(idx)] = {}
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                plain["state"][str(idx)][k] = v
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, Tensor], plain: dict) -> dict:
    state: dict = {int(i): dict(v) for i, v in plain["state"].items()}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``path`` atomically, with a checksum. A failed write (e.g. a full disk)
    raises :class:`CheckpointError` and leaves any earlier file at ``path`` untouched."""
    tensors: dict[str, Tensor] = {}
    profiles = [(f"pema.{i}", sd) for i, sd in enumerate(ckpt.ema_profiles or [])]
    for prefix, sd in [("model", ckpt.model), ("ema", ckpt.ema), *profiles]:
        tensors.update({f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in sd.items()})
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
            "config": json.dumps(to_dict(ckpt.config)), "step": str(ckpt.step),
            "extra": json.dumps(ckpt.extra or {})}
    if ckpt.optimizer is not None:
        ot, plain = _flatten_optimizer(ckpt.optimizer)
        tensors.update(ot)
        meta["optimizer"] = json.dumps(plain)
    for k, v in (ckpt.rng or {}).items():
        tensors[f"rng.{k}"] = v.cpu().contiguous()
    meta["checksum"] = checksum(tensors, meta)
    try:
        atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {path} ({e}); earlier checkpoints are intact: "
                              f"{write_hint(e)}") from e
    return Path(path)


def check_not_pickle(path: Path) -> None:
    """Refuse, without unpickling it, a file that is not a safetensors file: a pickle or a PyTorch
    zip archive (``torch.save``), which could run code when loaded, or anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    n = int.from_bytes(head[:8], "little")
    if len(head) == 9 and head[8:9] == b"{" and 8 + n <= size:
        return  # a safetensors file: an 8-byte header length (whose first byte may well be 0x80), then JSON
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        raise CheckpointError(f"{path} is a pickle (a PyTorch .pt/.pth/.ckpt file), not a cdm checkpoint; cdm "
                              f"never unpickles files, because unpickling can run arbitrary code. cdm "
                              f"checkpoints are .safetensors files written by 'cdm train'")
    raise CheckpointError(f"{path} is not a readable cdm checkpoint (not a safetensors file); it may be "
                          f"truncated or corrupt: use an earlier checkpoint")


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    check_not_pickle(Path(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable cdm checkpoint ({e}); it may be truncated "
                              f"or corrupt: use an earlier checkpoint") from e


def _check_format(path: Path, meta: dict[str, str]) -> None:
    """Refuse a file that is not a cdm stage checkpoint of this cdm's format version."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cdm stage checkpoint (format {meta.get('format')!r})")
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(f"{path} has checkpoint format version {version}, not {FORMAT_VERSION}: it was "
                              f"written by another development version of cdm; retrain it or use the cdm "
                              f"version that wrote it")


def load_checkpoint(path: str | Path, weights_only: bool = False) -> Checkpoint:
    """Read a checkpoint file, or the newest one in a run directory or its ``checkpoints/``."""
    path = resolve_checkpoint_path(path)
    meta = read_metadata(path)
    _check_format(path, meta)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}): use an earlier checkpoint") from e
    if meta.get("checksum") != checksum(tensors, meta):
        raise CheckpointError(f"{path} is corrupt: its contents do not match its checksum; use an earlier "
                              f"checkpoint")
    groups: dict[str, dict[str, Tensor]] = {"model": {}, "ema": {}, "optim": {}, "rng": {}, "pema": {}}
    for k, v in tensors.items():
        head, rest = k.split(".", 1)
        groups[head][k if head == "optim" else rest] = v
    profiles: list[dict[str, Tensor]] = []
    for k, v in groups["pema"].items():  # "i.name"
        i, name = k.split(".", 1)
        profiles.extend({} for _ in range(int(i) + 1 - len(profiles)))
        profiles[int(i)][name] = v
    cfg = stage_config_from_json(meta["config"])
    optimizer = None
    if not weights_only and "optimizer" in meta:
        optimizer = _unflatten_optimizer(groups["optim"], json.loads(meta["optimizer"]))
    return Checkpoint(config=cfg, step=int(meta["step"]), model=groups["model"], ema=groups["ema"],
                      optimizer=optimizer, rng=groups["rng"] or None, extra=json.loads(meta.get("extra", "{}")),
                      ema_profiles=profiles or None)


def checkpoint_id(path: str | Path) -> str:
    """What identifies a checkpoint's contents without reading its tensors: its checksum."""
    path = resolve_checkpoint_path(path)
    meta = read_metadata(path)
    _check_format(path, meta)
    if not meta.get("checksum"):
        raise CheckpointError(f"{path} is corrupt: it has no checksum; use an earlier checkpoint")
    return meta["checksum"]


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of a run's checkpoints, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:08d}.safetensors"


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A file as is; a run directory (or its ``checkpoints/``) -> its newest checkpoint."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        run = p.parent if p.name == "checkpoints" else p
        found = newest_intact(run)
        if found:
            return found[0]
        raise CheckpointError(f"no checkpoints in {run}/checkpoints; train the stage first "
                              f"(cdm train ... --out {run})")
    raise CheckpointError(f"checkpoint {p} does not exist")


def prune_checkpoints(run_dir: str | Path, keep: int, protect: Path | None = None) -> None:
    """Delete all but the newest ``keep`` checkpoints, and never ``protect``."""
    found = list_checkpoints(run_dir)
    for _, p in found[:-keep] if keep > 0 else []:
        if p != protect:
            p.unlink(missing_ok=True)


def newest_intact(run_dir: str | Path, hint: str = "pass --fresh to start over") -> tuple[Path, Checkpoint] | None:
    """The newest checkpoint of a run that loads and passes its checksum, and its contents; a newer
    one that is truncated or corrupt is skipped with a warning. None if the run has none; if none
    is intact, a :class:`CheckpointError` ending in ``hint`` (what to do)."""
    found = list_checkpoints(run_dir)
    first: CheckpointError | None = None
    for i, (_, p) in enumerate(reversed(found)):
        try:
            return p, load_checkpoint(p)
        except CheckpointError as e:
            first = first or e
            if i + 1 < len(found):
                warnings.warn(f"skipping {p}: {e}; trying the checkpoint before it")
    if first is not None:
        raise CheckpointError(f"{first} (no checkpoint in {Path(run_dir) / 'checkpoints'} is intact: {hint})")
    return None


def load_stage(path: str | Path, device: torch.device | str = "cpu", use_ema: bool = True):
    """A :class:`~cdm.stage.Stage` ready to sample, with the EMA weights by default."""
    from .stage import Stage

    ckpt = load_checkpoint(path, weights_only=True)
    stage = Stage(ckpt.config)
    weights = ckpt.ema if (use_ema and ckpt.ema) or not ckpt.model else ckpt.model  # post-hoc EMA files: EMA only
    try:
        stage.net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the network its config describes: {e}") from e
    stage.net.eval()
    stage.step = ckpt.step
    stage.distill = (ckpt.extra or {}).get("distill")  # a distilled stage's sampling grid (cdm.distill)
    return stage.to(device)
