"""Two judges of the demo cascade: its candidate sampling plans and SR stages scored in the domain
classifier's feature space *and* the TF-2015 FID Inception's, each score with its bootstrap standard
error and the real-vs-real floor at the same n (:func:`cdm.eval.quality.score_with_floor`, what
``cdm eval`` reports), so that a default is chosen by more than one metric.

A candidate is a cascade (the demo's two stages, trained by ``cdm demo --seed K``; optionally its SR
stage swapped for another run, e.g. one trained with ``augment.p_zero = 0.1``) and a sampling plan
(:data:`PLANS`). For each, ``--n`` images are sampled (sample j from seed ``--seed`` + j, classes
cycled) and the final stage is scored against the test split's ``--n-ref`` images (class-stratified,
seed 0). The same samples are scored again with their 2-px border set to black (``border0``: the
28-px images are padded to 32, so every real image's border is exactly 0), one hypothesis for why the
spaces disagree, at no sampling cost; ``border_abs`` is the samples' mean absolute border value in
[0, 255] (0 for every real image).

Beside FID and KID (each with its SE and floor), every row has precision and recall (k = 3), recall per
class (is diversity lost in some classes?), ``agreement`` (classifier space: the share of samples the
domain classifier assigns to their label — class-typicality, which guidance raises) and
``fine_detail`` (mean absolute Laplacian inside the border: how soft the finest detail is). The real
row (``OUT/real/real``) scores ``n`` real images of the other split the same way: what a perfect
cascade would score at this n.

Resumable: a candidate whose ``OUT/<run>/<plan>/scores.json`` exists is skipped; its samples and
features are kept beside it (``samples.npz``, ``feats-<space>[-border0].npz``), so re-scoring costs no
network pass; ``--sample-only`` samples ahead of a scoring process. ``--publish DIR`` writes
``judges.json``, ``judges.md`` and ``judges.png`` from what ``OUT`` holds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judges.py --out runs/judges --classifier runs/classifier \\
        --run demo-seed0=runs/judges/demo-seed0 --plans shipped,unguided,sde25 --n 1000
    .venv/bin/python benchmarks/judges.py --out runs/judges --publish docs/bench/judges
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_facts  # noqa: E402

from cdm.cascade import SamplingPlan, StagePlan  # noqa: E402
from cdm.cascade_file import load_cascade  # noqa: E402
from cdm.eval.features import make_extractor, reference_features  # noqa: E402
from cdm.eval.floor import floor_images  # noqa: E402
from cdm.eval.quality import EvalConfig, score_with_floor  # noqa: E402
from cdm.eval.reference import ReferenceSet, ReferenceSpec, load_reference  # noqa: E402
from cdm.files import atomic_write  # noqa: E402
from cdm.generate import cycle_labels, sample_batched  # noqa: E402
from cdm.eval.verdict import NOISE_SE, beyond_noise  # noqa: E402
from cdm.metrics import precision_recall  # noqa: E402
from cdm.data import to_uint8  # noqa: E402

LEVEL = 100  # the demo's SR level s, fixed beforehand
ODE6 = (6, "dpmpp-2m", "edm")  # cdm's default sampler: (steps, sampler, spacing)
SDE25 = (25, "dpmpp-2m-sde", "uniform")  # the studies' sampler
PLANS = {  # name -> ((steps, sampler, spacing, guidance) of the base stage, the same of the SR stage)
    "shipped": (ODE6 + (0.0,), ODE6 + (1.0,)),  # the demo's cascade file
    "unguided": (ODE6 + (0.0,), ODE6 + (0.0,)),
    "sr-sde25-w1": (ODE6 + (0.0,), SDE25 + (1.0,)),  # the shipped base, the SR stage with more (stochastic) steps
    "sde25": (SDE25 + (0.0,), SDE25 + (0.0,)),
    "sde25-w0.5": (SDE25 + (0.0,), SDE25 + (0.5,)),
    "sde25-w1": (SDE25 + (0.0,), SDE25 + (1.0,)),
    "sde25-w2": (SDE25 + (0.0,), SDE25 + (2.0,)),
}
PLANS["shipped-fp32"] = PLANS["shipped"]  # ... sampled in fp32 (the stages' own precision: bf16 where native)
PRECISION = {"shipped-fp32": "fp32"}
BORDER = 2  # Fashion-MNIST's 28-px images padded to 32: 2 px of exact black on each side
DARK = 4  # 8-bit values up to this are "faint": 1.8% of real pixels, about 30% of the demo's samples'


def sampling_plan(name: str) -> SamplingPlan:
    return SamplingPlan(mode="non-truncated", stages=[
        StagePlan(steps=steps, level=level, sampler=sampler, spacing=spacing, guidance=w)
        for (steps, sampler, spacing, w), level in zip(PLANS[name], (0, LEVEL))])


def border_mask(res: int, width: int = BORDER) -> torch.Tensor:
    m = torch.ones(res, res, dtype=torch.bool)
    m[width:res - width, width:res - width] = False
    return m


def stages_of(run: str) -> list[Path]:
    """``DIR`` (a demo output: its two stages) or ``BASE_RUN+SR_RUN``."""
    if "+" in run:
        return [Path(p) for p in run.split("+")]
    return [Path(run) / "fmnist-base8", Path(run) / "fmnist-sr8to32"]


def fine_detail(images: torch.Tensor) -> float:
    """Mean absolute 4-neighbour Laplacian of uint8 ``[N, C, H, W]`` images inside the border, in
    [0, 255] units: the energy of the finest detail (print, plaid, stitching), lower when softer."""
    x = images.double()
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    b = BORDER - 1  # the Laplacian's map starts one pixel in
    return float(lap[..., b:lap.shape[-2] - b, b:lap.shape[-1] - b].abs().mean())


def per_class(ref: np.ndarray, ref_labels: np.ndarray, feats: np.ndarray, labels: np.ndarray,
              num_classes: int) -> list[dict]:
    """Precision and recall (k = 3) of each class's samples against that class's reference images."""
    out = []
    for c in range(num_classes):
        p, r = precision_recall(ref[ref_labels == c], feats[labels == c])
        out.append({"class": c, "precision": p, "recall": r})
    return out


def _savez(path: str, **arrays) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to atomic_write's temporary name
        np.savez_compressed(f, **arrays)


def cached_features(ex, images: torch.Tensor, path: Path) -> dict[str, np.ndarray]:
    """``ex(images)``, kept in ``path`` (an .npz) so a re-run or a new analysis costs no network pass."""
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    out = ex(images)
    atomic_write(path, lambda tmp: _savez(tmp, **{k: np.asarray(v, dtype=np.float32) for k, v in out.items()}))
    return out


def evaluation(a: argparse.Namespace, space: str = "classifier") -> EvalConfig:
    return EvalConfig(features=[space], classifier=a.classifier, reference=ReferenceSpec(n=a.n_ref), n=a.n,
                      seed=a.seed, batch_size=250, device="cpu", progress=False)


def real_sets(data, a: argparse.Namespace) -> tuple[ReferenceSet, ReferenceSet]:
    """The reference (``--n-ref`` test images) and the floor set (``--n`` images of the other split),
    read once for every feature space."""
    cfg = evaluation(a)
    return load_reference(data, cfg.reference), floor_images(data, cfg.reference, a.n, cfg.seed)


class Judge:
    """One feature space: its extractor and reference features, over the reference and floor sets every
    space shares (:func:`real_sets`)."""

    def __init__(self, space: str, a: argparse.Namespace, sets: tuple[ReferenceSet, ReferenceSet], resolution: int):
        self.space, self.resolution = space, resolution
        self.cfg = evaluation(a, space)
        self.ref_set, self.floor_set = sets
        self.ex = make_extractor(space, a.classifier, "cpu")
        self.ref = reference_features(self.ex, self.ref_set, resolution)
        self.ref_labels = self.ref_set.labels.numpy()
        self.num_classes = len(self.ref_set.class_names)

    def score(self, feats: dict, labels: np.ndarray) -> dict:
        """:func:`score_with_floor`'s row, with per-class precision/recall and, in the classifier's
        space, ``agreement``: the share of images it classifies as their label (class-typicality)."""
        row = score_with_floor(self.ex, feats, self.ref, self.ref_set, self.floor_set, self.resolution, self.cfg)
        row["per_class"] = per_class(self.ref.features, self.ref_labels, np.asarray(feats["features"]), labels,
                                     self.num_classes)
        if "probs" in feats:
            row["agreement"] = float((np.asarray(feats["probs"]).argmax(1) == labels).mean())
        return row

    def real_row(self) -> dict:
        """The floor set (``n`` real images of the other split) scored like a candidate."""
        # the floor's features, already computed and cached; the classifier's again for its probabilities (cheap)
        feats = {"features": reference_features(self.ex, self.floor_set, self.resolution).features}
        if self.space == "classifier":
            feats = self.ex(self.floor_set.at(self.resolution))
        row = self.score(feats, self.floor_set.labels.numpy())
        return {"space": self.space, "variant": "real", **row}


def sampled(stages: list[Path], plan_name: str, a: argparse.Namespace, out: Path) -> tuple[torch.Tensor, np.ndarray, float]:
    """The candidate's final-stage samples (uint8 ``[n, C, H, W]``), their labels and the sampling
    seconds; sampled once (sample j from seed ``a.seed + j``) and kept in ``out/samples.npz``."""
    path = out / "samples.npz"
    if path.exists():
        with np.load(path) as z:
            return torch.from_numpy(z["images"]), z["labels"], float(z["seconds"])
    cascade = load_cascade(stages, "cpu", precision=PRECISION.get(plan_name))
    labels = cycle_labels(a.n, cascade.num_classes)
    t0 = time.time()
    res = sample_batched(cascade, labels, list(range(a.seed, a.seed + a.n)), sampling_plan(plan_name), 250)
    seconds = time.time() - t0
    final = to_uint8(res.images[-1])
    # whole or absent: a scoring process may be waiting for it
    atomic_write(path, lambda tmp: _savez(tmp, images=final.numpy(), labels=labels.numpy(), seconds=seconds))
    return final, labels.numpy(), seconds


def pixel_shares(images: torch.Tensor) -> dict:
    """The share of exactly black pixels and of faint ones (1..DARK) of uint8 images: Fashion-MNIST's
    background is exact black, a sampler's is often faintly grey."""
    return {"zero_share": float((images == 0).float().mean()),
            "faint_share": float(((images >= 1) & (images <= DARK)).float().mean())}


