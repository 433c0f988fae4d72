"""How fast do the stages learn? Sample quality against training FLOPs, recipe against recipe.

For each (stage, recipe, seed) this trains the stage's preset with the recipe's overrides,
keeping a checkpoint every ``--eval-every`` steps, and scores every checkpoint's EMA weights in
the domain classifier's feature space (FID against the 10,000 Fashion-MNIST test images, ± its
bootstrap standard error, and KID):

- ``base`` (``fmnist-base8``): ``--n`` 8×8 samples against the test images at 8 px;
- ``sr`` (``fmnist-sr8to32``): ``--n`` 32×32 samples conditioned on *real* 8×8 inputs (a seeded
  subset of the train split, level s = 0; at the last checkpoint, or every one with
  ``--real-every``), with their consistency PSNR (the output downsampled against the input, dB);
  and at every checkpoint on *generated* inputs — ``--n`` samples of one fixed base checkpoint
  (``--lower``), the same for every recipe — non-truncated at level ``--level`` (fixed beforehand).

Every sample is drawn with SDE-DPM-Solver++(2M), 25 uniform steps; sample ``j`` uses seed ``j``;
``--guidance W`` samples the SR stage with classifier-free guidance (its rows record ``guidance``).
Every run also keeps two power-function EMAs (sigma_rel 0.05 and 0.10, snapshots every 100 steps),
which do not change its training: ``--posthoc`` then scores post-hoc EMAs of the last step on
*selection* seeds (100000 + j), picks the best length per run, and scores that one on the report
seeds. Rows go to ``OUT/results.jsonl`` as they are scored; a re-run skips what is done.
``--publish DIR`` writes the curves (PNG, every seed drawn), a Markdown table of the training
FLOPs each run needs to reach the old recipe's final FID (and, for the SR stage, the shipped recipe
beside its ``new-*`` variants, e.g. without augmentation), and copies every row there.

    .venv/bin/python benchmarks/convergence.py --stage base --recipes old,new --seeds 0,1 --out runs/convergence
    .venv/bin/python benchmarks/convergence.py --stage sr --recipes old,new --seeds 0,1 --out runs/convergence \\
        --lower runs/convergence/base/new/seed0 --posthoc 0.03,0.05,0.1,0.15,0.2
    .venv/bin/python benchmarks/convergence.py --out runs/convergence --publish docs/bench/convergence

Run it alone on the machine: it records the CPU and load average with every row.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cdm.cascade import StagePlan, sample_stage
from cdm.checkpoint import list_checkpoints, load_stage
from cdm.config import StageConfig, load_stage_config
from cdm.data import DataConfig, downsample, stage_input, to_uint8
from cdm.ema import export_posthoc
from cdm.eval.classifier import ClassifierConfig, train_domain_classifier
from cdm.eval.features import make_extractor, reference_features
from cdm.eval.ledger import append_row, read_rows, stage_fingerprint
from cdm.eval.quality import quality_scores
from cdm.eval.reference import ReferenceSpec, load_reference
from cdm.flops import train_flops_per_image
from cdm.generate import cycle_labels
from cdm.metrics import consistency_psnr, fid_bootstrap_se
from cdm.train import train_stage

sys.path.insert(0, str(Path(__file__).parent))
from _common import facts_line, load_average, machine_facts  # noqa: E402

PRESETS = {"base": "fmnist-base8", "sr": "fmnist-sr8to32", "single": "fmnist-single32"}
SAMPLER, SAMPLE_STEPS, SPACING = "dpmpp-2m-sde", 25, "uniform"
SELECTION_SEED = 100_000  # post-hoc EMA lengths are chosen on samples with these seeds, not the reported ones

# The recipe every stage shipped with before the convergence recipe, pinned key by key (the presets have moved on).
_OLD = ["train.p_uncond=0", "diffusion.prediction=eps", "diffusion.logsnr_shift=0", "train.loss_weight=uniform", "train.lr=5e-4",
        "train.lr_schedule=constant", "train.warmup_steps=100", "train.adam_betas=0.9,0.999",
        "train.ema_decay=0.999", "train.ema_sigma_rel=0"]
OLD = {"base": _OLD + ["train.steps=1200", "train.batch_size=64", "unet.dropout=0.1", "unet.base_channels=64",
                       "unet.channel_mult=1,2", "unet.num_res_blocks=2"],
       "sr": _OLD + ["train.steps=1400", "train.batch_size=32", "augment.s_max=500", "augment.p_zero=0.1",
                     "unet.base_channels=32", "unet.channel_mult=1,2,2", "unet.num_res_blocks=1"],
       "single": _OLD + ["train.steps=5000", "train.batch_size=32", "unet.dropout=0.1", "unet.base_channels=48",
                         "unet.channel_mult=1,2,2", "unet.num_res_blocks=2"]}

# Named recipes: overrides on the stage's preset. "new" is the preset as shipped before it took label
# dropout (train.p_uncond = 0.1, for classifier-free guidance), which "new-puncond0.1" adds back: the published rows were
# trained without it. The single-change variants of the old recipe are the ones tried while choosing
# the new one (docs/BENCHMARKS.md).
# Both pin the share of clean SR training examples they were run with, 0.1: the preset took 0.7 since
# (guided, as good a cascade and a stage that follows its input; "new-puncond0.1-pzero0.7").
NEW = ["train.p_uncond=0", "augment.p_zero=0.1"]
RECIPES: dict[str, dict[str, list[str]]] = {
    stage: {
        "old": OLD[stage],
        "new": NEW,
        "v": OLD[stage] + ["diffusion.prediction=v"],
        "v-minsnr": OLD[stage] + ["diffusion.prediction=v", "train.loss_weight=min-snr"],
        "eps-minsnr": OLD[stage] + ["train.loss_weight=min-snr"],
        "v-cosine": OLD[stage] + ["diffusion.prediction=v", "train.lr_schedule=cosine"],
        "v-lr1e-3": OLD[stage] + ["diffusion.prediction=v", "train.lr=1e-3"],
        "v-lr2e-3": OLD[stage] + ["diffusion.prediction=v", "train.lr=2e-3"],
        "v-beta2": OLD[stage] + ["diffusion.prediction=v", "train.adam_betas=0.9,0.99"],
        "v-shift+1": OLD[stage] + ["diffusion.prediction=v", "diffusion.logsnr_shift=1"],
        "v-shift-1": OLD[stage] + ["diffusion.prediction=v", "diffusion.logsnr_shift=-1"],
        "v-nodrop": OLD[stage] + ["diffusion.prediction=v", "unet.dropout=0"],
        "v-smax200": OLD[stage] + ["diffusion.prediction=v", "augment.s_max=200"],
        "eps-lr1e-3": OLD[stage] + ["train.lr=1e-3"],
        "eps-nodrop": OLD[stage] + ["unet.dropout=0"],
        "eps-w32": OLD[stage] + ["unet.base_channels=32"],
        "eps-w32-lr1e-3-nodrop": OLD[stage] + ["unet.base_channels=32", "train.lr=1e-3", "unet.dropout=0"],
        "eps-w32-lr2e-3-nodrop": OLD[stage] + ["unet.base_channels=32", "train.lr=2e-3", "unet.dropout=0"],
        "v-lr1e-3-smax200": OLD[stage] + ["diffusion.prediction=v", "train.lr=1e-3", "augment.s_max=200"],
    } for stage in PRESETS
}
# The reference an augmented SR stage's consistency is held to: the shipped recipe without augmentation;
# and the shipped recipe with more of its training on clean inputs (s = 0 half or 70% of the time, not 10%).
RECIPES["sr"]["new-noaug"] = NEW + ["augment.kind=none"]
RECIPES["sr"]["new-pzero0.5"] = NEW + ["augment.p_zero=0.5"]
RECIPES["sr"]["new-pzero0.7"] = NEW + ["augment.p_zero=0.7"]
# Batch size at the same training FLOPs (batch x steps fixed at the preset's 32 x 1600), learning rate unchanged.
RECIPES["sr"]["new-bs16"] = NEW + ["train.batch_size=16", "train.steps=3200"]
RECIPES["sr"]["new-bs64"] = NEW + ["train.batch_size=64", "train.steps=800"]
# Label dropout for classifier-free guidance: what it costs the unguided stage.
for _stage in ("base", "sr"):
    RECIPES[_stage]["new-puncond0.1"] = ["train.p_uncond=0.1", "augment.p_zero=0.1"]
# With label dropout, so that they can be guided: 70% clean examples (the preset since; does guidance win
# back what they cost the unguided cascade?), and the unaugmented reference.
RECIPES["sr"]["new-puncond0.1-pzero0.7"] = ["train.p_uncond=0.1", "augment.p_zero=0.7"]
RECIPES["sr"]["new-puncond0.1-noaug"] = ["train.p_uncond=0.1", "augment.kind=none"]
TRACK_EMA = ["train.ema_profiles=0.05,0.1", "train.ema_snapshot_every=100"]


# ----------------------------------------------------------------------------- training
def stage_config(stage: str, recipe: str, seed: int, steps: int, eval_every: int) -> StageConfig:
    over = RECIPES[stage][recipe] + TRACK_EMA + [f"train.seed={seed}", "train.device=cpu"]
    cfg = load_stage_config(PRESETS[stage], over)
    if steps:
        cfg.train.steps = steps
    cfg.train.ckpt_every = eval_every
    cfg.train.keep_checkpoints = cfg.train.steps // eval_every + 1
    cfg.train.sample_every = cfg.train.steps  # one grid, at the end (0 would write none)
    return cfg.resolve(channels=1, num_classes=10)  # Fashion-MNIST


def run_dir(out: Path, stage: str, recipe: str, seed: int, steps: int) -> Path:
    return out / stage / (recipe if not steps else f"{recipe}-{steps}") / f"seed{seed}"


# ----------------------------------------------------------------------------- real images
# The real images below are chosen as they were when the published rows (docs/bench/convergence) were
# scored, so that new rows stay comparable with them: the floor from the *first* n train images, the
# SR stage's real inputs from a seeded permutation of the train split (not cdm.eval's class-stratified
# subsets, which would change both by their sampling noise).
def first_images(data: DataConfig, split: str, resolution: int, n: int) -> torch.Tensor:
    """The first ``n`` images of ``split`` at ``resolution``, uint8 (what :meth:`ReferenceSet.at` makes)."""
    return downsample(load_reference(data, ReferenceSpec(split=split, n=0)).images[:n], resolution)


def real_inputs(data: DataConfig, split: str, n: int, resolution: int, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z0 float [n, C, r, r], labels [n])``: ``n`` images of ``split`` drawn by a permutation seeded
    with ``seed``, made as training makes an SR stage's input (:func:`cdm.data.stage_input`)."""
    real = load_reference(data, ReferenceSpec(split=split, n=0))
    idx = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:n]
    return stage_input(real.images[idx], resolution), real.labels[idx]


