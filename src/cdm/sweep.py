"""The paper's search over the augmentation level s (METHOD.md §2c), in both sampling modes,
and the same sweep with ground-truth low-resolution inputs (the paper's ablation).

For SR stage ``i`` and candidate levels ``S``, with ``conditioning = "generated"``:

- **non-truncated**: the stages below are sampled once to ``z_0`` (stored in ``lower-z0.npy``),
  and for every ``s`` the SR stage re-noises that same ``z_0`` — the mode's practical advantage;
- **truncated**: for every ``s`` the stage below is run from ``T`` down to ``s`` and its ``z_s``
  stored (``lower-zs-{s}.npy``); the stages further below are sampled once (``below.npy``).

With ``conditioning = "ground-truth"`` the SR stage is conditioned on *real* low-resolution
images instead (a seeded subset of a split, downsampled exactly as in training,
:func:`cdm.evaluate.ground_truth_lowres`), corrupted by the forward process at ``s``: the
non-truncated path with a real ``z_0``. It shows what augmentation costs when the input has no
generation errors to hide.

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
:func:`score_point` is that resumable score-one-point step on its own, for sample sets that are
not an SR stage's sweep (a single-stage baseline, say), so they can share the results file.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Union

import numpy as np
import torch
from torch import Tensor

from .cascade import Cascade, CascadeError, CascadeSampling, Mode
from .checkpoint import atomic_write
from .config import ConfigError
from .data import to_float, to_uint8
from .report import line_plot_svg
from .stage import Stage

# scorer(images [N, C, R, R] in [-1, 1], labels [N]) -> a value (lower is better) or named values
Scorer = Callable[[Tensor, Tensor], Union[float, Mapping[str, float]]]


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


# ----------------------------------------------------------------------------- files
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
    the old file or the new one, never half a line)."""
    path = Path(path)
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


def _save_tensor(path: Path, x: Tensor) -> None:
    atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), x.cpu().numpy(), allow_pickle=False))


def _load_tensor(path: Path, n: int) -> Tensor | None:
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


# Fields that rows written before they existed lack; such rows are taken to match any value.
_LENIENT = ("seed", "spacing", "fingerprint", "lower_fingerprints", "lower_steps", "lower_levels")


def _matches(row: dict, ident: dict) -> bool:
    for k, v in ident.items():
        if k not in row:
            if k == "conditioning" and v == Conditioning.GENERATED.value:
                continue  # rows from before ground-truth sweeps are generated-input rows
            if k in _LENIENT:
                continue
            return False
        if row[k] != v:
            return False
    return True


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


