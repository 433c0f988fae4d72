"""Choose the demo cascade's augmentation level (and mode) on selection seeds, then score the choice.

The demo cascade is the two presets at their shipped budgets, seed 0 — exactly the ``new`` runs of
benchmarks/convergence.py (its extra EMA tracking does not change training). Every candidate
(mode, s) samples ``--n`` cascade outputs with seeds 100000 + j (SDE-DPM-Solver++(2M), 25 uniform
steps per stage) and is scored by classifier FID against the 10,000 test images at 32 px; the best
is then scored once on the report seeds 0..n-1 (the seeds `cdm eval` uses). Rows already in
``--json`` for the same stages and n are reused, so candidates can be added run by run.

``--before BASE,SR`` also scores the cascade the demo shipped before (the ``old`` runs) at the same
level on the report seeds, and ``--inception`` adds the Inception FID (TF-2015 FID Inception,
same 10,000 test images) of both report rows and of n real training images (the floor) — slow on a
CPU (~0.2 s per image), hence optional.

    .venv/bin/python benchmarks/demo_level.py --out runs/convergence --base runs/convergence/base/new/seed0 \\
        --sr runs/convergence/sr/new/seed0 --levels 0,50,100,200 --json docs/bench/demo_level.json \\
        --before runs/convergence/base/old/seed0,runs/convergence/sr/old/seed0 --inception
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cdm.cascade import Cascade, SamplingPlan
from cdm.checkpoint import load_stage
from cdm.data import to_uint8
from cdm.eval.features import make_extractor, reference_features
from cdm.eval.quality import quality_scores
from cdm.generate import cycle_labels, sample_batched

sys.path.insert(0, str(Path(__file__).parent))
from _common import load_average, machine_facts  # noqa: E402
from convergence import SAMPLE_STEPS, SAMPLER, SELECTION_SEED, SPACING, Scorer, first_images  # noqa: E402


def draw(cascade: Cascade, mode: str, level: int, seed0: int, n: int) -> tuple[torch.Tensor, float]:
    """``n`` 32x32 cascade outputs with seeds seed0.., balanced labels; and the seconds it took."""
    plan = SamplingPlan.uniform(2, steps=SAMPLE_STEPS, levels=[0, level], mode=mode, sampler=SAMPLER, spacing=SPACING)
    t = time.time()
    out = sample_batched(cascade, cycle_labels(n, cascade.num_classes), list(range(seed0, seed0 + n)), plan)
    return out.images[-1], round(time.time() - t, 1)


class InceptionScorer:
    """Inception FID against the 10,000 test images at 32 px, and its real-data floor at n."""

    def __init__(self, scorer: Scorer, cache: Path):
        self.ex = make_extractor("inception", None)
        self.ref = reference_features(self.ex, scorer.test, 32, cache_dir=cache)
        self.floor = self(first_images(scorer.data, "train", 32, scorer.n))  # the images of scorer.floor

    def __call__(self, x: torch.Tensor) -> float:
        feats = self.ex(x if x.dtype == torch.uint8 else to_uint8(x))
        return quality_scores(feats, self.ref, metrics=("fid",))["fid"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the convergence benchmark's folder (classifier, reference cache)")
    p.add_argument("--base", required=True)
    p.add_argument("--sr", required=True)
    p.add_argument("--levels", type=lambda t: [int(v) for v in t.split(",")], default=[0, 50, 100, 200])
    p.add_argument("--modes", type=lambda t: t.split(","), default=["non-truncated", "truncated"])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--before", type=lambda t: t.split(","), help="BASE,SR: the previous demo cascade, scored alike")
    p.add_argument("--inception", action="store_true", help="also the Inception FID of the report rows")
    p.add_argument("--json", help="write every row here (rows already there for these stages and n are reused)")
    a = p.parse_args()
    if a.before and len(a.before) != 2:
        p.error("--before takes BASE,SR")

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    old = json.loads(Path(a.json).read_text()) if a.json and Path(a.json).exists() else {}
    same = (old.get("base"), old.get("sr"), old.get("n")) == (a.base, a.sr, a.n)
    rows = [r for r in old.get("rows", []) if r["sample_seed"] == SELECTION_SEED] if same else []
    scorer = Scorer(Path(a.out), a.n, log)
    cascade = Cascade([load_stage(a.base), load_stage(a.sr)])
    for mode in a.modes:
        for level in a.levels:
            if mode == "truncated" and level == 0:
                continue  # the same input as non-truncated at s = 0
            if any((r["mode"], r["level"]) == (mode, level) for r in rows):
                continue
            x, sec = draw(cascade, mode, level, SELECTION_SEED, a.n)
            rows.append({"mode": mode, "level": level, "sample_seed": SELECTION_SEED, **scorer(x), "seconds": sec})
            log(f"selection: {mode} s = {level}: FID {rows[-1]['fid']:.2f} ± {rows[-1]['fid_se']:.2f}")
    best = min(rows, key=lambda r: r["fid"])
    inception = InceptionScorer(scorer, Path(a.out) / "cache") if a.inception else None
    report = [("after", cascade)]
    if a.before:
        report.append(("before", Cascade([load_stage(a.before[0]), load_stage(a.before[1])])))
    for name, c in report:
        x, sec = draw(c, best["mode"], best["level"], 0, a.n)
        row = {"cascade": name, "mode": best["mode"], "level": best["level"], "sample_seed": 0, **scorer(x),
               "seconds": sec}
        if inception:
            row["inception_fid"] = inception(x)
        rows.append(row)
        log(f"{name}: {best['mode']} s = {best['level']} on the report seeds: FID {row['fid']:.2f} ± "
            f"{row['fid_se']:.2f} (real-data floor at n = {a.n}: {scorer.floor[32]:.2f})"
            + (f"; Inception FID {row['inception_fid']:.1f} (floor {inception.floor:.1f})" if inception else ""))
    facts = machine_facts()
    result = {"command": " ".join(sys.argv), "cpu": facts["cpu"], "load": load_average(), "base": a.base,
              "sr": a.sr, "before": a.before, "n": a.n, "sampler": SAMPLER, "steps": SAMPLE_STEPS,
              "floor": scorer.floor[32], "inception_floor": inception.floor if inception else None,
              "rows": rows, "chosen": {"mode": best["mode"], "level": best["level"]}}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
