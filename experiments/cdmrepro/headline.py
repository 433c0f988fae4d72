"""The paper's headline at equal compute: does the Gaussian-augmented cascade beat the unaugmented
one, and does the best cascade beat a single-stage model given the same training FLOPs?

For each training budget ``b`` (a multiple of the reference budget ``B``: the base and SR presets'
training FLOPs at the profile's scale) and each training seed:

- a single stage at the final resolution (32 px; 64 px in the ``gpu`` profile) trained for ``b * B`` FLOPs;
- for each split ``f`` (the base stage's share): a base stage trained for ``f * b * B`` FLOPs and
  each SR row (no augmentation, Gaussian augmentation; blur too at the budgets ``blur_budgets``)
  for ``(1 - f) * b * B`` — the base stage is retrained for every budget, split and seed, never
  shared.

Every SR stage's level ``s`` (Gaussian: among ``levels``; none and blur: 0) is chosen on *selection*
samples (seeds from ``select_seed``, ``n_select`` per candidate). The split is tuned on the
``select_seeds`` (training seed 0): their cascades are trained at every split and selected, and each
row's split is the one with the lowest selection FID there; every seed then reports that row at
that split on the *report* samples (seeds from the profile's ``seed``, ``n_report`` each, classifier
and Inception space), every other seed training that split only. So no number is chosen on the
samples it is reported on, and the split sweep costs one seed, not all. A headline number is a
mean ± standard deviation over training seeds; a claim holds when the difference of the means
exceeds twice its standard error over seeds (``sqrt(sd_a^2 / k_a + sd_b^2 / k_b)``).

The study is longer than a 2-core machine's session, so it is kept as *cells*, each a line of
``cells.jsonl``: a *split cell* (``b1/seed0/f0.2/sr-gaussian``: one cascade of a select seed at one
split, trained and selected) or a *row cell* (``b1/seed0/single``, ``b1/seed1/sr-gaussian`` at its
chosen split, ``b1/seed0/3-stage``: trained, selected and reported) in the record folder (:class:`Record`;
``--record docs/headline`` keeps it in the repository). A re-run, even on a fresh clone, trains only
the cells missing there; within one run, stages train once and every scored sample set is a row of
``points/results.jsonl`` (``cdm.eval.ledger``), so a killed run loses at most the point in progress.

A machine without the FID Inception weights (a lent GPU, whose copy of the repository cannot carry
the 87 MB file) runs with ``defer_inception``: its row cells are recorded with ``inception_fid``
pending and their report samples kept (``OUT/points/samples/``, named by the cell's ``samples``);
:func:`fill_inception`, on a machine that has the weights, scores those samples and records the
cells again, complete (the record keeps a cell's last line).
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from cdm.cascade import Cascade, SamplingPlan
from cdm.checkpoint import atomic_write, load_stage
from cdm.config import ConfigError, to_dict
from cdm.data import load_dataset, to_float
from cdm.distributed import pick_device
from cdm.eval.ledger import Judge, append_row, load_samples, read_rows, score_point, stage_fingerprint
from cdm.eval.sweep import SweepConfig, run_sweep
from cdm.generate import cycle_labels, sample_batched

from .ledger import Ledger, machine_info
from .plan import AUGMENT, BASE, STUDY_PINS, StudyStage, _load, _match_flops, _plan, plan_stages
from .profiles import Profile
from .run import Log, PointJob, _write_json, build_scorer, single_point, study_data, train
from .scoring import PRIMARY

CASCADE_ROWS = ("sr-none", "sr-gaussian")  # at every budget
BLUR = "sr-blur"  # at the budgets Headline.blur_budgets
THREE = "3-stage"
SELECT, REPORT = "select", "report"  # a cell's kind: a select seed's cascade at one split / a reported row
Z = 2.0  # a claim holds beyond Z standard errors over seeds


@dataclass(frozen=True)
class Headline:
    """The study's grid (on top of a :class:`Profile`, which sets the scale and the networks)."""
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds of every row
    select_seeds: tuple[int, ...] = (0,)  # the seeds whose cascades are trained at every split, to choose it
    budgets: tuple[float, ...] = (0.5, 1.0, 2.0)  # multiples of the reference budget B
    splits: tuple[float, ...] = (0.1, 0.2, 0.35)  # the base stage's share of a cascade's FLOPs
    levels: tuple[int, ...] = (0, 100, 200)  # Gaussian levels tried on the selection samples
    n_select: int = 250  # selection samples per candidate
    select_seed: int = 1_000_000  # selection sample j uses select_seed + j (report: the profile's seed + j)
    n_report: int = 2000  # report samples per point (classifier FID); the table's rows also in Inception space
    steps_scale: float = 0.5  # multiplies the presets' steps: B, the reference budget, follows
    inception: bool = True  # score the table's rows in Inception space too (n_report samples each)
    # the three-stage cascade (8 -> 16 -> 32 at the cpu profile's scale, :func:`three_stages`) at budget
    # 1 x B: the shares of base, first and second SR stage (both Gaussian-augmented; their levels chosen
    # jointly on the selection samples among `levels`)
    three_stage: tuple[float, float, float] = (0.15, 0.3, 0.55)
    blur_budgets: tuple[float, ...] = (1.0,)  # budgets with a blur-augmented SR row too (every split)

    def rows(self, b: float) -> tuple[str, ...]:
        """The cascade rows trained at budget ``b``."""
        return CASCADE_ROWS + ((BLUR,) if b in self.blur_budgets else ())


