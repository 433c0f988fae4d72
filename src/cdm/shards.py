"""Large sample runs (e.g. 50,000 samples for FID) in shards: resumable, spread over processes or
machines, and independent of how the work was split.

Sample ``j`` depends only on its seed ``seed + j`` and its label (:class:`~cdm.samplers.SeededNoise`),
so a run of ``n`` samples is cut into ``k`` contiguous shards that can be sampled anywhere, in any
order and any number of times, and merged into the ``samples.npz`` one process would have
written. A sharded run directory holds::

    manifest.json        what is sampled: the stage checkpoints (with their checksums), the
                         sampling plan, n, seed, every label, each shard's range, and the run id
                         (a hash of all of that)
    shard-0000.npz       shard 0, samples [start, stop): stage{i} uint8 [m, C, R_i, R_i], labels,
                         seeds and the run id it was sampled for (a shard of another run is refused)
    samples.npz          the merge: stage{i} uint8 [n, C, R_i, R_i] and labels, as `cdm sample` writes
    stage{i}-{R}px.png   a grid of the first samples of each stage

Every file is written atomically, so a killed process leaves no partial shard, and re-running
the same command samples only the shards that are missing.

:func:`sample_run` is ``cdm sample``: one process writing ``samples.npz``, or a sharded run when
shards are asked for or the command runs under ``torchrun``. Either way it writes the cascade
file it sampled (``cascade.json``) beside the samples.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .errors import CdmError
from .cascade import Cascade, SamplingPlan
from .cascade_file import CASCADE_FILE, load_cascade, write_cascade_file
from .checkpoint import atomic_write, checkpoint_id
from .config import to_dict
from .data import to_float
from .images import save_grid
from .distributed import env_rank
from .runlock import run_lock
from .generate import cycle_labels, resolve_classes, sample_arrays, sample_batched, save_npz, write_samples

MANIFEST = "manifest.json"
FORMAT = "cdm-sample-shards"
PREVIEW = 100  # samples per stage in the merged run's grids


class ShardError(CdmError, ValueError):
    """A sharded sample run cannot go on; the message says what to do."""


def shard_range(n: int, num_shards: int, index: int) -> tuple[int, int]:
    """Shard ``index``'s samples ``[start, stop)`` of ``n`` split into ``num_shards`` near-equal parts."""
    return index * n // num_shards, (index + 1) * n // num_shards


def shard_path(out: str | Path, index: int) -> Path:
    """Where shard ``index`` of the run in ``out`` is written."""
    return Path(out) / f"shard-{index:04d}.npz"


def make_manifest(checkpoints: list[str | Path], plan: SamplingPlan, labels: torch.Tensor, seed: int,
                  num_shards: int) -> dict:
    """The description of a sharded run of ``len(labels)`` samples (labels ``[n]``, seeds
    ``seed .. seed + n - 1``) of the cascade made of ``checkpoints`` (files, base first)."""
    n = len(labels)
    if not 1 <= num_shards <= n:
        raise ShardError(f"--num-shards must lie in [1, {n}] (the number of samples), got {num_shards}")
    m = {"format": FORMAT, "version": 2,
         "stages": [{"path": str(Path(p).resolve()), "id": checkpoint_id(p)} for p in checkpoints],
         "sampling": to_dict(plan), "n": n, "seed": seed, "labels": [int(v) for v in labels],
         "num_shards": num_shards,
         "shards": [{"index": i, "start": a, "stop": b, "file": shard_path("", i).name}
                    for i in range(num_shards) for a, b in [shard_range(n, num_shards, i)]]}
    return {**m, "run_id": run_id(m)}


def run_id(manifest: dict) -> str:
    """16 hex digits over what a run's samples depend on: the checkpoints' checksums, the plan, the
    seeds, the labels and the split into shards."""
    what = {k: manifest[k] for k in ("sampling", "n", "seed", "labels", "num_shards")}
    what["stages"] = [s["id"] for s in manifest["stages"]]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(out: str | Path) -> dict:
    """The manifest of the sharded run in ``out``."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{out} holds no {MANIFEST}; start the run with 'cdm sample ... --num-shards K --out {out}'")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is corrupt ({e}); delete it and the shards, and start again") from e
    if m.get("format") != FORMAT:
        raise ShardError(f"{path} is not a cdm sharded-run manifest")
    return m


def open_run(out: str | Path, manifest: dict) -> dict:
    """Write ``manifest`` into ``out``, or check that the one there describes the same run (the
    same checkpoints by checksum, settings, samples and split). A manifest no finished shard
    depends on is replaced."""
    out = Path(out)
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        diffs = [k for k in manifest if k != "stages" and old.get(k) != manifest[k]]
        if [s["id"] for s in old.get("stages", [])] != [s["id"] for s in manifest["stages"]]:
            diffs.insert(0, "stage checkpoints")
        if not diffs:
            return old
        if any(shard_done(out, old, s["index"]) for s in old["shards"]):
            raise ShardError(f"{out} holds a sharded run with other {', '.join(diffs)}; use another --out, "
                             f"or repeat that run's options to resume it")
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=1)
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(text))
    return manifest


def shard_done(out: str | Path, manifest: dict, index: int) -> bool:
    """Whether shard ``index`` is on disk, complete, holding exactly its seeds. A complete shard
    sampled for another run (another cascade, plan or labels) raises :class:`ShardError`."""
    p = shard_path(out, index)
    if not p.is_file():
        return False
    sh = manifest["shards"][index]
    want = list(range(manifest["seed"] + sh["start"], manifest["seed"] + sh["stop"]))
    try:
        with np.load(p, allow_pickle=False) as z:
            if z["seeds"].tolist() != want:
                return False
            found = str(z["run_id"]) if "run_id" in z.files else "none"
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False
    if found != manifest.get("run_id"):
        raise ShardError(f"{p} was sampled for another run (run id {found}, this run's is {manifest.get('run_id')}: "
                         f"another cascade, plan or labels); move it out of {Path(out)} and re-run to sample it again")
    return True


def missing_shards(out: str | Path, manifest: dict) -> list[int]:
    """The indices of the run's shards that are not finished, in order."""
    return [s["index"] for s in manifest["shards"] if not shard_done(out, manifest, s["index"])]


