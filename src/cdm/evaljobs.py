"""Evaluation jobs behind ``cdm train-classifier``, ``cdm eval`` and ``cdm sweep``: each loads
what it needs, computes, and writes JSON plus a self-contained report."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .cascade import CascadeSampling, Mode
from .checkpoint import atomic_write
from .classifier import (Classifier, ClassifierConfig, accuracy_report, classification_accuracy_score,
                         load_classifier, predict, save_classifier, train_classifier)
from .config import ConfigError, to_dict
from .data import DataConfig, ImageSet, load_dataset, to_uint8
from .evaluate import ReferenceFeatures, quality_scores, real_images, stage_checks
from .features import InceptionFID, reference_stats
from .images import save_grid
from .report import Report
from .sample import (balanced_labels, load_cascade, read_cascade_file, sample_batched, write_cascade_file,
                     write_samples)
from .sweep import Conditioning, SweepConfig, best_level, condition_label, run_sweep, sweep_plot

FEATURE_SPACES = ("classifier", "inception")


class ClassifierFeatures:
    """The domain classifier as a feature extractor: ``{"features", "logits", "probs"}``.
    Its name carries a hash of its weights, so cached reference statistics follow the network."""

    def __init__(self, net: Classifier, weights_hash: str):
        self.net = net
        self.name = f"cdm-classifier-{weights_hash}"

    def __call__(self, images) -> dict:
        out = predict(self.net, torch.as_tensor(images))
        return {k: v.double().numpy() for k, v in out.items()}


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def make_extractor(space: str, classifier: str | Path | None, device: str = "cpu"):
    if space == "classifier":
        if not classifier:
            raise ConfigError("the classifier feature space needs --classifier DIR (train one with "
                              "'cdm train-classifier --out DIR')")
        net, _ = load_classifier(classifier)
        p = Path(classifier)
        return ClassifierFeatures(net, file_hash(p / "classifier.safetensors" if p.is_dir() else p))
    if space == "inception":
        return InceptionFID(device=device)
    raise ConfigError(f"unknown feature space {space!r} (choose from {', '.join(FEATURE_SPACES)})")


def reference(extractor, data: DataConfig, split: str, resolution: int, n: int, cache_dir=None) -> ReferenceFeatures:
    """Cached reference statistics of ``n`` real ``split`` images at ``resolution`` in the
    extractor's feature space, labelled with where they came from."""
    real = real_images(data, split, resolution, n)
    desc = {**to_dict(replace(data, class_names=[], flip=False, limit=0)), "split": split}
    stats = reference_stats(extractor.name, desc, len(real), resolution,
                            lambda: extractor(real.images)["features"], cache_dir=cache_dir)
    return ReferenceFeatures(features=stats.features, space=extractor.name, mu=stats.mu, sigma=stats.sigma,
                             source=f"{data.source}:{split}@{resolution}px n={len(real)}")