def variants_of(final: torch.Tensor, plan_name: str, a: argparse.Namespace) -> list[tuple[str, torch.Tensor]]:
    """The samples as sampled, and the re-scored variants asked for this plan: ``border0`` (the 2-px
    border set to black) and ``dark0`` (every pixel up to DARK set to black: the faint background)."""
    out = [("as sampled", final)]
    if plan_name in a.border0:
        clamped = final.clone()
        clamped[..., border_mask(final.shape[-1])] = 0
        out.append(("border0", clamped))
    if plan_name in a.dark0:
        out.append(("dark0", torch.where(final <= DARK, torch.zeros_like(final), final)))
    return out


def score_candidate(stages: list[Path], plan_name: str, a: argparse.Namespace, judges: list[Judge],
                    out: Path) -> dict:
    final, labels, seconds = sampled(stages, plan_name, a, out)
    rows = []
    for j in judges:
        for variant, im in variants_of(final, plan_name, a):
            tag = "" if variant == "as sampled" else f"-{variant}"
            feats = cached_features(j.ex, im, out / f"feats-{j.space}{tag}.npz")
            rows.append({"space": j.space, "variant": variant, **j.score(feats, labels)})
    return {"stages": [str(s) for s in stages], "plan": plan_name, "sampling": PLANS[plan_name], "level": LEVEL,
            "precision": PRECISION.get(plan_name, "the stages' (bf16 autocast where the CPU computes bf16)"),
            "n": a.n, "seed": a.seed, "n_ref": a.n_ref, "sample_seconds": round(seconds, 1),
            "border_abs": float(final[..., border_mask(final.shape[-1])].float().mean()),
            "fine_detail": fine_detail(final), **pixel_shares(final), "rows": rows, "machine": machine_facts(),
            "date": time.strftime("%Y-%m-%d")}


