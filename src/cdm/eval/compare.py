"""``cdm eval --compare A B``: which of two cascades is better, or that the scores cannot tell.

Both cascades sample the same ``n`` images — sample ``j`` from seed ``seed + j`` with the same
label — and both final outputs are scored against the same reference. The standard error of each
difference comes from a *paired* bootstrap (:func:`paired_verdicts`): every resample draws the
same sample indices for A and B, so what the two share (seeds, labels, often stages) cancels
instead of being counted twice. Each metric's verdict follows the one rule of
:mod:`cdm.eval.verdict` (beyond twice the SE of the difference); when FID and KID lean opposite
ways, the comparison says so and which, if either, is beyond the noise. The real-vs-real floor
and the small-reference warning of :mod:`cdm.eval.floor` come with every feature space.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np

from ..cascade import CascadeError, SamplingPlan
from ..cascade_file import CASCADE_FILE, load_cascade, resolve_cascade
from ..files import atomic_write
from ..config import ConfigError, to_dict
from ..data import to_uint8
from ..generate import cycle_labels, sample_batched, write_samples
from ..images import save_grid
from ..metrics import fid_bootstrap, kid_bootstrap
from ..runlock import holding_lock
from .features import ReferenceFeatures, make_extractor, reference_features
from .floor import floor_images, real_floor, small_reference_warning
from .quality import EvalConfig, check_overlap
from .scores import quality_scores, ref_stats
from .reference import load_reference
from .report import Report
from .verdict import NOISE_SE, Verdict, disagreement, verdict

NAMES = ("A", "B")


def resolve_side(path: str | Path, overrides: dict | None = None) -> tuple[list[Path], SamplingPlan]:
    """``(checkpoint files, plan)`` of one side of a comparison: a cascade file (``.json``), a
    directory holding one (``cdm sample``'s or ``cdm sweep``'s output), or one stage's checkpoint
    or run directory (a one-stage cascade); the plan flags ``overrides`` (None keeps a setting)
    apply to it as to ``--cascade``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--compare: {p} does not exist; give a cascade file (JSON), a directory holding "
                          f"{CASCADE_FILE}, or a stage checkpoint or run directory")
    if p.is_dir() and (p / CASCADE_FILE).is_file():
        p = p / CASCADE_FILE
    paths, plan = resolve_cascade(p, []) if p.suffix == ".json" else resolve_cascade(None, [p])
    return paths, plan.override(**(overrides or {}))


def paired_verdicts(fa: np.ndarray, fb: np.ndarray, ref: ReferenceFeatures, resamples: int = 30,
                    seed: int = 0) -> list[dict]:
    """FID and KID of features ``fa [N, D]`` and ``fb [N, D]`` (row ``j`` of both from the same
    seed and label) against ``ref``, each as a dict: :class:`~cdm.eval.verdict.Verdict`'s fields
    (``se``: of the difference ``a - b``, a paired bootstrap: the same rows resampled for both),
    ``a_se``, ``b_se`` (each score's own bootstrap SE, as ``cdm eval`` reports it), ``diff``,
    ``better`` ("A", "B" or None) and ``line``, the verdict in words."""
    boots = {"fid": fid_bootstrap([fa, fb], *ref_stats(ref), resamples, seed),
             "kid": kid_bootstrap([fa, fb], ref.features, resamples, seed)}
    qa, qb = (quality_scores({"features": f}, ref, ("fid", "kid")) for f in (fa, fb))
    out = []
    for m, bt in boots.items():
        v = verdict(m, qa[m], qb[m], float(np.std(bt[:, 0] - bt[:, 1], ddof=1)))
        out.append({**v.__dict__, "a_se": float(np.std(bt[:, 0], ddof=1)), "b_se": float(np.std(bt[:, 1], ddof=1)),
                    "diff": v.diff, "better": v.better, "line": v.line(NAMES)})
    return out


def _verdicts(rows: list[dict]) -> list[Verdict]:
    return [verdict(r["metric"], r["a"], r["b"], r["se"]) for r in rows]


