"""The experiment, resumable at every level: train every stage (``train_stage`` resumes from its
checkpoints), train the domain classifier, score every (row, condition, s) point into
``points/results.jsonl`` (``cdm.eval.sweep``: samples kept as uint8 ``.npz``), compute CAS for the main
rows into ``cas.jsonl``, and write ``summary.json``. A re-run skips everything that is done.

Layout of the output directory::

    stages/<key>/        the five stage runs (checkpoints, log, config)
    classifier/          the domain classifier (feature space and CAS recipe)
    cache/               reference statistics (classifier and Inception space)
    points/results.jsonl one row per scored point; points/samples/*.npz its samples
    cas.jsonl            CAS of the main rows and of real data
    plan.json            the resolved stage configs and their training FLOPs
    timings.json         wall time per task, invocations, commands, machines
    summary.json         everything the report is made from
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from cdm.cascade import Cascade, SamplingPlan
from cdm.checkpoint import atomic_write, list_checkpoints, load_stage
from cdm.config import ConfigError, to_dict
from cdm.data import DataConfig, ImageSet, load_dataset, to_float
from cdm.distributed import pick_device
from cdm.eval.classifier import ClassifierConfig, train_and_test, train_domain_classifier
from cdm.eval.features import make_extractor, reference_features
from cdm.eval.ledger import Judge, append_row, load_samples, read_rows, score_point, stage_fingerprint
from cdm.eval.reference import ReferenceSpec, load_reference
from cdm.eval.sweep import SweepConfig, ground_truth_inputs, run_sweep
from cdm.generate import cycle_labels, sample_batched
from cdm.train import train_stage
from cdm.unet import UNet

from .ledger import Ledger, machine_info
from .plan import BASE, SINGLE, SR_ROWS, StudyStage, cascade_flops, plan_all
from .profiles import Profile
from .scoring import PRIMARY, PointScorer

Log = Callable[[str], None]


@dataclass
class PointJob:
    """What every point of a study is sampled and scored with, passed whole to each point."""
    sampling: SamplingPlan  # the cascade's plan (a single stage is sampled as the cascade's last stage)
    profile: Profile
    points_dir: Path  # the points' results.jsonl and kept samples
    metric: str
    scoring: dict  # part of every point's identity: a point scored against other real images is scored again
    device: torch.device | str
    ledger: Ledger
    log: Log


@dataclass
class RunConfig:
    out: Path
    profile: Profile
    device: str = ""  # "" = the profile's
    data_path: str = ""  # Fashion-MNIST folder ("" = Debian's)
    command: str = ""  # recorded as given
    progress: bool = False  # training progress bars (stderr)
    diagnostics: bool = False  # also train and score the profile's variants of the SR stages


def study_data(p: Profile, data_path: str = "") -> DataConfig:
    """The experiments' data: Fashion-MNIST at the profile's resolution (padded from 28 to 32 px in
    the ``cpu`` profile; ``data_path``: its IDX folder, default Debian's)."""
    return DataConfig(source="fashion-mnist", resolution=p.resolution, fit=p.fit, path=data_path)


def run_experiment(rc: RunConfig, log: Log) -> dict:
    """Run (or resume) the whole experiment; returns the summary (also ``summary.json``)."""
    p, out = rc.profile, Path(rc.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(rc.device or p.device)
    ledger = Ledger(out / "timings.json", rc.command, machine_info(dev), p.name)
    log(f"profile {p.name}: {p.about}; device {dev}, {torch.get_num_threads()} threads")
    data_cfg = study_data(p, rc.data_path)
    with ledger.task("load data"):
        train_set = load_dataset(data_cfg)
    variants = {v.key: v for v in (p.diagnostics if rc.diagnostics else ())}
    plans = plan_all(p, str(dev), rc.data_path, train_set.images.shape[1], train_set.num_classes, rc.diagnostics)
    _write_json(out / "plan.json", {k: {"config": to_dict(v.config), "flops_per_image": v.flops_per_image,
                                        "train_flops": v.train_flops} for k, v in plans.items()})
    ckpts = {key: train(plan, out / "stages" / key, train_set, ledger, log, rc.progress)
             for key, plan in plans.items()}
    scorer, metric, references = build_scorer(p, out, data_cfg, str(dev), ledger, log)
    # part of every point's identity: a point scored against other real images is scored again
    scoring = {"n_ref": p.n_ref, "n_incep": p.n_incep, "n_incep_ref": p.n_incep_ref, "bootstrap": p.bootstrap,
               **references}
    sampling = SamplingPlan.uniform(2, steps=p.sample_steps, mode="non-truncated", sampler=p.sampler,
                                    spacing=p.spacing)
    job = PointJob(sampling, p, out / "points", metric, scoring, dev, ledger, log)
    points = [single_point(ckpts[SINGLE], job, scorer.for_row(SINGLE, p.inception_rows))]
    gt = ground_truth_inputs(data_cfg, "train", p.n, plans["sr-gaussian"].config.lowres_resolution, p.seed)
    for key in SR_ROWS:
        cascade = Cascade([load_stage(ckpts[BASE], dev), load_stage(ckpts[key], dev)])
        points += sr_points(key, cascade, job, scorer.for_row(key, p.inception_rows), gt)
    cas = cas_points(main_points(points), job.points_dir, out / "cas.jsonl", data_cfg, p, ledger, log)
    for key, v in variants.items():
        if v.row == SINGLE:
            points.append(single_point(ckpts[key], job, scorer.for_row(key, ()), key=key))
            continue
        cascade = Cascade([load_stage(ckpts[BASE], dev), load_stage(ckpts[key], dev)])
        points += sr_points(key, cascade, job, scorer.for_row(key, ()), gt, levels=v.levels, modes=["non-truncated"])
    ledger.finish()
    summary = {"profile": asdict(p), "diagnostics": [asdict(v) for v in variants.values()],
               "plan": {k: _plan_summary(k, v, plans) for k, v in plans.items()},
               "sampling": to_dict(sampling), "metric": metric, "points": points, "cas": cas,
               "timings": ledger.data, "total_seconds": ledger.total_seconds, "data": to_dict(data_cfg),
               "classifier": {"top1": json.loads((out / "classifier" / "summary.json").read_text())["test"]["top1"],
                              "feature_dim": scorer.ref.features.shape[1]}}
    _write_json(out / "summary.json", summary)
    return summary


def describe_plan(p: Profile, device: str = "", data_path: str = "", diagnostics: bool = False) -> str:
    """The profile and every stage's training plan (steps, batch, FLOPs), as text."""
    data = load_dataset(study_data(p, data_path))
    plans = plan_all(p, str(pick_device(device or p.device)), data_path, data.images.shape[1], data.num_classes,
                     diagnostics)
    lines = [json.dumps(asdict(p), indent=1)]
    for k, v in plans.items():
        c = v.config
        lines.append(f"{k:15s} {c.name:30s} {c.train.steps:6d} steps x {c.train.batch_size:3d}  "
                     f"{v.flops_per_image / 1e6:8.1f} MFLOP/example  {v.train_flops / 1e12:8.2f} TFLOP"
                     + ("" if k == BASE else f"  (row: {cascade_flops(plans, k) / 1e12:.2f} TFLOP)"))
    return "\n".join(lines)


def _write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _plan_summary(key: str, plan: StudyStage, plans: dict[str, StudyStage]) -> dict:
    c = plan.config
    return {"name": c.name, "resolution": c.resolution, "lowres_resolution": c.lowres_resolution,
            "augment": c.augment.kind, "steps": c.train.steps, "batch_size": c.train.batch_size,
            "flops_per_image": plan.flops_per_image, "train_flops": plan.train_flops,
            "row_flops": None if key == BASE else cascade_flops(plans, key),
            "params": sum(v.numel() for v in UNet(c.unet).parameters())}


# ----------------------------------------------------------------------------- training
def train(plan: StudyStage, run_dir: Path, data: ImageSet, ledger: Ledger, log: Log, progress: bool) -> Path:
    """Train (or resume, or skip when done) one stage; returns its last checkpoint."""
    cfg = plan.config
    found = list_checkpoints(run_dir)
    if found and found[-1][0] >= cfg.train.steps:
        return found[-1][1]
    log(f"train {plan.key} ({cfg.name}): {cfg.train.steps} steps x {cfg.train.batch_size}"
        + (f", resuming at step {found[-1][0]}" if found else ""))
    t = time.time()
    with ledger.task(f"train {plan.key}"):
        last = train_stage(cfg, run_dir, progress=progress, data=data)
    log(f"train {plan.key}: done in {time.time() - t:.0f} s")
    return last


# ----------------------------------------------------------------------------- scoring
def build_scorer(p: Profile, out: Path, data: DataConfig, device: str, ledger: Ledger, log: Log,
                 clf_dir: Path | None = None) -> tuple[PointScorer, str, dict]:
    """Train the domain classifier (once, in ``clf_dir``, default ``out/classifier``), load the
    reference statistics (cached in ``out/cache``) and return the scorer, the name of its primary
    metric and the fingerprints of the real images it compares with."""
    clf_dir = clf_dir or out / "classifier"
    if not (clf_dir / "summary.json").exists():
        log("train the domain classifier")
        with ledger.task("train classifier"):
            s = train_domain_classifier(replace(data, limit=p.classifier_limit), clf_dir,
                                        ClassifierConfig(**p.classifier), progress=False)
        log(f"domain classifier: test top-1 {s['test']['top1']:.2f}%")
    else:
        _check_classifier(clf_dir, data)
    with ledger.task("reference statistics"):
        ex = make_extractor("classifier", clf_dir)
        test = load_reference(data, ReferenceSpec(split="test", n=p.n_ref))
        ref = reference_features(ex, test, data.resolution, cache_dir=out / "cache")
        references = {"reference": test.fingerprint}
        incep = incep_ref = None
        if p.n_incep > 0:
            incep = make_extractor("inception", None, device)
            incep_test = load_reference(data, ReferenceSpec(split="test", n=p.n_incep_ref))
            incep_ref = reference_features(incep, incep_test, data.resolution, cache_dir=out / "cache")
            references["incep_reference"] = incep_test.fingerprint
    scorer = PointScorer(ex, ref, p.bootstrap, incep, incep_ref, p.n_incep, p.seed)
    return scorer, f"{PRIMARY}[{ex.name}]", references


def _check_classifier(clf_dir: Path, data: DataConfig) -> None:
    """Refuse a domain classifier trained on other data than the study's (e.g. another profile's
    scale recorded into the same folder): its FIDs would be computed in the wrong feature space."""
    got, want = json.loads((clf_dir / "summary.json").read_text()).get("data", {}), to_dict(data)
    if any(got.get(k) != want[k] for k in ("source", "resolution", "fit")):
        raise ConfigError(f"{clf_dir}: its domain classifier was trained on {got.get('source')} at "
                          f"{got.get('resolution')} px ({got.get('fit')}), but this study's data are {want['source']} "
                          f"at {want['resolution']} px ({want['fit']}): give this profile its own --record/--out folder")


def single_point(ckpt: Path, job: PointJob, scorer, key: str = SINGLE) -> dict:
    """A single-stage model's point (row ``key``), in the same results file as the cascade's."""
    p, sampling = job.profile, job.sampling
    stage = load_stage(ckpt, job.device)
    st = replace(sampling.stages[-1], level=0)  # sampled as the cascade's last stage is
    one = SamplingPlan(mode="non-truncated", stages=[st])
    point = {"row": key, "scoring": job.scoring, "stage": 0, "conditioning": "generated", "mode": "single-stage",
             "level": 0, "metric": job.metric, "n": p.n, "seed": p.seed, "steps": st.steps,
             "sampler": st.sampler, "spacing": st.spacing, "fingerprint": stage_fingerprint(stage)}

    def sample():
        labels = cycle_labels(p.n, stage.num_classes)
        res = sample_batched(Cascade([stage]), labels, list(range(p.seed, p.seed + p.n)), one, p.sample_batch)
        return res.images[0], labels, None

    with job.ledger.task(f"points {key}"):
        return score_point(job.points_dir, point, sample, Judge(scorer, job.metric, PRIMARY), keep_samples=True,
                           name=key, progress=job.log)


def sr_points(key: str, cascade: Cascade, job: PointJob, scorer, gt: tuple, levels: tuple[int, ...] | None = None,
              modes: list[str] | None = None) -> list[dict]:
    """One SR stage's points: generated inputs (in ``modes``, default both, over ``levels``,
    default the profile's, for Gaussian augmentation; non-truncated at s = 0 otherwise) and
    ground-truth inputs."""
    p = job.profile
    gaussian = cascade.stages[1].augmentation.network_sees_level
    levels = list(levels or p.levels) if gaussian else [0]
    common = dict(levels=levels, n=p.n, seed=p.seed, batch_size=p.sample_batch, keep_samples=True)
    tags = {"row": key, "scoring": job.scoring}
    rows = []
    for cfg in (SweepConfig(modes=modes if gaussian else ["non-truncated"], **common),
                SweepConfig(conditioning="ground-truth", **common)):
        with job.ledger.task(f"points {key} {cfg.conditioning}"):
            rows += run_sweep(cascade, job.sampling, cfg, Judge(scorer, job.metric, PRIMARY), job.points_dir, job.log,
                              tags=tags, ground_truth=gt if cfg.conditioning == "ground-truth" else None)
    return sorted(rows, key=lambda r: (r["conditioning"], r["mode"], r["level"]))


# ----------------------------------------------------------------------------- CAS
def condition(row: dict) -> str:
    """single-stage, truncated, non-truncated or ground-truth."""
    return "ground-truth" if row["conditioning"] == "ground-truth" else row["mode"]


def best(points: list[dict], key: str, cond: str) -> dict | None:
    """The point of row ``key`` and condition ``cond`` with the lowest classifier FID (ties: smaller s)."""
    rows = [r for r in points if r["row"] == key and condition(r) == cond]
    return min(rows, key=lambda r: (r["value"], r["level"])) if rows else None


def main_points(points: list[dict]) -> list[dict]:
    """The rows CAS is computed for: the single stage, the cascade without augmentation, with
    Gaussian augmentation at the best s of each generated-input mode, and with blur."""
    picks = [best(points, SINGLE, "single-stage"), best(points, "sr-none", "non-truncated"),
             best(points, "sr-gaussian", "truncated"), best(points, "sr-gaussian", "non-truncated"),
             best(points, "sr-blur", "non-truncated")]
    return [r for r in picks if r is not None]


def cas_points(picks: list[dict], points_dir: Path, path: Path, data: DataConfig, p: Profile, ledger: Ledger,
               log: Log) -> list[dict]:
    """CAS of each main point (the classifier recipe trained on its samples and their labels,
    tested on the real test split, or a class-stratified subset of ``p.cas_test_limit`` of it) and of
    as many real train images (a class-stratified subset); rows in ``cas.jsonl``."""
    test = load_reference(data, ReferenceSpec(split="test", n=p.cas_test_limit))
    cfg = ClassifierConfig(**{**p.cas, "resolution": data.resolution, "channels": 1,
                              "num_classes": len(test.class_names)})
    recipe = {**to_dict(cfg), "test_limit": p.cas_test_limit}
    rows = read_rows(path)
    out = []

    def one(ident: dict, get: Callable[[], tuple]) -> dict:
        for r in rows:
            if all(r.get(k) == v for k, v in ident.items()):
                return r
        t = time.time()
        images, labels = get()
        acc = train_and_test(images, labels, test.images, test.labels, cfg)
        acc["n_test"] = acc.pop("n")
        row = {**ident, **acc, "seconds": round(time.time() - t, 1)}
        append_row(path, row)
        rows.append(row)
        log(f"CAS {ident['row']} {ident.get('condition', '')} s={ident.get('level', '')}: top-1 {acc['top1']:.2f}%")
        return row

    with ledger.task("CAS"):
        for r in picks:
            ident = {"row": r["row"], "condition": condition(r), "level": r["level"], "samples": r["samples"],
                     "recipe": recipe}

            def get(r=r):
                z = load_samples(points_dir / r["samples"])
                if z is None:
                    raise FileNotFoundError(f"{points_dir / r['samples']} is missing or damaged; delete its row "
                                            f"from {points_dir / 'results.jsonl'} and re-run to sample it again")
                return to_float(z["images"]), z["labels"]

            out.append(one(ident, get))

        def real():
            ims = load_reference(data, ReferenceSpec(split="train", n=p.n, seed=p.seed))
            return ims.images, ims.labels

        out.append(one({"row": "real", "condition": "real train images", "level": None, "n": p.n,
                        "recipe": recipe}, real))
    return out
