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

Resumable: a candidate whose ``OUT/<run>/<plan>/scores.json`` exists is skipped. ``--publish DIR``
writes ``judges.json`` and ``judges.md`` from what ``OUT`` holds.

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
from cdm.eval.reference import ReferenceSpec, load_reference  # noqa: E402
from cdm.generate import cycle_labels, sample_batched  # noqa: E402
from cdm.data import to_uint8  # noqa: E402

LEVEL = 100  # the demo's SR level s, fixed beforehand
PLANS = {  # name -> (steps per stage, sampler, spacing, guidance per stage)
    "shipped": (6, "dpmpp-2m", "edm", (0.0, 1.0)),  # the demo's cascade file
    "unguided": (6, "dpmpp-2m", "edm", (0.0, 0.0)),
    "sde25": (25, "dpmpp-2m-sde", "uniform", (0.0, 0.0)),  # the studies' plan
    "sde25-w0.5": (25, "dpmpp-2m-sde", "uniform", (0.0, 0.5)),
    "sde25-w1": (25, "dpmpp-2m-sde", "uniform", (0.0, 1.0)),
    "sde25-w2": (25, "dpmpp-2m-sde", "uniform", (0.0, 2.0)),
}
BORDER = 2  # Fashion-MNIST's 28-px images padded to 32: 2 px of exact black on each side


def sampling_plan(name: str) -> SamplingPlan:
    steps, sampler, spacing, w = PLANS[name]
    return SamplingPlan(mode="non-truncated", stages=[
        StagePlan(steps=steps, level=0, sampler=sampler, spacing=spacing, guidance=w[0]),
        StagePlan(steps=steps, level=LEVEL, sampler=sampler, spacing=spacing, guidance=w[1])])


def border_mask(res: int, width: int = BORDER) -> torch.Tensor:
    m = torch.ones(res, res, dtype=torch.bool)
    m[width:res - width, width:res - width] = False
    return m


def stages_of(run: str) -> list[Path]:
    """``DIR`` (a demo output: its two stages) or ``BASE_RUN+SR_RUN``."""
    if "+" in run:
        return [Path(p) for p in run.split("+")]
    return [Path(run) / "fmnist-base8", Path(run) / "fmnist-sr8to32"]


def score_candidate(stages: list[Path], plan_name: str, a: argparse.Namespace, out: Path) -> dict:
    cfg = EvalConfig(features=a.spaces, classifier=a.classifier, reference=ReferenceSpec(n=a.n_ref), n=a.n,
                     seed=a.seed, batch_size=250, device="cpu", progress=False)
    cascade = load_cascade(stages, "cpu")
    labels = cycle_labels(a.n, cascade.num_classes)
    t0 = time.time()
    res = sample_batched(cascade, labels, list(range(a.seed, a.seed + a.n)), sampling_plan(plan_name), 250)
    sample_s = time.time() - t0
    final = to_uint8(res.images[-1])
    np.savez_compressed(out / "samples.npz", images=final.numpy(), labels=labels.numpy())
    data = cascade.stages[-1].config.data
    ref_set = load_reference(data, cfg.reference)
    floor_set = floor_images(data, cfg.reference, a.n, cfg.seed)
    mask = border_mask(final.shape[-1])
    clamped = final.clone()
    clamped[..., mask] = 0
    rows = []
    for space in a.spaces:
        ex = make_extractor(space, a.classifier, "cpu")
        ref = reference_features(ex, ref_set, final.shape[-1])
        for variant, im in (("as sampled", final), ("border0", clamped)):
            row = score_with_floor(ex, ex(im), ref, ref_set, floor_set, final.shape[-1], cfg)
            rows.append({"space": space, "variant": variant, **row})
    return {"stages": [str(s) for s in stages], "plan": plan_name, "sampling": PLANS[plan_name], "level": LEVEL,
            "n": a.n, "seed": a.seed, "n_ref": a.n_ref, "sample_seconds": round(sample_s, 1),
            "border_abs": float(final[..., mask].float().mean()), "rows": rows, "machine": machine_facts(),
            "date": time.strftime("%Y-%m-%d")}


def publish(out: Path, dest: Path) -> None:
    found = sorted(out.glob("*/*/scores.json"))
    results = [json.loads(p.read_text()) | {"run": p.parent.parent.name} for p in found]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "judges.json").write_text(json.dumps(results, indent=1))

    def pm(row, k):
        return f"{row[k]:.3g} ± {row[k + '_se']:.2g}"

    lines = ["| run | plan | space | border | FID ± SE | floor FID | KID ± SE | precision | recall | border mean |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            fl = row.get("floor") or {}
            lines.append(f"| {r['run']} | {r['plan']} | {row['space']} | {row['variant']} | {pm(row, 'fid')} | "
                         f"{fl.get('fid', float('nan')):.3g} | {pm(row, 'kid')} | {row['precision']:.3f} | "
                         f"{row['recall']:.3f} | {r['border_abs']:.2f} |")
    (dest / "judges.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                   help="a demo output (or BASE_RUN+SR_RUN) under a name; repeatable")
    p.add_argument("--plans", default="shipped,unguided,sde25", help=f"comma-separated, of {', '.join(PLANS)}")
    p.add_argument("--spaces", default="classifier,inception")
    p.add_argument("--classifier", default="runs/classifier")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--n-ref", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0, help="report samples: seeds SEED + j")
    p.add_argument("--publish", metavar="DIR")
    a = p.parse_args()
    a.spaces = [s for s in a.spaces.split(",") if s]
    out = Path(a.out)
    for spec in a.run:
        name, run = spec.split("=", 1)
        for plan_name in [s for s in a.plans.split(",") if s]:
            d = out / name / plan_name
            if (d / "scores.json").exists():
                continue
            d.mkdir(parents=True, exist_ok=True)
            print(f"{name} {plan_name}", flush=True)
            r = score_candidate(stages_of(run), plan_name, a, d)
            (d / "scores.json").write_text(json.dumps(r, indent=1))
    if a.publish:
        publish(out, Path(a.publish))


if __name__ == "__main__":
    main()
