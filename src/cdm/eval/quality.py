"""Sample quality of a cascade: FID, KID, IS and precision/recall in a chosen feature space, the
per-stage checks of SR stages, and the Classification Accuracy Score (``cdm eval``).

Every number carries the feature space it was computed in, the sample counts behind it and the
real images it was compared with (:mod:`cdm.eval.reference`: the held-out split by default, a
random class-stratified subset when ``n_ref`` is smaller). Reference features are cached per
(feature space, reference fingerprint, resolution) by :func:`cdm.eval.features.reference_features`.

FID and KID carry their bootstrap standard errors (``fid_se``, ``kid_se``: over the scored
samples, the reference held fixed, :func:`standard_error`) and the real-vs-real floor at the same
``n`` against the same reference (``floor``, :mod:`cdm.eval.floor`); a reference too small for FID
to resolve a tenth of the score is warned about in one line, with the size it needs.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..cascade import Cascade, SamplingPlan
from ..cascade_file import load_cascade
from ..files import atomic_write
from ..config import ConfigError, to_dict
from ..data import to_uint8
from ..generate import cycle_labels, sample_batched, write_samples
from ..images import save_grid
from ..runlock import holding_lock
from .report import Report
from .classifier import ClassifierConfig, classification_accuracy_score
from .features import ReferenceFeatures, make_extractor, reference_features
from .floor import floor_images, real_floor, small_reference_warning
from .scores import quality_scores, scores_with_se, standard_error  # noqa: F401 (re-exported)
from .reference import ReferenceSet, ReferenceSpec, load_reference, training_overlap
from .stages import stage_checks

OVERLAP_WARN = 0.01  # warn when more than this fraction of the reference images are training images


@dataclass
class EvalConfig:
    """How samples are judged: what ``cdm eval`` and ``cdm sweep`` share."""
    features: list[str] = field(default_factory=lambda: ["classifier"])  # feature spaces (sweep: the first)
    classifier: str = ""  # the domain classifier (cdm train-classifier's output) for the classifier space
    reference: ReferenceSpec = field(default_factory=ReferenceSpec)  # the real images compared with
    n: int = 1000  # samples to score (cdm eval)
    seed: int = 0  # sample j uses seed + j
    batch_size: int = 250
    device: str = "auto"
    precision: str | None = None  # network precision while sampling (default: as each stage was trained)
    cache_dir: str | None = None  # reference statistics (default $CDM_CACHE/stats or ~/.cache/cdm/stats)
    resamples: int = 30  # bootstrap resamples behind every standard error
    progress: bool = True  # a progress bar while sampling


def _pm(v: float, se: float | None) -> str:
    return f"{v:.4g}" + (f" ± {se:.2g}" if se is not None else "")


def score_line(row: dict) -> str:
    """One score row in words: ``fid=12.3 ± 0.4 (real-vs-real floor at n=1000: 3.1 ± 0.2), kid=...``."""
    fl = row.get("floor") or {}
    parts = []
    for k in ("fid", "kid", "is", "precision", "recall"):
        if k in row:
            floor = f" (real-vs-real floor at n={fl['n']}: {_pm(fl[k], fl[k + '_se'])})" if k in fl else ""
            parts.append(f"{k}={_pm(row[k], row.get(k + '_se'))}{floor}")
    return (f"stage {row['stage']} ({row['resolution']}px) [{row['feature_space']}, n={row['n_fake']} vs "
            f"{row['n_real']}]: " + ", ".join(parts))


def score_with_floor(ex, feats: dict, ref: ReferenceFeatures, ref_set: ReferenceSet, floor_set: ReferenceSet | None,
                     resolution: int, cfg: EvalConfig) -> dict:
    """Every quality score of an extractor's output ``feats`` against ``ref``, FID and KID with
    their standard errors, the real-vs-real ``floor`` of ``floor_set`` (None without one) and
    ``reference_warning`` (:func:`cdm.eval.floor.small_reference_warning`, or None)."""
    row = quality_scores(feats, ref)
    f = np.asarray(feats["features"], dtype=np.float64)
    row.update({f"{m}_se": standard_error(m, f, ref, cfg.resamples) for m in ("fid", "kid")})
    row["floor"] = None if floor_set is None else real_floor(ex, floor_set, ref_set, ref, resolution, cfg.cache_dir,
                                                            cfg.resamples)
    row["reference_warning"] = None if row["floor"] is None else \
        small_reference_warning(row["fid"], row["floor"], len(ref.features))
    return row


def _load_samples(path: Path, k: int) -> tuple[list[Tensor], Tensor]:
    try:
        with np.load(path, allow_pickle=False) as z:
            images = [torch.from_numpy(z[f"stage{i}"]) for i in range(k) if f"stage{i}" in z]
            labels = torch.from_numpy(z["labels"])
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"cannot read samples {path}: {e}; make them with 'cdm sample'") from e
    if not images:
        raise ConfigError(f"{path} holds no stage{{i}} arrays; make it with 'cdm sample'")
    return images, labels


def check_overlap(cascade: Cascade, ref: ReferenceSet, log=print) -> dict[str, int]:
    """Per stage name, how many reference images it trained on; warns when it is a real share."""
    seen: dict[str, int] = {}  # stages of one cascade mostly share their data set: read each once
    counts = {}
    for st in cascade.stages:
        key = repr(st.config.data)
        if key not in seen:
            seen[key] = training_overlap(st.config.data, ref)
        counts[st.config.name] = seen[key]
    worst = max(counts.values(), default=0)
    if worst > OVERLAP_WARN * len(ref):
        msg = (f"{worst} of the {len(ref)} reference images ({ref.source}) are images a stage trained on: "
               f"the scores flatter the cascade. Compare with held-out images (--split test) or pass "
               f"--reference PATH")
        log(f"warning: {msg}")
    return counts


@holding_lock("evaluating")
def evaluate_cascade(checkpoints: list[Path], plan: SamplingPlan, cfg: EvalConfig, out_dir: str | Path,
                     samples: str | Path | None = None, per_stage: bool = True,
                     cas: ClassifierConfig | None = None, log=print) -> dict:
    """``cdm eval``: score every stage's samples (sampled now with ``plan``, or read from a
    ``samples.npz``) in each feature space against the reference at that stage's resolution;
    per-stage checks of SR stages; CAS of the final stage with the classifier recipe ``cas``
    (``cdm eval --cas`` passes :data:`cdm.eval.classifier.CAS_RECIPE`).
    Writes ``results.json`` and ``report.html``/``report.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cascade = load_cascade(checkpoints, cfg.device, cfg.precision)
    k, n = len(cascade.stages), cfg.n
    data = cascade.stages[-1].config.data
    t0 = time.time()
    if samples:
        images, labels = _load_samples(Path(samples), k)
        images, labels = [im[:n] for im in images], labels[:n]
        source = str(samples)
    else:
        labels = cycle_labels(n, cascade.num_classes)
        log(f"sampling {n} images through the cascade")
        res = sample_batched(cascade, labels, list(range(cfg.seed, cfg.seed + n)), plan, cfg.batch_size,
                             cfg.progress)
        write_samples(res, cascade, out / "samples")
        images, source = [to_uint8(im) for im in res.images], "sampled now"
    ref_set = load_reference(data, cfg.reference)
    results: dict = {"samples": source, "n": int(len(labels)), "sampling": to_dict(plan),
                     "stages": [str(p) for p in checkpoints], "reference": ref_set.source,
                     "reference_fingerprint": ref_set.fingerprint,
                     "reference_overlap": check_overlap(cascade, ref_set, log), "scores": [], "per_stage": [],
                     "cas": None}
    scorers = {}
    floor_set = floor_images(data, cfg.reference, len(labels), cfg.seed)
    for space in cfg.features:
        ex = make_extractor(space, cfg.classifier, cfg.device)
        for i, im in enumerate(images):
            res_i = cascade.stages[i].resolution
            ref = reference_features(ex, ref_set, res_i, cfg.cache_dir)
            scorers.setdefault(i, lambda x, ex=ex, ref=ref: quality_scores(ex(to_uint8(x)), ref, ("fid", "kid")))
            log(f"scoring stage {i} ({res_i}px) in {ex.name}")
            results["scores"].append({"stage": i, "resolution": res_i,
                                      **score_with_floor(ex, ex(im), ref, ref_set, floor_set, res_i, cfg)})
    small = [r["reference_warning"] for r in reversed(results["scores"]) if r["reference_warning"]]
    if small:  # one line, of the final stage where it applies
        warnings.warn(small[0])
    if per_stage and k > 1:
        m = min(len(labels), len(ref_set))
        real = ref_set.take(m, cfg.seed) if m < len(ref_set) else ref_set
        for i in range(1, k):
            log(f"per-stage checks of stage {i}")
            lower = (images[i - 1][:m].float() / 127.5 - 1, labels[:m])
            results["per_stage"].append(stage_checks(cascade, i, plan, real, lower, scorers[i], cfg.seed))
    if cas is not None:
        final = images[-1]
        res_f = final.shape[-1]
        cas = replace(cas, resolution=res_f, channels=final.shape[1], num_classes=max(cascade.num_classes, 1))
        test = load_reference(data, replace(cfg.reference, n=0))
        train = load_reference(data, ReferenceSpec(split="train", n=0))
        train = train.take(len(final), cfg.seed) if len(final) < len(train) else train
        log("classification accuracy score: training on generated samples")
        results["cas"] = classification_accuracy_score(final, labels, test.at(res_f), test.labels, cas,
                                                       real_images=train.at(res_f), real_labels=train.labels)
        results["cas"]["test_set"], results["cas"]["real_train_set"] = test.source, train.source
    results["seconds"] = round(time.time() - t0, 1)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    _eval_report(results, images, cascade, out)
    return results