# ----------------------------------------------------------------------------- scoring
class Scorer:
    """Classifier-space FID/KID against the test split at 8 and 32 px, and the real-data floor."""

    def __init__(self, out: Path, n: int, log):
        self.data = DataConfig(source="fashion-mnist", resolution=32, fit="pad")
        clf = out / "classifier"
        if not (clf / "summary.json").exists():
            log("train the domain classifier")
            train_domain_classifier(self.data, clf, ClassifierConfig(), progress=False)
        self.ex = make_extractor("classifier", clf)
        self.test = load_reference(self.data, ReferenceSpec(split="test", n=10000))  # all 10,000 test images
        self.refs = {r: reference_features(self.ex, self.test, r, cache_dir=out / "cache") for r in (8, 32)}
        self.n = n
        self.floor = {}
        for r in (8, 32):  # n real train images against the same reference: what a perfect model scores
            real = first_images(self.data, "train", r, n)
            self.floor[r] = quality_scores(self.ex(real), self.refs[r], metrics=("fid",))["fid"]

    def __call__(self, x: torch.Tensor) -> dict:
        feats = self.ex(to_uint8(x))
        ref = self.refs[x.shape[-1]]
        q = quality_scores(feats, ref, metrics=("fid", "kid"))
        return {"fid": q["fid"], "fid_se": fid_bootstrap_se(feats["features"], ref.mu, ref.sigma, 50, 0),
                "kid": q["kid"], "n_ref": q["n_real"]}