def run_shards(cascade: Cascade, plan: SamplingPlan, manifest: dict, out: str | Path,
               indices: Iterable[int], batch_size: int = 64, progress: bool = False) -> list[Path]:
    """Sample the shards ``indices`` of the run ``manifest`` describes, skipping finished ones;
    returns the files written."""
    written = []
    k, seed = manifest["num_shards"], manifest["seed"]
    for i in indices:
        if not 0 <= i < k:
            raise ShardError(f"shard {i} does not exist: the run has shards 0..{k - 1}")
        if shard_done(out, manifest, i):
            continue
        a, b = manifest["shards"][i]["start"], manifest["shards"][i]["stop"]
        seeds = list(range(seed + a, seed + b))
        result = sample_batched(cascade, torch.tensor(manifest["labels"][a:b], dtype=torch.long), seeds, plan,
                                batch_size, progress)
        written.append(save_npz(shard_path(out, i), {**sample_arrays(result), "seeds": np.array(seeds, np.int64),
                                                     "run_id": np.array(manifest["run_id"])}))
    return written


def merge_shards(out: str | Path) -> Path:
    """Concatenate a finished run's shards into ``samples.npz`` (and a grid per stage); returns its path."""
    out = Path(out)
    m = read_manifest(out)
    missing = missing_shards(out, m)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ShardError(f"{out}: {len(missing)} of {m['num_shards']} shards are not finished ({shown}); run "
                         f"them with the same 'cdm sample' options (add --shard I for one), then merge")
    parts = []
    for s in m["shards"]:
        with np.load(shard_path(out, s["index"]), allow_pickle=False) as z:
            parts.append({k: z[k] for k in z.files if k not in ("seeds", "run_id")})
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    path = save_npz(out / "samples.npz", merged)
    for key in sorted(k for k in merged if k.startswith("stage")):
        imgs = merged[key][:PREVIEW]
        res = imgs.shape[-1]
        save_grid(to_float(torch.from_numpy(imgs)), out / f"{key}-{res}px.png", nrow=10)
    return path


def merge_run(out: str | Path) -> Path:
    """``cdm merge``: :func:`merge_shards` under the run directory's lock (refused while a process
    samples into it), after checking that ``out`` is a sharded run."""
    out = Path(out)
    if not out.is_dir():
        raise ShardError(f"{out} is not a directory: give the --out of 'cdm sample --num-shards K'")
    if not (out / MANIFEST).is_file() and (out / "samples.npz").is_file():
        raise ShardError(f"{out} holds a sample run that was not sharded (its samples.npz is whole): there is "
                         f"nothing to merge")
    read_manifest(out)
    with run_lock(out, "merging"):
        return merge_shards(out)


@dataclass
class SampleRequest:
    """What ``cdm sample`` is asked for (the cascade and its plan come separately)."""
    n: int = 100  # samples
    classes: list[int | str] | None = None  # classes (indices or names) to cycle through (default: every class)
    seed: int = 0  # sample j uses seed + j
    batch_size: int = 64
    device: str = "auto"
    precision: str | None = None  # "bf16" or "fp32"; default: what each stage was trained in
    num_shards: int | None = None  # a sharded run of this many shards (default under torchrun: world size)
    shard: int | None = None  # sample only this shard
    progress: bool = True  # a progress bar (in images) on stderr


def sample_run(checkpoints: list[Path], plan: SamplingPlan, request: SampleRequest, out: str | Path) -> dict:
    """Sample the cascade ``checkpoints`` (files, base first) as ``plan`` says into ``out``; returns
    ``{"written": [paths], "samples": samples.npz or None, "missing": [shards not yet done],
    "cascade": cascade file}``. Sharded when ``request.num_shards`` is set or under ``torchrun``
    (rank r takes shards r, r + world size, ...); resumable then."""
    r = request
    if r.shard is not None and r.num_shards is None:
        raise ShardError("--shard I needs --num-shards K")
    cascade = load_cascade(checkpoints, r.device, r.precision)
    labels = cycle_labels(r.n, cascade.num_classes, resolve_classes(r.classes, cascade.class_names))
    out = Path(out)
    rank, size, _ = env_rank()
    sharded = r.num_shards is not None or size > 1
    # one plain run per directory; the workers of a sharded run share it (and refuse a plain run)
    with run_lock(out, "sampling", shared=sharded):
        cascade_file = out / CASCADE_FILE
        if rank == 0:
            write_cascade_file(cascade_file, checkpoints, plan)
        if not sharded:
            result = sample_batched(cascade, labels, list(range(r.seed, r.seed + r.n)), plan, r.batch_size,
                                    r.progress)
            written = write_samples(result, cascade, out)
            return {"written": written, "samples": out / "samples.npz", "missing": [], "cascade": cascade_file}
        k = r.num_shards or size
        indices = [r.shard] if r.shard is not None else range(rank, k, size)
        manifest = open_run(out, make_manifest(checkpoints, plan, labels, r.seed, k))
        written = run_shards(cascade, plan, manifest, out, indices, r.batch_size, r.progress)
        missing = missing_shards(out, manifest)
        return {"written": written, "samples": None if missing else merge_shards(out), "missing": missing,
                "cascade": cascade_file}