def score_real(judges: list[Judge], out: Path) -> dict:
    """The real-data row: the floor set's images through every judge (their precision, recall,
    agreement and fine detail are what a perfect cascade would score at this n)."""
    out.mkdir(parents=True, exist_ok=True)
    real = judges[0].floor_set.at(judges[0].resolution)
    return {"stages": [], "plan": "real", "n": len(real), "n_ref": len(judges[0].ref_set),
            "source": judges[0].floor_set.source, "border_abs": float(real[..., border_mask(real.shape[-1])].float().mean()),
            "fine_detail": fine_detail(real), **pixel_shares(real), "rows": [j.real_row() for j in judges], "machine": machine_facts(),
            "date": time.strftime("%Y-%m-%d")}


def _pm(row: dict, k: str) -> str:
    return f"{row[k]:.3g} ± {row[k + '_se']:.2g}"


def table(results: list[dict]) -> list[str]:
    lines = ["| run | plan | space | variant | FID ± SE | floor FID | KID ± SE | precision | recall | agreement "
             "| fine detail | border mean |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            fl = row.get("floor") or {}
            agree = f"{row['agreement']:.3f}" if "agreement" in row else ""
            lines.append(f"| {r['run']} | {r['plan']} | {row['space']} | {row['variant']} | {_pm(row, 'fid')} | "
                         f"{fl.get('fid', float('nan')):.3g} | {_pm(row, 'kid')} | {row['precision']:.3f} | "
                         f"{row['recall']:.3f} | {agree} | {r['fine_detail']:.2f} | {r['border_abs']:.2f} |")
    return lines


def class_table(results: list[dict], names: list[str]) -> list[str]:
    """Recall per class (as sampled) of every candidate, both spaces: where diversity is lost."""
    lines = ["| run | plan | space | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in results:
        for row in r["rows"]:
            if row["variant"] in ("as sampled", "real"):
                cells = " | ".join(f"{c['recall']:.2f}" for c in row["per_class"])
                lines.append(f"| {r['run']} | {r['plan']} | {row['space']} | {cells} |")
    return lines


def verdicts(results: list[dict], baseline: str = "shipped") -> list[dict]:
    """The rule stated before the measurement (docs/BENCHMARKS.md, "Two judges"), per candidate: against
    the baseline plan of the same training seed, in each space, ``better``/``worse`` when the FID differs
    by more than twice the SE of the difference (the two SEs in quadrature), else ``same``; a
    candidate ``replaces`` the baseline when it is never worse and better in at least one space, on
    every seed it was run on."""
    seed_of = {"d0": 0, "d1": 1, "pz0": 0, "pz1": 1}
    rows = {}
    for r in results:
        for row in r["rows"]:
            if row["variant"] == "as sampled" and r["run"] in seed_of:
                stage = "pzero0.1" if r["run"].startswith("pz") else "pzero0.7"
                rows[(stage, r["plan"], seed_of[r["run"]], row["space"])] = row
    out = []
    for (stage, plan, seed, space), row in sorted(rows.items()):
        base = rows.get(("pzero0.7", baseline, seed, space))
        if base is None or (stage, plan) == ("pzero0.7", baseline):
            continue
        diff = row["fid"] - base["fid"]
        se = float(np.hypot(row["fid_se"], base["fid_se"]))
        word = "same" if not beyond_noise(diff, se) else "better" if diff < 0 else "worse"
        out.append({"stage": stage, "plan": plan, "seed": seed, "space": space, "diff": diff, "se": se,
                    "verdict": word})
    return out


def rule_table(v: list[dict]) -> list[str]:
    lines = ["| SR stage | plan | seed | space | FID − shipped's | 2 SE | verdict |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['plan']} | {r['seed']} | {r['space']} | {r['diff']:+.3g} | {NOISE_SE * r['se']:.2g} "
              f"| {r['verdict']} |" for r in v]
    by = {}
    for r in v:
        by.setdefault((r["stage"], r["plan"]), []).append(r["verdict"])
    lines += ["", "| SR stage | plan | cells better / same / worse | replaces the shipped plan? |", "|---|---|---|---|"]
    for (stage, plan), words in by.items():
        ok = "worse" not in words and "better" in words and len(words) >= 4  # two seeds x two spaces
        lines.append(f"| {stage} | {plan} | {words.count('better')} / {words.count('same')} / {words.count('worse')} "
                     f"| {'yes' if ok else 'no'} |")
    return lines


def plot(results: list[dict], dest: Path) -> None:
    """Classifier FID against Inception FID, one point per candidate (as sampled), ±1 SE bars, and
    each space's floor as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    floors = {}
    for r in results:
        rows = {row["space"]: row for row in r["rows"] if row["variant"] == "as sampled"}
        if "classifier" not in rows or "inception" not in rows:
            continue
        c, i = rows["classifier"], rows["inception"]
        floors = {s: (rows[s].get("floor") or {}).get("fid") for s in rows}
        ax.errorbar(c["fid"], i["fid"], xerr=c["fid_se"], yerr=i["fid_se"], fmt="o", capsize=2,
                    label=f"{r['run']} {r['plan']}")
    if floors.get("classifier"):
        ax.axvline(floors["classifier"], ls="--", c="grey", lw=0.8)
    if floors.get("inception"):
        ax.axhline(floors["inception"], ls="--", c="grey", lw=0.8)
    ax.set_xlabel("FID, domain classifier space (floor dashed)")
    ax.set_ylabel("FID, TF-2015 Inception space (floor dashed)")
    ax.set_title("Demo cascade candidates, n = 1000 vs 10,000 test images")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(dest / "judges.png", dpi=110)


def publish(out: Path, dest: Path) -> None:
    found = sorted(out.glob("*/*/scores.json"))
    results = [json.loads(p.read_text()) | {"run": p.parent.parent.name} for p in found]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "judges.json").write_text(json.dumps(results, indent=1))
    names = json.loads((out / "class_names.json").read_text()) if (out / "class_names.json").exists() else \
        [str(c) for c in range(10)]
    lines = table(results) + ["", "Recall per class:", ""] + class_table(results, names) + [
        "", "The rule, against the shipped plan of the same training seed:", ""] + rule_table(verdicts(results))
    (dest / "judges.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        plot(results, dest)
    except ImportError:
        print("no plot: pip install matplotlib (the 'bench' extra)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                   help="a demo output (or BASE_RUN+SR_RUN) under a name; repeatable")
    p.add_argument("--plans", default="shipped,unguided,sde25", help=f"comma-separated, of {', '.join(PLANS)}")
    p.add_argument("--border0", default="shipped,sde25", help="plans also scored with their border set to black")
    p.add_argument("--dark0", default="", help=f"plans also scored with every pixel <= {DARK} set to black")
    p.add_argument("--rescore", action="store_true",
                   help="score candidates that have scores.json again (their samples and features are kept: "
                        "only new variants cost a network pass)")
    p.add_argument("--spaces", default="classifier,inception")
    p.add_argument("--classifier", default="runs/classifier")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--n-ref", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0, help="report samples: seeds SEED + j")
    p.add_argument("--sample-only", action="store_true",
                   help="only sample the candidates (kept for a later scoring run; another process may score)")
    p.add_argument("--publish", metavar="DIR")
    a = p.parse_args()
    a.spaces = [s for s in a.spaces.split(",") if s]
    a.border0 = {s for s in a.border0.split(",") if s}
    a.dark0 = {s for s in a.dark0.split(",") if s}
    out = Path(a.out)
    judges: list[Judge] = []
    for spec in a.run:
        name, run = spec.split("=", 1)
        for plan_name in [s for s in a.plans.split(",") if s]:
            d = out / name / plan_name
            if (d / "scores.json").exists() and not a.rescore:
                continue
            d.mkdir(parents=True, exist_ok=True)
            if a.sample_only:
                print(f"{name} {plan_name}: sampling", flush=True)
                sampled(stages_of(run), plan_name, a, d)
                continue
            if not judges:
                data = load_cascade(stages_of(run), "cpu").stages[-1].config.data
                sets = real_sets(data, a)
                judges = [Judge(s, a, sets, data.resolution) for s in a.spaces]
                (out / "class_names.json").write_text(json.dumps(judges[0].ref_set.class_names))
                if not (out / "real" / "real" / "scores.json").exists() or a.rescore:
                    print("real", flush=True)
                    r = score_real(judges, out / "real" / "real")
                    (out / "real" / "real" / "scores.json").write_text(json.dumps(r, indent=1))
            print(f"{name} {plan_name}", flush=True)
            r = score_candidate(stages_of(run), plan_name, a, judges, d)
            (d / "scores.json").write_text(json.dumps(r, indent=1))
    if a.publish:
        publish(out, Path(a.publish))


if __name__ == "__main__":
    main()