@torch.no_grad()
def draw(stage, index: int, labels: torch.Tensor, seeds: list[int], lowres: torch.Tensor | None = None,
         level: int = 0, batch: int = 250, guidance: float = 0.0) -> torch.Tensor:
    """Samples of one stage in batches (each depends only on its seed), clipped to [-1, 1];
    ``guidance`` is the classifier-free guidance weight w (0: unguided)."""
    out = []
    plan = StagePlan(steps=SAMPLE_STEPS, level=level, sampler=SAMPLER, spacing=SPACING, guidance=guidance)
    for i in range(0, len(labels), batch):
        lo = None if lowres is None else lowres[i:i + batch]
        x, _ = sample_stage(stage, index, labels[i:i + batch], seeds[i:i + batch], plan, lowres=lo)
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


def lower_inputs(out: Path, lower: str, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` samples of the base checkpoint ``lower`` (seed j, balanced labels), cached in OUT."""
    stage = load_stage(lower)
    fp = stage_fingerprint(stage)
    path = out / f"lower-{fp}-n{n}.npy"
    labels = cycle_labels(n, stage.num_classes)
    if path.exists():
        return torch.from_numpy(np.load(path)), labels, fp
    z0 = draw(stage, 0, labels, list(range(n)))
    np.save(path, z0.numpy())
    return z0, labels, fp


def score_stage(stage, kind: str, scorer: Scorer, seed0: int, gt, gen, level: int, guidance: float = 0.0
                ) -> list[dict]:
    """The rows of one network: base samples, or SR samples on real (``gt``) and on generated
    (``gen``: a function returning them, called only when they are needed) inputs; either may be None
    to skip it. ``guidance`` (SR only) is the weight w the SR stage samples with."""
    n = scorer.n
    seeds = list(range(seed0, seed0 + n))
    if kind in ("base", "single"):
        return [{"condition": kind, **scorer(draw(stage, 0, cycle_labels(n, stage.num_classes), seeds))}]
    rows = []
    if gt is not None:
        z_gt, lab_gt = gt
        x = draw(stage, 1, lab_gt, seeds, z_gt, 0, guidance=guidance)
        rows.append({"condition": "real", "level": 0, **scorer(x), "consistency_psnr": consistency_psnr(x, z_gt)})
    if gen is not None:
        z_gen, lab_gen, fp = gen()
        x = draw(stage, 1, lab_gen, seeds, z_gen, level, guidance=guidance)
        rows.append({"condition": "generated", "level": level, "lower": fp, **scorer(x),
                     "consistency_psnr": consistency_psnr(x, z_gen)})
    return rows


# ----------------------------------------------------------------------------- the job
@dataclass
class Job:
    """What every recipe and seed of one run shares."""
    a: argparse.Namespace
    scorer: Scorer
    gt: tuple | None  # real low-resolution inputs (SR stage)
    gen: Callable | None  # the lower stage's samples, drawn when first needed (SR stage)
    results: Path  # results.jsonl
    done: set  # the keys of the rows already in it
    facts: dict  # machine facts
    log: Callable[[str], None]


def run(a: argparse.Namespace, log) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    facts = machine_facts()
    log(facts_line(facts))
    scorer = Scorer(out, a.n, log)
    data = DataConfig(source="fashion-mnist", resolution=32, fit="pad")
    gt = real_inputs(data, "train", a.n, 8, seed=0) if a.stage == "sr" else None
    # the base's samples are drawn when first needed: a run may train before its base exists
    gen = functools.cache(lambda: lower_inputs(out, a.lower, a.n)) if a.stage == "sr" and a.lower else None
    done = {_key(r) for r in read_rows(results)}
    guided = {"guidance": a.guidance} if a.guidance else {}  # part of a row's key; unguided rows never carry it
    job = Job(a, scorer, gt, gen, results, done, facts, log)  # what post-hoc EMA scoring shares
    for recipe in a.recipes:
        for seed in a.seeds:
            cfg = stage_config(a.stage, recipe, seed, a.steps, a.eval_every)
            rd = run_dir(out, a.stage, recipe, seed, a.steps)
            t0 = time.time()
            found = list_checkpoints(rd)
            if not found or found[-1][0] < cfg.train.steps:
                log(f"train {a.stage}/{recipe} seed {seed}: {cfg.train.steps} steps")
                train_stage(cfg, rd, progress=False)
            train_s = round(time.time() - t0, 1)
            per_image = train_flops_per_image(cfg)
            base = {"stage": a.stage, "recipe": recipe, "overrides": RECIPES[a.stage][recipe], "seed": seed,
                    "total_steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "n": a.n,
                    "sampler": SAMPLER, "sample_steps": SAMPLE_STEPS, "floor": scorer.floor[cfg.resolution]}
            for step, path in list_checkpoints(rd):
                key = {**base, "step": step, "ema": "checkpoint", "sample_seed": 0, **guided}
                if _key(key) in done:
                    continue
                t = time.time()
                stage = load_stage(path)
                last = step == cfg.train.steps  # real inputs: every checkpoint with --real-every, else the last
                for r in score_stage(stage, a.stage, scorer, 0, gt if (last or a.real_every) else None, gen, a.level,
                                     a.guidance):
                    row = {**key, **r, "train_flops": per_image * cfg.train.batch_size * step,
                           "fingerprint": stage_fingerprint(stage), "score_s": round(time.time() - t, 1),
                           "train_s": train_s, "cpu": facts["cpu"], "load": load_average()}
                    append_row(results, row)
                    log(_describe(row))
                done.add(_key(key))
            if a.posthoc:
                posthoc(job, rd, cfg, base, per_image)


def posthoc(job: Job, rd: Path, cfg: StageConfig, base: dict, per_image: int) -> None:
    """Choose the post-hoc EMA length of the last step on selection seeds; score the choice on the
    report seeds."""
    a, scorer, gt, gen, results, done, facts, log = (job.a, job.scorer, job.gt, job.gen, job.results, job.done,
                                                     job.facts, job.log)
    step = cfg.train.steps
    sel = []
    for r in a.posthoc:
        key = {**base, "step": step, "ema": f"posthoc-{r:.3f}", "sample_seed": SELECTION_SEED}
        if _key(key) not in done:
            (path, _), = export_posthoc(rd, [r], rd / "posthoc", step)
            rows = score_stage(load_stage(path), a.stage, scorer, SELECTION_SEED, gt, None, a.level)
            row = {**key, **rows[0], "sigma_rel": r, "train_flops": per_image * cfg.train.batch_size * step,
                   "cpu": facts["cpu"], "load": load_average()}
            append_row(results, row)
            done.add(_key(key))
            log(_describe(row))
        sel += [x for x in read_rows(results) if _key(x) == _key(key)][:1]
    best = min(sel, key=lambda x: x["fid"])
    key = {**base, "step": step, "ema": f"posthoc-{best['sigma_rel']:.3f}", "sample_seed": 0}
    if _key(key) in done:
        return
    (path, _), = export_posthoc(rd, [best["sigma_rel"]], rd / "posthoc", step)
    for r in score_stage(load_stage(path), a.stage, scorer, 0, gt, gen, a.level):
        row = {**key, **r, "sigma_rel": best["sigma_rel"], "chosen_from": [x["sigma_rel"] for x in sel],
               "train_flops": per_image * cfg.train.batch_size * step, "cpu": facts["cpu"], "load": load_average()}
        append_row(results, row)
        log(_describe(row))
    done.add(_key(key))


_ID = ("stage", "recipe", "seed", "total_steps", "step", "ema", "sample_seed", "n", "guidance")


def _key(row: dict) -> str:
    return json.dumps([row.get(k) for k in _ID])


def _describe(r: dict) -> str:
    extra = (f" psnr {r['consistency_psnr']:.1f} dB" if "consistency_psnr" in r else "") + (
        f" (guided, w = {r['guidance']:g})" if r.get("guidance") else "")
    return (f"{r['stage']}/{r['recipe']} seed {r['seed']} step {r['step']} [{r['ema']}, seeds from "
            f"{r['sample_seed']}] {r['condition']}: FID {r['fid']:.2f} ± {r['fid_se']:.2f}{extra}")


# ----------------------------------------------------------------------------- publishing
def full_runs(rows: list[dict]) -> list[dict]:
    """The rows of the old and new recipes at their full budgets (not the shorter probe runs), with the
    checkpoint EMA on the report seeds, each stage at its largest n."""
    out = []
    for stage in {r["stage"] for r in rows}:
        sel = [r for r in rows if r["stage"] == stage and r["recipe"] in ("old", "new") and r["ema"] == "checkpoint"
               and r["sample_seed"] == 0]
        if not sel:
            continue
        n = max(r["n"] for r in sel)
        full = {rc: max(r["total_steps"] for r in sel if r["recipe"] == rc) for rc in {r["recipe"] for r in sel}}
        out += [r for r in sel if r["n"] == n and r["total_steps"] == full[r["recipe"]]]
    return out


def publish(out: Path, dest: Path, log) -> None:
    """Curves (PNG), the FLOPs-to-target and probe tables (Markdown) and every row (JSONL)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(out / "results.jsonl")
    dest.mkdir(parents=True, exist_ok=True)
    curves = full_runs(rows)
    order = {"base": 0, "real": 1, "generated": 2, "single": 3}
    scored = {(r["stage"], r["condition"]): set() for r in curves}
    for r in curves:
        scored[(r["stage"], r["condition"])].add(r["step"])
    panels = sorted((p for p, steps in scored.items() if len(steps) >= 3), key=lambda p: order[p[1]])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (stage, cond) in zip(axes[0], panels):
        sel = [r for r in curves if (r["stage"], r["condition"]) == (stage, cond)]
        for colour, recipe in zip(("C3", "C0"), ("old", "new")):
            seeds = sorted({r["seed"] for r in sel if r["recipe"] == recipe})
            for seed in seeds:
                pts = sorted((r["train_flops"], r["fid"]) for r in sel if (r["recipe"], r["seed"]) == (recipe, seed))
                ax.plot([p[0] / 1e12 for p in pts], [p[1] for p in pts], "o-", color=colour, ms=3, lw=1.2,
                        alpha=0.85, label=f"{recipe} recipe ({len(seeds)} seeds)" if seed == seeds[0] else None)
        ax.axhline(sel[0]["floor"], color="k", ls="--", lw=0.8, label=f"real data, n = {sel[0]['n']}")
        old = [r["train_flops"] for r in sel if r["recipe"] == "old"]
        if old:  # the bar: the old recipe's final FID with a third of its FLOPs
            ax.axvline(max(old) / 3e12, color="grey", ls=":", lw=1, label="⅓ of the old recipe's FLOPs")
        ax.set_yscale("log")
        ax.set_xlabel("training TFLOP")
        ax.set_ylabel(f"classifier FID (n = {sel[0]['n']})")
        ax.set_title({"base": "base stage 8×8", "single": "single stage 32×32",
                      "real": "SR 8→32 on real 8×8 inputs (s = 0)",
                      "generated": f"SR 8→32 on generated inputs (s = {sel[0].get('level')})"}[cond], fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest / "convergence.png", dpi=110)
    log(f"wrote {dest / 'convergence.png'}")
    tables = [flops_table(curves), ladder_table(curves), reference_table(rows), posthoc_table(rows), probe_table(rows)]
    (dest / "convergence.md").write_text("\n".join(tables))
    if (dest / "results.jsonl").resolve() != (out / "results.jsonl").resolve():
        shutil.copyfile(out / "results.jsonl", dest / "results.jsonl")  # every row, as measured
    log(f"wrote {dest / 'convergence.md'}, {dest / 'results.jsonl'}")


def flops_needed(points: list[tuple[float, float]], target: float) -> float | None:
    """Training FLOPs at which a curve ``[(flops, fid), ...]`` first reaches ``target``, linearly
    interpolated (in log FID) between the two checkpoints around the crossing; None if it never does."""
    points = sorted(points)
    for i, (f, v) in enumerate(points):
        if v <= target:
            if i == 0:
                return f
            f0, v0 = points[i - 1]
            w = (math.log(v0) - math.log(target)) / (math.log(v0) - math.log(v))
            return f0 + w * (f - f0)
    return None


def flops_table(curves: list[dict]) -> str:
    """Per stage and condition: the old recipe's final FID (mean over seeds) as the target, and the
    training FLOPs each run needs to reach it."""
    lines = []
    for stage, cond in sorted({(r["stage"], r["condition"]) for r in curves}):
        sel = [r for r in curves if (r["stage"], r["condition"]) == (stage, cond)]
        old = [r for r in sel if r["recipe"] == "old"]
        if not old:
            continue
        last = max(r["step"] for r in old)
        finals = [r["fid"] for r in old if r["step"] == last]
        target = statistics.mean(finals)
        old_flops = max(r["train_flops"] for r in old)
        sr = stage == "sr"
        if len({r["step"] for r in sel}) < 3:  # scored at the last checkpoint only: no curve to read
            lines += [f"**SR stage, {cond} inputs, at the last checkpoint**", "",
                      "| recipe | seed | steps | TFLOP | FID ± SE | consistency PSNR |", "|---|---|---|---|---|---|"]
            for r in sorted(sel, key=lambda r: (_recipe_order(r["recipe"]), r["seed"], r["step"])):
                lines.append(f"| {r['recipe']} | {r['seed']} | {r['step']} | {r['train_flops'] / 1e12:.1f} | "
                             f"{r['fid']:.2f} ± {r['fid_se']:.2f} | {r['consistency_psnr']:.1f} dB |")
            lines.append("")
            continue
        lines += [f"**SR stage, {cond} inputs**" if sr else f"**{stage.capitalize()} stage**", "",
                  f"Target: the old recipe's final FID, {target:.2f} (mean of {len(finals)} seeds, step {last}, "
                  f"{old_flops / 1e12:.1f} TFLOP). Real-data floor at n = {sel[0]['n']}: {sel[0]['floor']:.2f}.", "",
                  "| recipe | seed | steps | final FID ± SE | TFLOP to reach the target | fraction of the old recipe's "
                  "TFLOP |" + (" final consistency PSNR |" if sr else ""),
                  "|---|---|---|---|---|---|" + ("---|" if sr else "")]
        for recipe in ("old", "new"):
            for seed in sorted({r["seed"] for r in sel if r["recipe"] == recipe}):
                run = [r for r in sel if (r["recipe"], r["seed"]) == (recipe, seed)]
                fin = max(run, key=lambda r: r["step"])
                need = flops_needed([(r["train_flops"], r["fid"]) for r in run], target)
                le = "≤" if min(run, key=lambda r: r["step"])["fid"] <= target else ""  # at the first checkpoint
                cells = [recipe, str(seed), str(fin["step"]), f"{fin['fid']:.2f} ± {fin['fid_se']:.2f}",
                         "not reached" if need is None else f"{le}{need / 1e12:.1f}",
                         "—" if need is None else f"{le}{need / old_flops:.2f}"]
                if sr:
                    cells.append(f"{fin['consistency_psnr']:.1f} dB")
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def reference_table(rows: list[dict]) -> str:
    """The shipped SR recipe beside its variants (``new-*``: without augmentation, ...) at the same
    step: does it follow a clean input as closely (consistency PSNR), and what does each do on
    generated inputs."""
    ref = [r for r in rows if r["stage"] == "sr" and r["recipe"].startswith("new-") and r["ema"] == "checkpoint"
           and r["sample_seed"] == 0]
    if not ref:
        return ""
    steps = {r["step"] for r in ref}
    sel = ref + [r for r in rows if r["recipe"] == "new" and r["stage"] == "sr" and r["ema"] == "checkpoint"
                 and r["sample_seed"] == 0 and r["step"] in steps and r["n"] == ref[0]["n"]
                 and r["total_steps"] == ref[0]["total_steps"]]
    lines = ["**SR stage: the shipped recipe and its variants at the same step** (`new-noaug`: no augmentation; "
             "`new-pzero0.5`: clean inputs half of the time; `w`: sampled with classifier-free guidance)", "",
             "| recipe | seed | step | real inputs: FID ± SE | consistency PSNR | generated inputs (s): FID ± SE |",
             "|---|---|---|---|---|---|"]

    def ident(r: dict) -> tuple:
        return r["recipe"], r["seed"], r["step"], r.get("guidance", 0)

    for recipe, seed, step, w in sorted({ident(r) for r in sel}, key=lambda k: (_recipe_order(k[0]), k[3], k[1], k[2])):
        got = {r["condition"]: r for r in sel if ident(r) == (recipe, seed, step, w)}
        real, gen = got.get("real"), got.get("generated")
        name = recipe + (f" (w = {w:g})" if w else "")
        lines.append(f"| {name} | {seed} | {step} | "
                     + (f"{real['fid']:.2f} ± {real['fid_se']:.2f} | {real['consistency_psnr']:.1f} dB" if real
                        else "— | —")
                     + (f" | {gen['fid']:.2f} ± {gen['fid_se']:.2f} (s = {gen['level']}) |" if gen else " | — |"))
    return "\n".join(lines) + "\n"


# FID levels for the "training FLOPs to reach FID X" table, per condition (a ladder through the range
# both recipes cover).
TARGETS = {"base": (0.4, 0.2, 0.1), "single": (20.0, 10.0, 5.0), "generated": (20.0, 10.0, 5.0, 3.0)}


def ladder_table(curves: list[dict]) -> str:
    """Training TFLOP each recipe needs to reach each FID in TARGETS (per seed), and new / old."""
    lines = []
    for stage, cond in sorted({(r["stage"], r["condition"]) for r in curves}):
        sel = [r for r in curves if (r["stage"], r["condition"]) == (stage, cond)]
        if cond not in TARGETS or len({r["step"] for r in sel}) < 3:
            continue
        lines += [f"**Training TFLOP to reach a classifier FID: {stage} stage"
                  + (f", {cond} inputs**" if stage == "sr" else "**") + " (per seed; ≤ already at the first scored checkpoint; — never reached)", "",
                  "| recipe | " + " | ".join(f"FID {t:g}" for t in TARGETS[cond]) + " |",
                  "|---|" + "---|" * len(TARGETS[cond])]
        # "≤": reached at the first scored checkpoint, so the FLOPs are an upper bound
        need, first = {}, {}
        for recipe in ("old", "new"):
            seeds = sorted({r["seed"] for r in sel if r["recipe"] == recipe})
            curves_ = [sorted((r["train_flops"], r["fid"]) for r in sel if (r["recipe"], r["seed"]) == (recipe, s))
                       for s in seeds]
            for t in TARGETS[cond]:
                need[recipe, t] = [flops_needed(c, t) for c in curves_]
                # reached at the first scored checkpoint: only an upper bound
                first[recipe, t] = any(c[0][1] <= t for c in curves_)
            lines.append(f"| {recipe} | " + " | ".join(
                " / ".join("—" if v is None else f"{'≤' if c[0][1] <= t else ''}{v / 1e12:.1f}"
                           for v, c in zip(need[recipe, t], curves_)) for t in TARGETS[cond]) + " |")
        ratio = []
        for t in TARGETS[cond]:
            old, new = need["old", t], need["new", t]
            ok = old and new and None not in old + new
            ratio.append("—" if not ok else ("≤" if first["new", t] and not first["old", t] else "")
                         + f"{statistics.mean(new) / statistics.mean(old):.2f}")
        lines += ["| new / old (means) | " + " | ".join(ratio) + " |", ""]
    return "\n".join(lines)


def posthoc_table(rows: list[dict]) -> str:
    sel = [r for r in rows if r["ema"].startswith("posthoc") and r["sample_seed"] == 0
           and r["recipe"] in ("old", "new")]
    if not sel:
        return ""
    lines = ["**Post-hoc EMA at the last step** (the length chosen on selection seeds 100000+, then scored "
             "on the report seeds)", "",
             "| stage | recipe | seed | inputs | sigma_rel chosen (from) | FID ± SE | the checkpoint's own EMA |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(sel, key=lambda r: (r["stage"], _recipe_order(r["recipe"]), r["seed"], r["condition"])):
        ck = [x for x in rows if x["ema"] == "checkpoint" and x["sample_seed"] == 0 and all(
            x[k] == r[k] for k in ("stage", "recipe", "seed", "step", "condition", "total_steps", "n"))]
        lines.append(f"| {r['stage']} | {r['recipe']} | {r['seed']} | {r['condition']} | {r['sigma_rel']} "
                     f"({', '.join(map(str, r['chosen_from']))}) | {r['fid']:.2f} ± {r['fid_se']:.2f} | "
                     + (f"{ck[0]['fid']:.2f} ± {ck[0]['fid_se']:.2f}" if ck else "—") + " |")
    return "\n".join(lines) + "\n"


def probe_table(rows: list[dict]) -> str:
    """The single-seed probes at a shorter budget: each variant's last checkpoint beside the old
    recipe's at the same step."""
    lines = []
    probes = [r for r in rows if r["ema"] == "checkpoint" and r["sample_seed"] == 0 and r["seed"] == 0
              and not r["recipe"].startswith("new") and r["step"] == r["total_steps"] and r["n"] == 1000]
    for stage, steps in sorted({(r["stage"], r["total_steps"]) for r in probes if r["recipe"] != "old"}):
        sel = [r for r in probes if (r["stage"], r["total_steps"]) == (stage, steps)]
        conds = sorted({r["condition"] for r in sel}, key=lambda c: ("base", "single", "real", "generated").index(c))
        lines += [f"**Probes: {stage} stage, {steps} steps, seed 0, n = 1000** (each a change to the old recipe)", "",
                  "| recipe | changes | TFLOP | " + " | ".join(f"FID, {c} inputs" if c in ("real", "generated") else "FID"
                                                               for c in conds)
                  + (" | consistency PSNR, real inputs |" if stage == "sr" else " |"),
                  "|---|---|---|" + "---|" * len(conds) + ("---|" if stage == "sr" else "")]
        for recipe in sorted({r["recipe"] for r in sel}, key=_recipe_order):
            got = {r["condition"]: r for r in sel if r["recipe"] == recipe}
            changes = [o for o in RECIPES[stage].get(recipe, got[conds[0]]["overrides"]) if o not in OLD[stage]]
            cells = [recipe, ", ".join(f"`{c}`" for c in changes) or "—", f"{got[conds[0]]['train_flops'] / 1e12:.1f}"]
            cells += [f"{got[c]['fid']:.2f} ± {got[c]['fid_se']:.2f}" if c in got else "—" for c in conds]
            if stage == "sr":
                cells.append(f"{got['real']['consistency_psnr']:.1f} dB" if "real" in got else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _recipe_order(name: str) -> tuple:
    return ({"old": 0, "new": 1}.get(name, 2), name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--stage", choices=list(PRESETS))
    p.add_argument("--recipes", type=lambda t: t.split(","), default=["old", "new"])
    p.add_argument("--seeds", type=lambda t: [int(v) for v in t.split(",")], default=[0, 1])
    p.add_argument("--steps", type=int, default=0, help="training steps (default: the recipe's)")
    p.add_argument("--eval-every", type=int, default=200, help="steps between scored checkpoints")
    p.add_argument("--n", type=int, default=1000, help="samples per scored point")
    p.add_argument("--lower", help="base checkpoint or run whose samples are the SR stage's generated inputs")
    p.add_argument("--real-every", action="store_true",
                   help="SR: score real inputs at every checkpoint (default: only the last; generated at every one)")
    p.add_argument("--level", type=int, default=100, help="augmentation level s for generated inputs")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="SR: sample with classifier-free guidance weight w (rows record it; 0: unguided, as published)")
    p.add_argument("--posthoc", type=lambda t: [float(v) for v in t.split(",")], default=[],
                   help="post-hoc EMA lengths (sigma_rel) to choose from at the last step")
    p.add_argument("--publish", help="write convergence.png/.md/.json here from OUT/results.jsonl and stop")
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    if a.publish:
        publish(Path(a.out), Path(a.publish), log)
        return
    if not a.stage:
        p.error("--stage is required unless --publish is given")
    if a.guidance and (a.stage != "sr" or a.posthoc):
        p.error("--guidance applies to the SR stage's checkpoints only (not to --posthoc, nor to a base stage)")
    unknown = [r for r in a.recipes if r not in RECIPES[a.stage]]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES[a.stage])}")
    run(a, log)


if __name__ == "__main__":
    main()