def _eval_report(results: dict, images: list[Tensor], cascade: Cascade, out: Path) -> Path:
    rep = Report("cdm evaluation")
    rep.text(f"{results['n']} samples ({results['samples']}); sampling: {json.dumps(results['sampling'])}; "
             f"stages: {', '.join(results['stages'])}. Compared with {results['reference']} "
             f"(fingerprint {results['reference_fingerprint']}); reference images a stage trained on: "
             f"{results['reference_overlap']}. Took {results['seconds']} s.")
    rep.table([{"stage": i, "steps": st["steps"], "level s": st["level"], "sampler": st["sampler"],
                "spacing": st["spacing"], "guidance w": st.get("guidance", 0.0),
                "guidance interval": st.get("guidance_interval", [0.0, 1.0]), "threshold": st.get("threshold", "static"),
                "churn": st.get("churn", 0.0), "churn interval": st.get("churn_interval", [0.0, 1.0])}
               for i, st in enumerate(results["sampling"]["stages"])])
    rep.text(f"Sampling mode: {results['sampling']['mode']}. Guidance: the prediction is (1 + w) cond - w uncond "
             f"(w = 0 unguided) at the steps with t/T inside the interval.")
    rep.heading("Sample quality per stage")
    rows = [{**r, **{f"floor {k}": (r["floor"] or {}).get(k) for k in ("n", "fid", "fid_se", "kid", "kid_se")}}
            for r in results["scores"]]
    cols = ["stage", "resolution", "feature_space", "n_fake", "n_real", "fid", "fid_se", "floor fid", "floor fid_se",
            "kid", "kid_se", "floor kid", "floor kid_se", "floor n", "is", "is_std", "precision", "recall", "reference"]
    rep.table(rows, [c for c in cols if any(r.get(c) is not None for r in rows)])
    for r in results["scores"]:
        rep.text(score_line(r))
    rep.text("± and *_se: bootstrap standard errors over the scored samples, the reference held fixed (KID's over "
             "its full-set MMD^2; kid_std, where shown elsewhere, is the spread over random subsets, not an error "
             "bar). The real-vs-real floor: the same scores of as many real images from the other split against "
             "the same reference, what a perfect generator would get; scores near it cannot be improved upon. "
             "Two scores differ only beyond twice the standard error of their difference (cdm eval --compare). "
             + " ".join(sorted({r["reference_warning"] for r in results["scores"] if r["reference_warning"]})))
    rep.text("FID and KID: lower is better; precision/recall (Kynkäänniemi et al. 2019, k=3): higher is better. "
             "IS is computed from the domain classifier's class probabilities (the FID Inception file has no "
             "classification layer), so it is an IS in that classifier's label space, not ImageNet's.")
    if results["per_stage"]:
        rep.heading("Per-stage checks (SR stages)")
        rows = [{"stage": r["stage"], "conditioning": cond, "level": r["level"], "fid": r[cond].get("fid"),
                 "kid": r[cond].get("kid"), "consistency_psnr_db": r[cond].get("consistency_psnr"),
                 "feature_space": r[cond].get("feature_space"), "n": r[cond].get("n_fake")}
                for r in results["per_stage"] for cond in ("ground_truth", "generated") if cond in r]
        rep.table(rows)
        rep.text("ground_truth: the SR stage conditioned on real low-resolution images (the reference images, "
                 "downsampled as in training); generated: on the stage below's samples. Consistency: PSNR "
                 "between the SR output downsampled with the cascade's own resize and the clean input it was "
                 "conditioned on.")
    if results["cas"]:
        rep.heading("Classification Accuracy Score (final stage)")
        cas = results["cas"]
        rep.table([{"trained on": k, **{m: v for m, v in cas[k].items() if m != "per_class_top1"}}
                   for k in ("generated", "real") if k in cas])
        names = cascade.stages[-1].config.data.class_names or [str(c) for c in range(len(cas["generated"]["per_class_top1"]))]
        rep.table([{"class": c, "CAS top-1 %": cas["generated"]["per_class_top1"][j],
                    **({"real top-1 %": cas["real"]["per_class_top1"][j]} if "real" in cas else {})}
                   for j, c in enumerate(names)])
    rep.heading("Samples")
    nc = max(cascade.num_classes, 1)
    for i, im in enumerate(images):
        f = out / f"grid-stage{i}.png"
        save_grid(im[:min(len(im), 4 * nc)].float() / 127.5 - 1, f, nrow=nc if nc > 1 else 8)
        rep.image(f, f.name, f"stage {i} samples ({im.shape[-1]}px)")
    return rep.write(out)
