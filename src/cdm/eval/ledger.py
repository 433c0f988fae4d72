"""A resumable ledger of scored sample sets: ``results.jsonl`` rows that name everything their
samples depend on, shared by ``cdm sweep`` and the experiments.

A row is found again by its identity (:func:`matches`): a re-run skips what is already scored
and re-scores anything whose settings or weights changed, so a killed job resumes where it
stopped and several jobs can share one results file. The file is rewritten atomically at every
row, so it never holds half a line. :func:`score_point` is the score-one-sample-set step;
fingerprints identify weights (:func:`stage_fingerprint`) and tensors (:func:`tensor_fingerprint`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Union

import numpy as np
import torch
from torch import Tensor

from ..files import atomic_write
from ..data import to_float, to_uint8
from ..stage import Stage

# scorer(images [N, C, R, R] in [-1, 1], labels [N]) -> a value (lower is better) or named values
Scorer = Callable[[Tensor, Tensor], Union[float, Mapping[str, float]]]


@dataclass
class Judge:
    """What scores a sample set: ``fn`` (a :data:`Scorer`); ``name`` labels the rows' ``metric``;
    when ``fn`` returns several metrics, ``primary`` (default: ``name``) is the one that ranks."""
    fn: Scorer
    name: str
    primary: str | None = None


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a ``results.jsonl`` (none if it does not exist; unreadable lines are skipped)."""
    path = Path(path)
    rows = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append_row(path: str | Path, row: dict) -> None:
    """Add one row to a ``results.jsonl``, rewriting the file atomically (a killed process leaves
    the old file or the new one, never half a line). Processes appending to the same file at once
    (e.g. two parts of one study on one machine) take turns on ``PATH.lock``, so no row is lost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / (path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, however the process ends
        old = path.read_text() if path.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        text = old + json.dumps(row) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_samples(path: str | Path, images: Tensor, labels: Tensor, lowres: Tensor | None = None) -> Path:
    """Write samples atomically as a compressed ``.npz``: ``images`` uint8 ``[N, C, R, R]`` and
    ``labels`` ``[N]`` (and the low-resolution ``lowres`` inputs, uint8, if given); float images
    in ``[-1, 1]`` are quantised with :func:`cdm.data.to_uint8`."""
    arrays = {"images": _uint8(images).numpy(), "labels": labels.cpu().numpy()}
    if lowres is not None:
        arrays["lowres"] = _uint8(lowres).numpy()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(Path(path), write)
    return Path(path)


def load_samples(path: str | Path) -> dict[str, Tensor] | None:
    """The arrays of a :func:`save_samples` file, or None if it is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError, KeyError):
        return None


def _uint8(x: Tensor) -> Tensor:
    return x.cpu() if x.dtype == torch.uint8 else to_uint8(x.cpu())


def save_tensor(path: Path, x: Tensor) -> None:
    atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), x.cpu().numpy(), allow_pickle=False))


def load_tensor(path: Path, n: int) -> Tensor | None:
    if not path.exists():
        return None
    try:
        x = torch.from_numpy(np.load(path, allow_pickle=False))
    except (OSError, ValueError):
        return None  # a damaged intermediate is recomputed
    return x if x.shape[0] == n else None


# ----------------------------------------------------------------------------- identities
def tensor_fingerprint(*tensors: Tensor) -> str:
    """12 hex digits of a SHA-256 over the tensors' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def stage_fingerprint(stage: Stage) -> str:
    """What identifies a stage's weights (and so its samples): a hash of its network's tensors."""
    sd = stage.module.state_dict()
    return tensor_fingerprint(*(sd[k] for k in sorted(sd)))


def matches(row: dict, ident: dict) -> bool:
    """Whether ``row`` was made with every setting in ``ident`` (a row lacking one does not match)."""
    return all(k in row and row[k] == v for k, v in ident.items())


def _primary_value(result: float | Mapping[str, float], primary: str | None, metric_name: str
                   ) -> tuple[float, dict | None]:
    """``(value that ranks the levels, all metrics or None)`` of a scorer's result."""
    if isinstance(result, Mapping):
        key = primary or metric_name
        if key not in result:
            raise ValueError(f"the scorer returned metrics {sorted(result)}; pass primary= one of them "
                             f"(the one that ranks the levels)")
        metrics = json.loads(json.dumps(dict(result), default=float))
        return float(result[key]), metrics
    return float(result), None




def score_point(out_dir: str | Path, point: dict, sample: Callable[[], tuple[Tensor, Tensor, Tensor | None]],
                judge: Judge, *, keep_samples: bool = False, name: str = "point",
                progress: Callable[[str], None] = print) -> dict:
    """One point of a sweep (or any scored sample set), resumable: the row of ``out_dir/results.jsonl``
    that matches ``point`` (JSON values naming everything the samples depend on), else
    ``sample() -> (images [N, C, R, R] in [-1, 1], labels [N], low-res inputs or None)``, scored
    and added as a new row (``point`` + ``value``, ``metrics``, ``samples``, ``sample_s``,
    ``score_s``). With ``keep_samples`` the samples are saved first
    (``samples/{name}-{key}.npz``, uint8) and a later call scores them without sampling."""
    out = Path(out_dir)
    results_path = out / "results.jsonl"
    for r in read_rows(results_path):
        if matches(r, point):
            return r
    t0 = time.perf_counter()
    spath = out / "samples" / f"{name}-{_key(point)}.npz"
    kept = load_samples(spath) if keep_samples else None
    if kept is not None:
        x, labels = to_float(kept["images"]), kept["labels"]
    else:
        x, labels, lowres = sample()
        if keep_samples:
            x = to_float(to_uint8(x))  # score what is saved, so a resumed run scores the same
            save_samples(spath, x, labels, lowres)
    t1 = time.perf_counter()
    value, metrics = _primary_value(judge.fn(x, labels), judge.primary, judge.name)
    row = {**point, "value": value}
    if metrics is not None:
        row["metrics"] = metrics
    if keep_samples:
        row["samples"] = str(spath.relative_to(out))
    row.update(sample_s=round(t1 - t0, 2), score_s=round(time.perf_counter() - t1, 2))
    append_row(results_path, row)
    extra = "" if metrics is None else "  " + " ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and k != (judge.primary or judge.name))
    progress(f"{name}  {judge.name}={value:.4f}{extra}")
    return row


def _key(point: dict) -> str:
    return hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:10]