# ----------------------------------------------------------------------------- the sweep
def run_sweep(cascade: Cascade, sampling: CascadeSampling, cfg: SweepConfig, scorer: Scorer,
              out_dir: str | Path, metric_name: str, progress: Callable[[str], None] = print, *,
              primary: str | None = None, tags: dict | None = None,
              ground_truth: tuple[Tensor, Tensor] | None = None) -> list[dict]:
    """Score every (mode, level) of one SR stage; returns this sweep's result rows (old and new).

    ``scorer(images [N, C, R, R] in [-1, 1], labels [N])`` returns a float (lower is better) or a
    dict of metrics, of which ``primary`` (default: ``metric_name``) is the row's ``value``; all of
    them go into the row's ``metrics``. ``tags`` (JSON values) are added to every row and are part
    of its identity. ``ground_truth = (z0 [n, C, r, r] in [-1, 1], labels [n])`` gives the real
    inputs of ``conditioning = "ground-truth"`` (default: :func:`cdm.evaluate.ground_truth_lowres`
    of the SR stage's data set, ``cfg.ground_truth_split``, seeded with ``cfg.seed``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = len(cascade.stages)
    i = cfg.stage % k
    if i == 0 or not cascade.stages[i].is_super_resolution:
        raise CascadeError(f"stage {i} is the base stage; the sweep searches an SR stage's level (1..{k - 1})")
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
    st = sampling.stages
    seeds = list(range(cfg.seed, cfg.seed + cfg.n))
    ident = {**(tags or {}), "stage": i, "conditioning": cond.value, "metric": metric_name, "n": cfg.n,
             "seed": cfg.seed, "steps": st[i].steps, "sampler": sampling.sampler, "spacing": sampling.spacing,
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
        lower = _LowerSamples(cascade, sampling, cfg, i, labels, seeds, out, progress)
        ident.update(lower.identity)

    def sample(mode: Mode, s: int) -> tuple[Tensor, Tensor, Tensor]:
        z, corrupt = (z_gt, True) if lower is None else lower.inputs(mode, s)
        x = _batched(lambda sl: cascade.sample_stage(
            i, labels[sl], seeds[sl], st[i].steps, lowres=z[sl], level=s, corrupt=corrupt,
            sampler=sampling.sampler, spacing=sampling.spacing)[0], cfg.n, cfg.batch_size)
        return x.clamp(-1, 1), labels, z

    named = [v for v in (tags or {}).values() if isinstance(v, str)]  # readable sample file names
    for mode in modes:
        for s in cfg.levels:
            score_point(out, {**ident, "mode": mode.value, "level": s}, lambda: sample(mode, s), scorer,
                        metric_name=metric_name, primary=primary, keep_samples=cfg.keep_samples,
                        name="-".join([*named, cond.value, mode.value, f"s{s}"]), progress=progress)
    return [r for r in read_rows(out / "results.jsonl") if _matches(r, ident)]


def score_point(out_dir: str | Path, point: dict, sample: Callable[[], tuple[Tensor, Tensor, Tensor | None]],
                scorer: Scorer, *, metric_name: str, primary: str | None = None, keep_samples: bool = False,
                name: str = "point", progress: Callable[[str], None] = print) -> dict:
    """One point of a sweep (or any scored sample set), resumable: the row of ``out_dir/results.jsonl``
    that matches ``point`` (JSON values naming everything the samples depend on), else
    ``sample() -> (images [N, C, R, R] in [-1, 1], labels [N], low-res inputs or None)``, scored
    and added as a new row (``point`` + ``value``, ``metrics``, ``samples``, ``sample_s``,
    ``score_s``). With ``keep_samples`` the samples are saved first
    (``samples/{name}-{key}.npz``, uint8) and a later call scores them without sampling."""
    out = Path(out_dir)
    results_path = out / "results.jsonl"
    for r in read_rows(results_path):
        if _matches(r, point):
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
    value, metrics = _primary_value(scorer(x, labels), primary, metric_name)
    row = {**point, "value": value}
    if metrics is not None:
        row["metrics"] = metrics
    if keep_samples:
        row["samples"] = str(spath.relative_to(out))
    row.update(sample_s=round(t1 - t0, 2), score_s=round(time.perf_counter() - t1, 2))
    append_row(results_path, row)
    extra = "" if metrics is None else "  " + " ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and k != (primary or metric_name))
    progress(f"{name}  {metric_name}={value:.4f}{extra}")
    return row


def _key(point: dict) -> str:
    return hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:10]


def _batched(fn: Callable[[slice], Tensor], n: int, bs: int) -> Tensor:
    return torch.cat([fn(slice(a, min(n, a + bs))).cpu() for a in range(0, n, bs)])


def _default_ground_truth(cascade: Cascade, i: int, cfg: SweepConfig) -> tuple[Tensor, Tensor]:
    from .evaluate import ground_truth_lowres

    stage = cascade.stages[i]
    return ground_truth_lowres(stage.config.data, cfg.ground_truth_split, cfg.n, stage.lowres_resolution, cfg.seed)


class _LowerSamples:
    """The stages below SR stage ``i``, sampled once per input and cached in ``out`` under a
    manifest (``lower.json``) of what made them: weights, ``n``, seed, sampler, grid, steps, levels."""

    def __init__(self, cascade: Cascade, sampling: CascadeSampling, cfg: SweepConfig, i: int, labels: Tensor,
                 seeds: list[int], out: Path, progress: Callable[[str], None]):
        self.cascade, self.sampling, self.cfg, self.i = cascade, sampling, cfg, i
        self.labels, self.seeds, self.out, self.progress = labels, seeds, out, progress
        st = sampling.stages
        self.identity = {"lower_fingerprints": [stage_fingerprint(s) for s in cascade.stages[:i]],
                         "lower_steps": [s.steps for s in st[:i]], "lower_levels": [s.level for s in st[:i]]}
        manifest = {**self.identity, "n": cfg.n, "seed": cfg.seed, "sampler": sampling.sampler,
                    "spacing": sampling.spacing}
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

    def _run(self, j: int, lowres: Tensor | None, level: int, corrupt: bool, stop: int) -> Tensor:
        st, n, sp = self.sampling.stages, self.cfg.n, self.sampling
        return _batched(lambda sl: self.cascade.sample_stage(
            j, self.labels[sl], self.seeds[sl], st[j].steps, lowres=None if lowres is None else lowres[sl],
            level=level, corrupt=corrupt, stop=stop, sampler=sp.sampler, spacing=sp.spacing)[0], n,
            self.cfg.batch_size)

    def below(self) -> Tensor | None:
        """Stage ``i - 2``'s output (the same for every candidate), or None when ``i = 1``."""
        if self.i < 2:
            return None
        if self._below is None:
            path = self.out / "below.npy"
            self._below = _load_tensor(path, self.cfg.n)
            if self._below is None:
                self.progress(f"sampling stages 0..{self.i - 2} once")
                z = None
                for j in range(self.i - 1):
                    z = self._run(j, z, self.sampling.stages[j].level, True, 0).clamp(-1, 1)
                _save_tensor(path, z)
                self._below = z
        return self._below

    def inputs(self, mode: Mode, s: int) -> tuple[Tensor, bool]:
        """``(input of the SR stage, corrupt)`` at level ``s``: non-truncated, the clean ``z_0``
        (to be corrupted at ``s``); truncated, the stage below stopped at ``s`` (``z_s``, as is)."""
        j, lvl = self.i - 1, self.sampling.stages[self.i - 1].level
        name = "lower-z0.npy" if mode is Mode.NON_TRUNCATED else f"lower-zs-{s}.npy"
        z = _load_tensor(self.out / name, self.cfg.n)
        if z is None:
            stop = 0 if mode is Mode.NON_TRUNCATED else s
            self.progress(f"sampling stage {j} to z0 once" if stop == 0 and mode is Mode.NON_TRUNCATED
                          else f"sampling stage {j} down to s={s}")
            z = self._run(j, self.below(), lvl, True, stop)
            if stop == 0:
                z = z.clamp(-1, 1)
            _save_tensor(self.out / name, z)
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


def sweep_plot(rows: list[dict], metric_name: str, stage: int) -> str:
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        series.setdefault(condition_label(r), []).append((r["level"], r["value"]))
    return line_plot_svg(series, "augmentation level s", metric_name,
                         f"stage {stage}: {metric_name} against s (lower is better)")