HEADLINES = {
    "cpu": Headline(),
    "smoke": Headline(seeds=(0, 1), select_seeds=(0,), budgets=(0.5, 1.0), splits=(0.3, 0.5), levels=(0, 100),
                      n_select=16, n_report=16, steps_scale=0.004, inception=False),
    "gpu": Headline(n_select=2000, n_report=10000, steps_scale=10.0),
}


def reference_budget(stages: dict[str, StudyStage]) -> int:
    """B: the training FLOPs of the base and Gaussian SR presets (``stages``: :func:`plan_stages`'s)."""
    return stages[BASE].train_flops + stages["sr-gaussian"].train_flops


def three_stages(profile: Profile) -> list[tuple[str, int, int]]:
    """The three-stage cascade's stages as ``(name, resolution, lowres_resolution)``: the base stage,
    then two SR stages through the geometric middle (8 -> 16 -> 32: ``sr8to16``, ``sr16to32``)."""
    lo, hi = profile.base_resolution, profile.resolution
    mid = math.isqrt(lo * hi)
    if mid * mid != lo * hi or not lo < mid < hi:
        raise ConfigError(f"profile {profile.name!r}: a three-stage cascade from {lo} to {hi} px needs a middle "
                          f"resolution: make resolution / base_resolution a square (4, 16, ...)")
    return [(BASE, lo, 0), (f"sr{lo}to{mid}", mid, lo), (f"sr{mid}to{hi}", hi, mid)]


def plan_headline(profile: Profile, h: Headline, device: str, data_path: str = "") -> dict[str, StudyStage]:
    """Every stage the study trains, keyed ``b{b}/seed{k}/single`` and ``b{b}/seed{k}/f{f}/{row}``
    (row: base, sr-none, sr-gaussian, sr-blur at ``h.blur_budgets``), each trained for its share of ``b * B`` FLOPs."""
    stages = plan_stages(replace(profile, steps_scale=h.steps_scale), device, data_path)
    total = reference_budget(stages)
    single_template = stages["single"].config  # the SR stage's U-Net, at its resolution
    plans: dict[str, StudyStage] = {}
    for b in h.budgets:
        for k in h.seeds:
            seed = (f"train.seed={k}",)
            cfg = copy.deepcopy(single_template)
            cfg.name, cfg.train.seed = f"single-b{b:g}-seed{k}", k
            plans[f"b{b:g}/seed{k}/single"] = _match_flops(_plan("single", cfg, 1, 10), round(b * total))
            for f in h.splits:
                key = f"b{b:g}/seed{k}/f{f:g}"
                base = _load(profile, "fmnist-base8", "base", f"base-b{b:g}-f{f:g}-seed{k}", device, data_path,
                             None, seed)
                plans[f"{key}/{BASE}"] = _match_flops(_plan(BASE, base, 1, 10), round(f * b * total))
                for row in h.rows(b):
                    sr = _load(profile, "fmnist-sr8to32", "sr", f"{row}-b{b:g}-f{f:g}-seed{k}", device, data_path,
                               {"augment": {"kind": AUGMENT[row]}}, seed)
                    plans[f"{key}/{row}"] = _match_flops(_plan(row, sr, 1, 10), round((1 - f) * b * total))
            if b == 1.0 and h.three_stage:
                key = f"b1/seed{k}/{THREE}"
                (_, *srs), shares = three_stages(profile), h.three_stage
                base = _load(profile, "fmnist-base8", "base", f"3stage-base-seed{k}", device, data_path, None, seed)
                plans[f"{key}/base"] = _match_flops(_plan(BASE, base, 1, 10), round(shares[0] * total))
                for (name, res, low), share in zip(srs, shares[1:]):
                    sr = _load(profile, "fmnist-sr8to32", "sr", f"3stage-{name}-seed{k}", device, data_path,
                               {"resolution": res, "lowres_resolution": low}, seed)
                    plans[f"{key}/{name}"] = _match_flops(_plan(name, sr, 1, 10), round(share * total))
    return plans


RECORD = "cells.jsonl"  # in the record folder (--record): one line per finished cell


def study_settings(profile: Profile, h: Headline) -> dict:
    """What every cell's numbers depend on besides its own key and its stages' configs: a cell
    recorded under other settings is not reused."""
    return {"levels": list(h.levels), "select_seeds": list(h.select_seeds), "n_select": h.n_select,
            "select_seed": h.select_seed, "n_report": h.n_report, "steps_scale": h.steps_scale,
            "inception": h.inception, "three_stage": list(h.three_stage), "sampler": profile.sampler,
            "sample_steps": profile.sample_steps, "spacing": profile.spacing, "report_seed": profile.seed,
            "n_ref": profile.n_ref, "n_incep_ref": max(profile.n_incep_ref, h.n_report),
            "bootstrap": profile.bootstrap, "classifier": profile.classifier,
            "classifier_limit": profile.classifier_limit, "pins": list(STUDY_PINS)}