# ----------------------------------------------------------------------------- train-classifier
def train_domain_classifier(data: DataConfig, out_dir: str | Path, config: ClassifierConfig,
                            progress: bool = True) -> dict:
    """Train the domain classifier on the train split (Fashion-MNIST) or 90% of the images
    (folder/npz), test it on the rest, save ``classifier.safetensors`` and a report."""
    out = Path(out_dir)
    t0 = time.time()
    ds = load_dataset(replace(data, split="train", flip=False))
    if data.source == "fashion-mnist":
        test = load_dataset(replace(data, split="test", flip=False, limit=0))
        train = ds
    else:
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(ds), generator=g)
        cut = max(1, len(ds) // 10)
        test = ImageSet(ds.images[perm[:cut]], ds.labels[perm[:cut]], ds.class_names)
        train = ImageSet(ds.images[perm[cut:]], ds.labels[perm[cut:]], ds.class_names)
    config = replace(config, resolution=data.resolution, channels=train.images.shape[1],
                     num_classes=train.num_classes)
    history: list[dict] = []
    net = train_classifier(train.images, train.labels, config, progress=progress, log=history.append)
    acc = accuracy_report(predict(net, test.images)["logits"], test.labels, config.num_classes)
    summary = {"test": acc, "train_n": len(train), "data": to_dict(data), "history": history,
               "seconds": round(time.time() - t0, 1), "classes": train.class_names}
    path = save_classifier(net, out / "classifier.safetensors", extra={"test_top1": acc["top1"], "data": to_dict(data)})
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    rep = Report("cdm domain classifier")
    rep.text(f"Trained on {len(train)} images ({data.source}), tested on {len(test)}: top-1 {acc['top1']:.2f}%, "
             f"top-5 {acc.get('top5', float('nan')):.2f}%, in {summary['seconds']} s.")
    rep.table([{"class": c, "top1 %": a} for c, a in zip(train.class_names, acc["per_class_top1"])])
    rep.table(history)
    rep.write(out)
    summary["path"] = str(path)
    return summary


# ----------------------------------------------------------------------------- eval
def _load_samples(path: Path, k: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as z:
            images = [torch.from_numpy(z[f"stage{i}"]) for i in range(k) if f"stage{i}" in z]
            labels = torch.from_numpy(z["labels"])
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"cannot read samples {path}: {e}; make them with 'cdm sample'") from e
    if not images:
        raise ConfigError(f"{path} holds no stage{{i}} arrays; make it with 'cdm sample'")
    return images, labels


def evaluate_cascade(checkpoints: list[Path], sampling: CascadeSampling, out_dir: str | Path, n: int = 1000,
                     features: list[str] = ("classifier",), classifier: str | Path | None = None,
                     n_ref: int = 10000, split: str = "test", samples: str | Path | None = None,
                     per_stage: bool = True, cas: bool = False, cas_config: ClassifierConfig | None = None,
                     seed: int = 0, batch_size: int = 250, device: str = "cpu", cache_dir=None,
                     precision: str | None = None, log=print) -> dict:
    """Score every stage's samples in each feature space against real data at that stage's
    resolution; per-stage checks of SR stages; CAS of the final stage if asked. Writes
    ``results.json`` and ``report.html``/``report.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cascade = load_cascade(checkpoints, device, precision)
    k = len(cascade.stages)
    data = cascade.stages[-1].config.data
    t0 = time.time()
    if samples:
        images, labels = _load_samples(Path(samples), k)
        images = [im[:n] for im in images]
        labels = labels[:n]
        source = str(samples)
    else:
        labels = balanced_labels(n, cascade.num_classes)
        log(f"sampling {n} images through the cascade")
        res = sample_batched(cascade, labels, list(range(seed, seed + n)), sampling, batch_size)
        write_samples(res, cascade, out / "samples")
        images = [to_uint8(im) for im in res.images]
        source = "sampled now"
    results: dict = {"samples": source, "n": int(len(labels)), "sampling": to_dict(sampling),
                     "stages": [str(p) for p in checkpoints], "scores": [], "per_stage": [], "cas": None}
    refs = {}
    for space in features:
        ex = make_extractor(space, classifier, device)
        for i, im in enumerate(images):
            res_i = cascade.stages[i].resolution
            ref = reference(ex, data, split, res_i, n_ref, cache_dir)
            refs[(space, i)] = (ex, ref)
            log(f"scoring stage {i} ({res_i}px) in {ex.name}")
            row = {"stage": i, "resolution": res_i, **quality_scores(ex(im), ref)}
            results["scores"].append(row)
    if per_stage and k > 1:
        space = features[0]
        for i in range(1, k):
            ex, ref = refs[(space, i)]
            real = real_images(data, split, cascade.stages[i].resolution, n)
            m = min(n, len(real))
            lower = images[i - 1][:m].float() / 127.5 - 1
            log(f"per-stage checks of stage {i}")
            results["per_stage"].append(stage_checks(cascade, i, sampling, real, lower, labels[:m],
                                                     list(range(seed, seed + m)), ex, ref))
    if cas:
        final = images[-1]
        cfg = cas_config or ClassifierConfig()
        cfg = replace(cfg, resolution=final.shape[-1], channels=final.shape[1], num_classes=max(cascade.num_classes, 1))
        test = real_images(data, split, final.shape[-1], 0)
        train_real = real_images(data, "train", final.shape[-1], len(final)) if data.source == "fashion-mnist" else None
        log("classification accuracy score: training on generated samples")
        results["cas"] = classification_accuracy_score(
            final, labels, test.images, test.labels, cfg,
            real_images=None if train_real is None else train_real.images,
            real_labels=None if train_real is None else train_real.labels)
    results["seconds"] = round(time.time() - t0, 1)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    _eval_report(results, images, labels, cascade, out)
    return results


def _eval_report(results: dict, images, labels, cascade, out: Path) -> Path:
    rep = Report("cdm evaluation")
    rep.text(f"{results['n']} samples ({results['samples']}); sampling: {json.dumps(results['sampling'])}; "
             f"stages: {', '.join(results['stages'])}. Took {results['seconds']} s.")
    rep.heading("Sample quality per stage")
    cols = ["stage", "resolution", "feature_space", "n_fake", "n_real", "fid", "kid", "kid_std", "is", "is_std",
            "precision", "recall", "reference"]
    rep.table(results["scores"], [c for c in cols if any(c in r for r in results["scores"])])
    rep.text("FID and KID: lower is better; precision/recall (Kynkäänniemi et al. 2019, k=3): higher is better. "
             "IS is computed from the domain classifier's class probabilities (the FID Inception file has no "
             "classification layer), so it is an IS in that classifier's label space, not ImageNet's.")
    if results["per_stage"]:
        rep.heading("Per-stage checks (SR stages)")
        rows = []
        for r in results["per_stage"]:
            for cond in ("ground_truth", "generated"):
                if cond in r:
                    rows.append({"stage": r["stage"], "conditioning": cond, "level": r["level"],
                                 "fid": r[cond].get("fid"), "kid": r[cond].get("kid"),
                                 "consistency_psnr_db": r[cond].get("consistency_psnr"),
                                 "feature_space": r[cond].get("feature_space"), "n": r[cond].get("n_fake")})
        rep.table(rows)
        rep.text("ground_truth: the SR stage conditioned on real low-resolution images (downsampled real test "
                 "images); generated: on the stage below's samples. Consistency: PSNR between the SR output "
                 "downsampled with the cascade's own resize and the clean input it was conditioned on.")
    if results["cas"]:
        rep.heading("Classification Accuracy Score (final stage)")
        cas = results["cas"]
        rows = [{"trained on": k, **{m: v for m, v in cas[k].items() if m != "per_class_top1"}}
                for k in ("generated", "real") if k in cas]
        rep.table(rows)
        names = cascade.stages[-1].config.data.class_names or [str(c) for c in range(len(cas["generated"]["per_class_top1"]))]
        rep.table([{"class": c, "CAS top-1 %": cas["generated"]["per_class_top1"][j],
                    **({"real top-1 %": cas["real"]["per_class_top1"][j]} if "real" in cas else {})}
                   for j, c in enumerate(names)])
    rep.heading("Samples")
    nc = max(cascade.num_classes, 1)
    for i, im in enumerate(images):
        m = min(len(im), 4 * nc)
        f = out / f"grid-stage{i}.png"
        save_grid(im[:m].float() / 127.5 - 1, f, nrow=nc if nc > 1 else 8, scale=max(1, 64 // im.shape[-1]))
        rep.image(f, f.name, f"stage {i} samples ({im.shape[-1]}px)")
    return rep.write(out)


# ----------------------------------------------------------------------------- sweep
def sweep_cascade(cascade_file: str | Path, out_dir: str | Path, cfg: SweepConfig, feature: str = "classifier",
                  metric: str = "fid", classifier: str | Path | None = None, n_ref: int = 10000,
                  split: str = "test", write_best: bool = True, device: str = "cpu", cache_dir=None,
                  sampler: str | None = None, steps: list[int] | None = None, spacing: str | None = None,
                  log=print) -> dict:
    """Search the augmentation level of one SR stage (both modes with generated inputs, or with
    ground-truth inputs); write results, a plot, a report, and (``write_best``, generated inputs
    only) the best (mode, s) into the cascade file. ``sampler``, ``steps`` (one value or one per
    stage) and ``spacing`` override the cascade file's for the sweep only."""
    if metric not in ("fid", "kid"):
        raise ConfigError(f"sweep metric must be 'fid' or 'kid', got {metric!r}")
    generated = cfg.conditioning_kind() is Conditioning.GENERATED
    paths, saved = read_cascade_file(cascade_file)
    sampling = CascadeSampling(**{**to_dict(saved), "stages": [replace(st) for st in saved.stages]})
    sampling.sampler = sampler or sampling.sampler
    sampling.spacing = spacing or sampling.spacing
    if steps:
        steps = steps * len(sampling.stages) if len(steps) == 1 else steps
        if len(steps) != len(sampling.stages):
            raise ConfigError(f"steps needs 1 or {len(sampling.stages)} values, got {len(steps)}")
        for st, n in zip(sampling.stages, steps):
            st.steps = n
    cascade = load_cascade(paths, device)
    i = cfg.stage % len(cascade.stages)
    ex = make_extractor(feature, classifier, device)
    ref = reference(ex, cascade.stages[i].config.data, split, cascade.stages[i].resolution, n_ref, cache_dir)
    src = ref.source
    name = f"{metric}[{ex.name}]"

    def scorer(x, labels):
        return quality_scores(ex(to_uint8(x)), ref, metrics=(metric,))[metric]

    rows = run_sweep(cascade, sampling, cfg, scorer, out_dir, name, progress=log)
    best = best_level(rows)
    per_mode = {m: best_level([r for r in rows if r["mode"] == m]) for m in {r["mode"] for r in rows}}
    summary = {"metric": name, "reference": src, "stage": i, "conditioning": cfg.conditioning, "best": best,
               "best_per_mode": per_mode, "rows": rows}
    out = Path(out_dir)
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    svg = sweep_plot(rows, name, i)
    rep = Report(f"cdm augmentation-level sweep (stage {i})")
    inputs = ("the stage below's samples" if generated else
              f"ground-truth inputs: {cfg.n} real {cfg.ground_truth_split}-split images (seed {cfg.seed}), "
              f"downsampled as in training and corrupted at s by the forward process")
    rep.text(f"Cascade {cascade_file}; {cfg.n} samples per candidate; conditioned on {inputs}; metric {name} "
             f"against {src}; sampler {sampling.sampler}, steps {[s.steps for s in sampling.stages]}.")
    rep.svg(svg, "sweep.svg", "metric against the augmentation level")
    rep.table(sorted(rows, key=lambda r: (r["mode"], r["level"])),
              ["conditioning", "mode", "level", "value", "n", "steps", "sampler"])
    rep.text(f"Best: {condition_label(best)} at s = {best['level']} ({name} = {best['value']:.4f}).")
    if write_best and generated:
        saved.stages[i].level = int(best["level"])
        saved.mode = Mode(best["mode"]).value
        write_cascade_file(cascade_file, paths, saved)
        rep.text(f"Written into {cascade_file}: mode = {saved.mode}, stage {i} level = {best['level']}.")
    elif write_best:
        rep.text("Ground-truth inputs are an ablation, not a way to sample: the cascade file is left as it was.")
    rep.write(out)
    return summary