@holding_lock("comparing")
def compare_cascades(a: str | Path, b: str | Path, cfg: EvalConfig, out_dir: str | Path,
                     overrides: dict | None = None, log=print) -> dict:
    """Sample ``cfg.n`` images from cascades ``a`` and ``b`` (:func:`resolve_side`) with the same
    seeds and labels, score both final outputs in each of ``cfg.features`` against ``cfg.reference``
    (of A's data set) and judge each metric (:func:`paired_verdicts`). Writes ``compare.json``,
    ``report.html``/``report.md`` and each side's samples (``samples-A/``, ``samples-B/``) into
    ``out_dir``; returns the results, whose ``lines`` are the verdicts in words."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sides = [resolve_side(p, overrides) for p in (a, b)]
    cascades = [load_cascade(paths, cfg.device, cfg.precision) for paths, _ in sides]
    finals = [c.stages[-1] for c in cascades]
    shape = [(f.resolution, f.channels, c.num_classes) for f, c in zip(finals, cascades)]
    if shape[0] != shape[1]:
        raise CascadeError(f"cannot compare cascades whose final outputs differ: A gives (resolution, channels, "
                           f"classes) {shape[0]}, B {shape[1]}; compare cascades of one data set and resolution")
    t0 = time.time()
    labels, seeds = cycle_labels(cfg.n, cascades[0].num_classes), list(range(cfg.seed, cfg.seed + cfg.n))
    images = []
    for name, c, (_, plan) in zip(NAMES, cascades, sides):
        log(f"sampling {cfg.n} images through cascade {name}")
        res = sample_batched(c, labels, seeds, plan, cfg.batch_size, cfg.progress)
        write_samples(res, c, out / f"samples-{name}")
        images.append(to_uint8(res.images[-1]))
    data, resolution = finals[0].config.data, finals[0].resolution
    ref_set = load_reference(data, cfg.reference)
    floor_set = floor_images(data, cfg.reference, cfg.n, cfg.seed)
    results: dict = {"a": str(a), "b": str(b), "n": cfg.n, "seed": cfg.seed, "resolution": resolution,
                     "sampling": {n: to_dict(p) for n, (_, p) in zip(NAMES, sides)},
                     "reference": ref_set.source, "reference_fingerprint": ref_set.fingerprint,
                     "reference_overlap": {n: check_overlap(c, ref_set, log) for n, c in zip(NAMES, cascades)},
                     "comparisons": [], "lines": []}
    for space in cfg.features:
        ex = make_extractor(space, cfg.classifier, cfg.device)
        ref = reference_features(ex, ref_set, resolution, cfg.cache_dir)
        log(f"scoring both in {ex.name}")
        fa, fb = (np.asarray(ex(im)["features"], dtype=np.float64) for im in images)
        rows = paired_verdicts(fa, fb, ref, cfg.resamples, cfg.seed)
        floor = real_floor(ex, floor_set, ref_set, ref, resolution, cfg.cache_dir, cfg.resamples) if floor_set else None
        fv = next(r for r in rows if r["metric"] == "fid")
        small = small_reference_warning(min(fv["a"], fv["b"]), floor, len(ref.features)) if floor else None
        comp = {"feature_space": ex.name, "verdicts": rows, "disagreement": disagreement(_verdicts(rows), NAMES),
                "floor": floor, "reference_warning": small}
        results["comparisons"].append(comp)
        results["lines"] += [f"[{ex.name}] {r['line']}" for r in rows]
        results["lines"] += [f"[{ex.name}] {comp['disagreement']}"] if comp["disagreement"] else []
        if floor:
            results["lines"].append(f"[{ex.name}] real-vs-real floor at n={floor['n']}: fid {floor['fid']:.4g} ± "
                                    f"{floor['fid_se']:.2g}, kid {floor['kid']:.4g} ± {floor['kid_se']:.2g}")
        if small:
            warnings.warn(small)
    results["seconds"] = round(time.time() - t0, 1)
    atomic_write(out / "compare.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    _compare_report(results, images, out)
    return results


def _compare_report(results: dict, images: list, out: Path) -> Path:
    rep = Report("cdm comparison: A vs B")
    rep.text(f"A: {results['a']}; B: {results['b']}. {results['n']} samples each, sample j from seed "
             f"{results['seed']} + j with the same label in both; final outputs ({results['resolution']}px) scored "
             f"against {results['reference']} (fingerprint {results['reference_fingerprint']}; reference images a "
             f"stage trained on: {results['reference_overlap']}). Took {results['seconds']} s.")
    rep.text(f"Lower is better. ± : bootstrap standard errors; the difference's from a paired bootstrap (the same "
             f"samples resampled for A and B). A verdict is given only beyond {NOISE_SE:g} standard errors of the "
             f"difference.")
    for c in results["comparisons"]:
        rep.heading(c["feature_space"])
        rep.table(c["verdicts"], ["metric", "a", "a_se", "b", "b_se", "diff", "se", "better"])
        for line in [r["line"] for r in c["verdicts"]] + [c["disagreement"], c["reference_warning"]]:
            if line:
                rep.text(line)
        if c["floor"]:
            f = c["floor"]
            rep.text(f"Real-vs-real floor at n={f['n']} ({f['source']}): fid {f['fid']:.4g} ± {f['fid_se']:.2g}, "
                     f"kid {f['kid']:.4g} ± {f['kid_se']:.2g}: what real images score in the samples' place.")
    rep.heading("Samples")
    for name, im in zip(NAMES, images):
        f = out / f"grid-{name}.png"
        save_grid(im[:32].float() / 127.5 - 1, f, nrow=8)
        rep.image(f, f.name, f"cascade {name}")
    return rep.write(out)