def config_id(cfg) -> str:
    """A stage config's identity, without what names the machine (device, data folder) or the run, or how
    its batches are read (data.workers; data.fingerprint, a prepared set's, which data.path would name)."""
    d = to_dict(cfg)
    d.pop("name", None)
    d["train"].pop("device", None)
    for k in ("path", "workers", "fingerprint"):
        d["data"].pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def file_id(path: Path) -> str | None:
    """A file's identity (a hash of its bytes), None if it does not exist."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else None


class Record:
    """The study's finished cells, ``DIR/cells.jsonl``: a cell is one trained row of one budget and
    seed (``b1/seed0/single``, ``b1/seed0/f0.2/sr-gaussian``, ``b1/seed0/3-stage``) with its selection
    and report scores. Small enough to commit, so a study longer than one machine's life resumes on
    a fresh clone: only the cells missing here are trained (checkpoints are a cell's own business).
    The folder also keeps the study's domain classifier (``classifier/``, 0.3 MB): every cell is
    scored in one feature space, whichever machine trained it (a classifier retrained elsewhere would
    differ in its last bits, and so would the FIDs)."""

    def __init__(self, folder: Path, settings: dict, log: Log):
        self.path = folder / RECORD
        self.study = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        other = sum(r.get("study") != self.study for r in self.reload())  # not a cell recorded again
        if other:
            log(f"{self.path}: {other} cells of other study settings are ignored")

    def reload(self) -> list[dict]:
        """Read the file again (another process may be recording other seeds into it); returns
        every row, this study's or not."""
        rows = read_rows(self.path)
        self.cells = {r["cell"]: r for r in rows if r.get("study") == self.study}
        return rows

    def get(self, key: str, stages: dict[str, str], classifier: str | None) -> dict | None:
        """The recorded cell ``key`` if its stages' configs are ``stages`` (``{stage key: config_id}``)
        and it was scored with the domain classifier ``classifier`` (:func:`file_id`)."""
        r = self.cells.get(key)
        return r if r is not None and r.get("stages") == stages and r.get("classifier") == classifier else None

    def add(self, row: dict) -> dict:
        row = {"study": self.study, **row}
        append_row(self.path, row)
        self.reload()
        return row


@dataclass
class RunOptions:
    """How one call of :func:`run_headline` shares and limits its work."""
    record: Path | None = None  # the record of cells processes share (default: the output folder)
    seeds: tuple[int, ...] | None = None  # a subset of the study's seeds (default: all)
    only: tuple[str, ...] = ()  # glob patterns of the cell keys to run, e.g. b2/seed0/f0.1/*
    defer_inception: bool = False  # leave the rows' Inception FIDs to fill_inception
    after_cell: Callable[[dict], None] | None = None  # called with the summary after each new cell


def run_headline(out: Path, profile: Profile, h: Headline, device: str, data_path: str, command: str,
                 log: Log, opts: RunOptions | None = None) -> dict:
    """Train, select and score every cell of the grid not yet in ``opts.record`` (default ``out``), seed
    by seed (``opts.seeds``, ``opts.only``: so that processes can share one seed's cells); returns the
    summary of every recorded cell (:func:`summarise`), also passed to ``opts.after_cell`` after each
    new cell. With ``opts.defer_inception`` the row cells' Inception FIDs are left to
    :func:`fill_inception` (``out``'s report samples). A cascade row is reported only once every split
    of it is selected."""
    opts = opts or RunOptions()
    record, seeds, only, defer_inception, after_cell = (opts.record, opts.seeds, opts.only, opts.defer_inception,
                                                        opts.after_cell)
    out.mkdir(parents=True, exist_ok=True)
    settings = study_settings(profile, h)
    pending = h.inception and defer_inception
    profile = _scoring_profile(profile, h, settings, inception=h.inception and not defer_inception)
    rec = Record(Path(record or out), settings, log)
    run_seeds = seeds if seeds is not None else h.seeds
    waiting = _check_select_seeds(rec, h, run_seeds)
    if waiting:
        log(f"cascade rows at budget(s) {', '.join(f'{b:g}B' for b in waiting)} skipped for seed(s) "
            f"{[k for k in run_seeds if k not in h.select_seeds]}: the select seed(s) {list(h.select_seeds)} "
            f"have not chosen their splits yet; run again once they have (the single stages run now)")
    clf_dir = rec.path.parent / "classifier"
    clf_file = clf_dir / "classifier.safetensors"
    dev = pick_device(device or profile.device)
    machine = machine_info(dev)
    ledger = Ledger(out / "timings.json", command, machine, profile.name)
    data_cfg = study_data(profile, data_path)
    plans = plan_headline(profile, h, str(dev), data_path)
    _write_json(out / "plan.json", {k: {"steps": v.config.train.steps, "train_flops": v.train_flops}
                                    for k, v in plans.items()})
    budget = reference_budget(plan_stages(profile, str(dev), data_path))
    ids = {k: config_id(v.config) for k, v in plans.items()}  # before training fills in a config's data fields
    loaded: dict = {}

    def needs():  # the data, scorer and the rest, once the first missing cell needs them
        if not loaded:
            with ledger.task("load data"):
                loaded["data"] = load_dataset(data_cfg)
            loaded["scorer"], loaded["metric"], refs = build_scorer(profile, out, data_cfg, str(dev), ledger, log,
                                                                    clf_dir)
            loaded["scoring"] = {"n_ref": profile.n_ref, "bootstrap": profile.bootstrap, **refs}
        return loaded

    def ckpt(key: str) -> Path:
        return train(plans[key], out / "stages" / key.replace("/", "__"), needs()["data"], ledger, log, False)

    plan = SamplingPlan.uniform(2, steps=profile.sample_steps, sampler=profile.sampler, spacing=profile.spacing)
    points = out / "points"

    def job(got: dict, sampling: SamplingPlan) -> PointJob:
        return PointJob(sampling, profile, points, got["metric"], got["scoring"], dev, ledger, log)
    about = _about(machine)

    def cascade_points(key: str, levels, n: int, seed: int, phase: str) -> list[dict]:
        """The cascade ``key`` (``b{b}/seed{k}/f{f}/{row}``) sampled at ``levels`` and scored (report
        samples in Inception space too)."""
        base = load_stage(ckpt(f"{key.rsplit('/', 1)[0]}/{BASE}"), dev)
        cascade = Cascade([base, load_stage(ckpt(key), dev)])
        got = needs()
        judge = Judge(got["scorer"].for_row(key, None if phase == "report" else ()), got["metric"], PRIMARY)
        cfg = SweepConfig(levels=list(levels), modes=["non-truncated"], n=n, seed=seed,
                          batch_size=profile.sample_batch, keep_samples=phase == "report")
        with ledger.task(f"{phase} {key}"):
            return run_sweep(cascade, plan, cfg, judge, points, log,
                             tags={"row": key, "phase": phase, "scoring": got["scoring"]})

    def select(key: str, row: str) -> dict:
        """The cascade ``key``'s level chosen on the selection samples."""
        sel = cascade_points(key, h.levels if row == "sr-gaussian" else (0,), h.n_select, h.select_seed, "select")
        pick = min(sel, key=lambda r: (r["value"], r["level"]))
        return {"level": pick["level"], "select_fid": pick["value"],
                "select": {str(r["level"]): r["value"] for r in sel}}

    def cell(key: str, stage_keys: list[str], make: Callable[[], dict], **ident) -> dict | None:
        if only and not any(fnmatch.fnmatchcase(key, pat) for pat in only):
            return None
        stages = {s: ids[s] for s in stage_keys}
        rec.reload()
        done = rec.get(key, stages, file_id(clf_file))
        if done is not None:
            return done
        t = time.time()
        got = make()
        if pending and ident["kind"] == REPORT:
            got["inception_pending"] = True
        row = rec.add({"cell": key, **ident, **got, "metric": loaded["metric"], "stages": stages,
                       "classifier": file_id(clf_file),
                       "train_flops": sum(plans[s].train_flops for s in stage_keys),
                       "seconds": round(time.time() - t, 1), "machine": about, "date": time.strftime("%Y-%m-%d")})
        log(f"cell {key}: " + (f"FID {row['fid']:.3f}" if row["fid"] is not None else
                               f"selection FID {row['select_fid']:.3f}") + f" (level {row['level']})")
        if after_cell:
            after_cell(summarise(rec, h, command, budget, profile))
        return row

    for k in run_seeds:  # a whole seed first
        for b in h.budgets:
            key = f"b{b:g}/seed{k}/single"

            def single(key=key) -> dict:
                got = needs()
                r = single_point(ckpt(key), job(got, plan), got["scorer"].for_row(key, None), key=key)
                return {"level": 0, "select_fid": None, **_metrics(r)}

            cell(key, [key], single, kind=REPORT, budget=b, seed=k, split=None, row="single")
            for row in h.rows(b):
                if k in h.select_seeds:  # this seed tunes the split: every split trained and selected
                    for f in h.splits:
                        key = f"b{b:g}/seed{k}/f{f:g}/{row}"
                        cell(key, [f"b{b:g}/seed{k}/f{f:g}/{BASE}", key], lambda key=key, row=row: {
                            **select(key, row), "fid": None, "fid_se": None, "inception_fid": None},
                            kind=SELECT, budget=b, seed=k, split=f, row=row)
                rec.reload()
                unselected = [f"b{b:g}/seed{s}/f{f:g}/{row}" for s in h.select_seeds for f in h.splits
                              if f"b{b:g}/seed{s}/f{f:g}/{row}" not in rec.cells]
                if unselected:  # another process (--only) selects them, or the time ran out
                    if b not in waiting and (not only or any(fnmatch.fnmatchcase(f"b{b:g}/seed{k}/{row}", pat)
                                                             for pat in only)):
                        log(f"b{b:g}/seed{k}/{row} skipped: its splits are not all selected yet "
                            f"({', '.join(unselected)}); run again once they are")
                    continue
                f = chosen_split([c for c in rec.cells.values() if c["kind"] == SELECT], b, row)
                at = f"b{b:g}/seed{k}/f{f:g}/{row}"

                def report(at=at, row=row) -> dict:
                    tuned = rec.cells.get(at) if k in h.select_seeds else None  # its selection is done
                    sel = {s: tuned[s] for s in ("level", "select_fid", "select")} if tuned else select(at, row)
                    rep = cascade_points(at, (sel["level"],), h.n_report, profile.seed, "report")[0]
                    return {**sel, **_metrics(rep)}

                cell(f"b{b:g}/seed{k}/{row}", [f"b{b:g}/seed{k}/f{f:g}/{BASE}", at], report,
                     kind=REPORT, budget=b, seed=k, split=f, row=row)
            if b == 1.0 and h.three_stage:
                key = f"b1/seed{k}/{THREE}"
                names = [f"{key}/{n}" for n, _, _ in three_stages(profile)]

                def three(k=k, names=names) -> dict:
                    got = needs()
                    return three_stage_row(k, [ckpt(n) for n in names], job(got, plan), h, got["scorer"])

                cell(key, names, three, kind=REPORT, budget=1.0, seed=k, split=None, row=THREE)
    ledger.finish()
    summary = summarise(rec, h, command, budget, profile)
    summary["timings"] = ledger.data
    _write_json(out / "headline.json", summary)
    return summary


def _scoring_profile(profile: Profile, h: Headline, settings: dict, inception: bool) -> Profile:
    """``profile`` at the study's scale and sample counts, scoring in Inception space or not."""
    return replace(profile, steps_scale=h.steps_scale, n=h.n_report, n_incep=h.n_report if inception else 0,
                   n_incep_ref=settings["n_incep_ref"])


def fill_inception(out: Path, profile: Profile, h: Headline, device: str, data_path: str, command: str, log: Log,
                   record: Path) -> dict:
    """Score in Inception space the row cells of ``record`` recorded with ``inception_pending`` (by a
    run with ``defer_inception``), from their report samples under ``out/points`` (that run's
    ``--out``, or a copy of its ``points/samples``), and record each cell again with its Inception
    FID. Each sample file is first checked against its cell: its classifier FID must be the one
    recorded (up to the two machines' arithmetic). Returns the summary (:func:`summarise`)."""
    rec, budget = _recorded(record, profile, h, device, data_path, log)
    settings = study_settings(profile, h)
    todo = [c for c in rec.cells.values() if c["kind"] == REPORT and c.get("inception_pending")]
    if not h.inception or not todo:
        log("no cell waits for its Inception FID")
        return summarise(rec, h, command, budget, profile)
    files = {c["cell"]: out / "points" / c["samples"] if c.get("samples") else None for c in todo}
    missing = [k for k, f in files.items() if f is None or not f.exists()]
    if len(missing) == len(todo):
        raise ConfigError(f"none of the {len(todo)} cells waiting for their Inception FID has its report samples "
                          f"under {out / 'points' / 'samples'} (e.g. {files[todo[0]['cell']]}): pass as --out the "
                          f"folder of the run that recorded them, or unpack its points/samples there")
    for k in missing:
        log(f"cell {k}: its report samples are not under {out / 'points' / 'samples'}; left pending")
    dev = pick_device(device or profile.device)
    machine = machine_info(dev)
    ledger = Ledger(out / "timings.json", command, machine, profile.name)
    data_cfg = study_data(profile, data_path)
    scorer, _, _ = build_scorer(_scoring_profile(profile, h, settings, inception=True), out, data_cfg, str(dev),
                                ledger, log, record / "classifier")
    for c in todo:
        if c["cell"] in missing:
            continue
        t = time.time()
        kept = load_samples(files[c["cell"]])
        if kept is None:
            raise ConfigError(f"{files[c['cell']]}: not a readable sample file (a broken copy?); copy it again")
        labels = kept["labels"]
        x = to_float(kept["images"])
        check = scorer(x, labels, inception=False)["fid"]
        if not math.isclose(check, c["fid"], rel_tol=1e-3, abs_tol=1e-3):
            raise ConfigError(f"{files[c['cell']]}: its classifier FID is {check:.4f}, but cell {c['cell']} "
                              f"recorded {c['fid']:.4f}: these are not that cell's report samples")
        with ledger.task(f"inception {c['cell']}"):
            v = scorer.inception_fid(x[:h.n_report])
        done = {k: v2 for k, v2 in c.items() if k != "inception_pending"}
        rec.add({**done, "inception_fid": v, "inception_scored": {
            "machine": _about(machine),
            "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t, 1)}})
        log(f"cell {c['cell']}: Inception FID {v:.3f} (classifier FID {check:.3f}, recorded {c['fid']:.3f})")
    ledger.finish()
    return summarise(rec, h, command, budget, profile)


def report_from_record(record: Path, profile: Profile, h: Headline, device: str, data_path: str, command: str,
                       log: Log) -> dict:
    """The summary (:func:`summarise`) of the cells recorded in ``record``, training nothing (e.g. after
    copying in cells another machine recorded)."""
    rec, budget = _recorded(record, profile, h, device, data_path, log)
    return summarise(rec, h, command, budget, profile)


def _recorded(record: Path, profile: Profile, h: Headline, device: str, data_path: str,
              log: Log) -> tuple[Record, int]:
    """The study's record in ``record`` (which must exist) and B, the reference budget."""
    if not (record / RECORD).exists():
        raise ConfigError(f"{record / RECORD} does not exist: no cells recorded there yet")
    rec = Record(record, study_settings(profile, h), log)
    return rec, reference_budget(plan_stages(replace(profile, steps_scale=h.steps_scale), device, data_path))


def _about(machine: dict) -> dict:
    """What a cell keeps of :func:`machine_info`: the CPU, its threads and the device."""
    return {"cpu": machine["cpu"], "threads": machine["threads"], "device": machine["device"]}


def _check_select_seeds(rec: Record, h: Headline, seeds: tuple[int, ...]) -> list[float]:
    """Seeds outside ``h.select_seeds`` report each cascade row at the split those chose: they need
    the select seeds' split cells recorded, or run in the same call (after them). Returns the budgets
    whose cascade rows the other seeds skip in this call (their single stages run), because the
    select seeds' cells of that budget are neither recorded nor trained by it (e.g. ``--seeds 1,2``
    beside a ``--seeds 0`` still at 2B); refuses a call for which no budget is ready."""
    todo = [k for k in h.select_seeds if k not in seeds]
    have = {(c["seed"], c["budget"], c["row"], c["split"]) for c in rec.cells.values() if c["kind"] == SELECT}
    waiting = [b for b in h.budgets
               if any((k, b, row, f) not in have for k in todo for row in h.rows(b) for f in h.splits)]
    others = [k for k in seeds if k not in h.select_seeds]
    if others and waiting == list(h.budgets):
        raise ConfigError(f"--seeds {','.join(map(str, seeds))}: the cascade rows' split is chosen on training "
                          f"seed(s) {list(h.select_seeds)}, whose cells are not recorded for any budget; run those "
                          f"first (--seeds {','.join(map(str, h.select_seeds))}) or all seeds together")
    order = [k for k in seeds if k in h.select_seeds] + [k for k in seeds if k not in h.select_seeds]
    if list(seeds) != order:
        raise ConfigError(f"--seeds {','.join(map(str, seeds))}: list the select seed(s) "
                          f"{list(h.select_seeds)} first, they choose the split the others use")
    return waiting if others else []


def summarise(rec: Record, h: Headline, command: str, budget: int, profile: Profile) -> dict:
    """Every recorded cell of this grid, its table over seeds (:func:`aggregate`) and the claims
    (``budget``: B, :func:`reference_budget`; ``profile``: the study's scale)."""
    grid = {(b, f) for b in h.budgets for f in (None, *h.splits)}
    cells = [r for r in rec.cells.values() if (r["budget"], r["split"]) in grid]
    rows = [r for r in cells if r["kind"] == REPORT]
    selected = [r for r in cells if r["kind"] == SELECT]
    table = aggregate(rows, selected, h)
    per_seed = sum(1 + len(h.rows(b)) for b in h.budgets) + (1 if 1.0 in h.budgets and h.three_stage else 0)
    return {"headline": asdict(h), "study": rec.study, "command": command,
            "scale": {"base_resolution": profile.base_resolution, "resolution": profile.resolution, "fit": profile.fit},
            "metric": cells[0]["metric"] if cells else PRIMARY,
            "reference_budget_flops": budget,
            "seeds_recorded": sorted({r["seed"] for r in rows}), "rows": rows, "selected": selected,
            "table": table, "claims": claims(table), "cell_seconds": round(sum(r["seconds"] for r in cells), 1),
            "cells_recorded": len(cells),
            "inception_pending": sorted(r["cell"] for r in rows if r.get("inception_pending")),
            "cells_planned": len(h.seeds) * per_seed
            + len(h.select_seeds) * len(h.splits) * sum(len(h.rows(b)) for b in h.budgets)}


def chosen_split(selected: list[dict], b: float, row: str) -> float:
    """The split of ``row`` at budget ``b`` with the lowest selection FID, averaged over the select
    seeds (``selected``: the split cells, :data:`SELECT`)."""
    by_split: dict[float, list[float]] = {}
    for e in selected:
        if e["budget"] == b and e["row"] == row:
            by_split.setdefault(e["split"], []).append(e["select_fid"])
    if not by_split:
        raise ValueError(f"no selection FIDs for {row} at budget {b:g}")
    return min(by_split, key=lambda f: (statistics.fmean(by_split[f]), f))


def three_stage_row(k: int, ckpts: list[Path], job: PointJob, h: Headline, scorer) -> dict:
    """Seed ``k``'s three-stage cascade: its two SR levels chosen jointly on the selection samples
    (every pair of ``h.levels``), then scored at that pair on the report samples (in Inception space too)."""
    profile, metric, points, log = job.profile, job.metric, job.points_dir, job.log
    cascade = Cascade([load_stage(p, job.device) for p in ckpts])
    st = job.sampling.stages[-1]
    key = f"b1/seed{k}/{THREE}"
    ident = {"row": key, "scoring": job.scoring, "fingerprints": [stage_fingerprint(s) for s in cascade.stages],
             "metric": metric, "steps": st.steps, "sampler": st.sampler, "spacing": st.spacing}

    def point(levels: list[int], n: int, seed: int, phase: str) -> dict:
        plan = SamplingPlan.uniform(3, steps=st.steps, levels=levels, sampler=st.sampler, spacing=st.spacing)
        judge = Judge(scorer.for_row(key, None if phase == "report" else ()), metric, PRIMARY)

        def sample():
            labels = cycle_labels(n, cascade.num_classes)
            res = sample_batched(cascade, labels, list(range(seed, seed + n)), plan, profile.sample_batch)
            return res.images[-1], labels, res.inputs[-1]

        return score_point(points, {**ident, "phase": phase, "levels": levels, "n": n, "seed": seed}, sample,
                           judge, keep_samples=phase == "report", name=f"{key}-{phase}-s{levels[1]}-{levels[2]}",
                           progress=log)

    with job.ledger.task(f"select {key}"):
        sel = [point([0, s1, s2], h.n_select, h.select_seed, "select") for s1 in h.levels for s2 in h.levels]
    pick = min(sel, key=lambda r: (r["value"], r["levels"]))
    with job.ledger.task(f"report {key}"):
        rep = point(pick["levels"], h.n_report, profile.seed, "report")
    return {"level": pick["levels"][1:], "select_fid": pick["value"],
            "select": {f"{r['levels'][1]},{r['levels'][2]}": r["value"] for r in sel}, **_metrics(rep)}


def _metrics(point: dict) -> dict:
    m = point.get("metrics", {})
    return {"fid": m.get("fid", point["value"]), "fid_se": m.get("fid_se"), "inception_fid": m.get("inception_fid"),
            "samples": point.get("samples")}  # under the run's points/: what fill_inception scores


def _mean_sd(values: list[float]) -> tuple[float, float, int]:
    k = len(values)
    return statistics.fmean(values), (statistics.stdev(values) if k > 1 else float("nan")), k


def aggregate(rows: list[dict], selected: list[dict], h: Headline) -> list[dict]:
    """Per budget: the single stage (and the three-stage cascade), and each cascade row at its
    chosen split (:func:`chosen_split`); each with the mean ± sd over seeds of its report FIDs
    (``rows``: the :data:`REPORT` cells), and for cascade rows the select seeds' mean selection FID
    at every split (``selected``: the :data:`SELECT` cells)."""
    out = []
    for b in h.budgets:
        for one in ("single", THREE):
            got = [r for r in rows if r["budget"] == b and r["row"] == one]
            if got:
                out.append(_entry(b, one, None, got))
        for row in h.rows(b):
            if not any(e["budget"] == b and e["row"] == row for e in selected):
                continue
            f = chosen_split(selected, b, row)
            got = [r for r in rows if (r["budget"], r["row"], r["split"]) == (b, row, f)]
            at = {g: [e["select_fid"] for e in selected if (e["budget"], e["row"], e["split"]) == (b, row, g)]
                  for g in h.splits}
            if got:
                out.append(_entry(b, row, f, got, {g: statistics.fmean(v) for g, v in at.items() if v}))
    return out


def _entry(b: float, row: str, split: float | None, rs: list[dict], per_split: dict | None = None) -> dict:
    m, sd, k = _mean_sd([r["fid"] for r in rs])
    incep = [r["inception_fid"] for r in rs if r["inception_fid"] is not None]
    return {"budget": b, "row": row, "split": split, "fid_mean": m, "fid_sd": sd, "seeds": k,
            "levels": [r["level"] for r in rs], "inception_mean": statistics.fmean(incep) if incep else None,
            "inception_sd": statistics.stdev(incep) if len(incep) > 1 else None, "inception_seeds": len(incep),
            "select_fid_by_split": per_split}


def _gap(a: dict, b: dict) -> tuple[float, float]:
    """``mean(a) - mean(b)`` and its standard error over seeds."""
    se = math.sqrt(a["fid_sd"] ** 2 / a["seeds"] + b["fid_sd"] ** 2 / b["seeds"])
    return a["fid_mean"] - b["fid_mean"], se


def claims(table: list[dict]) -> list[dict]:
    """Per budget: (a) Gaussian-augmented cascade better than unaugmented; (b) the best cascade
    better than the single stage; (c) the three-stage cascade better than the best two-stage one;
    (d) Gaussian augmentation better than blur. ``holds`` / ``does not hold`` / ``not resolved``
    (within Z SE)."""
    out = []
    for b in sorted({e["budget"] for e in table}):
        got = {e["row"]: e for e in table if e["budget"] == b}
        pairs = [("a", "sr-none", "sr-gaussian", "the Gaussian-augmented cascade beats the unaugmented one"),
                 ("b", "single", "sr-gaussian", "the best cascade beats the single stage at equal training FLOPs"),
                 ("c", "sr-gaussian", THREE, "the three-stage cascade beats the two-stage one"),
                 ("d", BLUR, "sr-gaussian", "Gaussian augmentation beats blur augmentation")]
        for tag, worse, better, text in pairs:
            if worse in got and better in got:
                d, se = _gap(got[worse], got[better])
                verdict = ("holds" if d > Z * se else "does not hold" if d < -Z * se else "not resolved") \
                    if math.isfinite(se) else "not resolved (one seed)"
                out.append({"claim": tag, "budget": b, "text": text, "difference": d, "se": se, "verdict": verdict})
    return out


def markdown(summary: dict) -> str:
    """The study's tables and verdicts, as Markdown."""
    h = summary["headline"]
    cells = summary["rows"] + summary["selected"]
    machines = sorted({f"{r['machine']['cpu']} ({r['machine']['device']}, {r['machine']['threads']} "
                       f"thread{'s' if r['machine']['threads'] != 1 else ''})" for r in cells})
    def seq(v) -> str:
        return ", ".join(f"{x:g}" for x in v)

    sc = summary.get("scale", {})
    lo, hi = sc.get("base_resolution", 8), sc.get("resolution", 32)
    fit = f"its 28-px images {'upsampled (bicubic)' if sc.get('fit') in ('resize', 'resize-up') else 'padded'} to {hi} px"

    lines = ["# The headline at equal compute", "",
             "Written by `make repro` (experiments/headline.py) after every cell, from "
             "[headline/cells.jsonl](headline/cells.jsonl); the reading is in [RESULTS.md](RESULTS.md).", "",
             f"Fashion-MNIST, {lo}×{lo} → {hi}×{hi} ({fit}); training seeds {seq(h['seeds'])} (reported so far: {seq(summary['seeds_recorded']) or 'none'}; "
             f"{summary['cells_recorded']} of {summary['cells_planned']} cells recorded); "
             f"budgets {seq(h['budgets'])} x B (B = "
             f"{summary['reference_budget_flops'] / 1e12:.1f} TFLOP); base-stage shares {seq(h['splits'])}; metric "
             f"{summary['metric']} (mean ± sd over seeds of {h['n_report']} report samples each; each SR level chosen "
             f"on {h['n_select']} other, selection samples; the split on those of training seed(s) "
             f"{seq(h['select_seeds'])}, the only ones trained at every split). The recorded cells took "
             f"{summary['cell_seconds'] / 3600:.1f} h on {'; '.join(machines) or 'no machine yet'}.", "",
             "| budget | row | split (base share) | FID mean ± sd | seeds | levels | Inception FID "
             "| selection FID by split |", "|---|---|---|---|---|---|---|---|"]
    for e in summary["table"]:
        inc = "" if e["inception_mean"] is None else f"{e['inception_mean']:.2f}" + (
            f" ± {e['inception_sd']:.2f}" if e["inception_sd"] is not None else "") + (
            f" ({e['inception_seeds']} seed{'s' if e['inception_seeds'] != 1 else ''})"
            if e.get("inception_seeds", e["seeds"]) < e["seeds"] else "")
        split = "" if e["split"] is None else f"{e['split']:g}"
        by = ", ".join(f"{float(g):g}: {v:.2f}" for g, v in (e["select_fid_by_split"] or {}).items())
        sd = "–" if math.isnan(e["fid_sd"]) else f"{e['fid_sd']:.3f}"
        lines.append(f"| {e['budget']:g}B | {e['row']} | {split} | {e['fid_mean']:.3f} ± {sd} | "
                     f"{e['seeds']} | {e['levels']} | {inc} | {by} |")
    if summary.get("inception_pending"):
        lines += ["", f"Inception FID pending for {len(summary['inception_pending'])} cells (recorded on a machine "
                      f"without the Inception weights; `headline.py --fill-inception` scores their kept samples): "
                      f"{', '.join(summary['inception_pending'])}."]
    lines += ["", "| claim | budget | difference | SE over seeds | verdict |", "|---|---|---|---|---|"]
    for c in summary["claims"]:
        se = "–" if math.isnan(c["se"]) else f"{c['se']:.3f}"
        lines.append(f"| ({c['claim']}) {c['text']} | {c['budget']:g}B | {c['difference']:+.3f} | {se} | "
                     f"{c['verdict']} |")
    lines += ["", f"The select cells (training seed {seq(h['select_seeds'])}: each cascade at every share, "
              f"scored on the selection samples only), as recorded:", "",
              "| budget | row | seed | share | selection FID by level | chosen level |", "|---|---|---|---|---|---|"]
    for e in sorted(summary["selected"], key=lambda e: (e["budget"], e["row"], e["seed"], e["split"])):
        by = ", ".join(f"s = {lv}: {v:.2f}" for lv, v in e["select"].items())
        lines.append(f"| {e['budget']:g}B | {e['row']} | {e['seed']} | {e['split']:g} | {by} | {e['level']} |")
    return "\n".join(lines) + "\n"


def report_name(profile: Profile) -> str:
    """The published report's file name: ``HEADLINE.md`` for the 8 -> 32 study, ``HEADLINE-16to64.md``
    for another scale, so that studies at two scales never overwrite each other's report."""
    lo, hi = profile.base_resolution, profile.resolution
    return "HEADLINE.md" if (lo, hi) == (8, 32) else f"HEADLINE-{lo}to{hi}.md"


def write_markdown(summary: dict, path: Path) -> Path:
    text = markdown(summary)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path
