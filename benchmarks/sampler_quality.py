"""Sample quality against the number of network evaluations (NFE), per sampler, grid and stage.

``--stage cascade`` samples the whole cascade with the same setting in every stage (the first
version of this benchmark). ``--stage base`` samples the base stage alone and scores its own
output (at its resolution). ``--stage sr`` holds the base stage's output fixed (its samples under
the cascade file's own plan, drawn once and cached beside ``--out``) and samples the last SR
stage with each setting, at the cascade file's level and mode, scoring the final images; so an SR
stage's curve shows what its own steps cost. Every point uses the same labels and seeds (sample
``j``: seed ``j``); scores are in the domain classifier's feature space, FID with its bootstrap
standard error, against real test images. Resumable: each finished point is appended to
``<out>.jsonl`` and skipped when the script runs again.

A configuration is ``sampler[@churn]:steps,steps,...``, ``;``-separated: ``dpmpp-2m@5:4,6,10`` is
DPM-Solver++(2M) with EDM's churn S_churn = 5 (over ``--churn-interval``). Each runs on every grid of
``--spacings``. Every sampler here evaluates the network once per step, so NFE = steps.

    B=".venv/bin/python benchmarks/sampler_quality.py --cascade runs/demo/cascade.json --classifier C --n 1000"
    $B --stage sr --configs "ancestral:250;dpmpp-2m-sde:4,6,10,25;dpmpp-3m:3,4,6,10" --spacings uniform,edm \
       --out docs/bench/few_step_sr.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from _common import cpu_model, load_average
from cdm.cascade import SamplingPlan
from cdm.cascade_file import load_cascade, read_cascade_file
from cdm.data import to_uint8
from cdm.eval.features import make_extractor, reference_features
from cdm.eval.quality import quality_scores, standard_error
from cdm.eval.reference import ReferenceSpec, load_reference
from cdm.generate import cycle_labels, sample_batched

DEFAULT_CONFIGS = "ancestral:25,50,100,250;ddim:10,25,50;ddim-eta1:25;dpmpp-2m:10,15,25;dpmpp-2m-sde:10,15,25,50"


def parse_configs(text: str) -> list[tuple[str, float, int]]:
    """``"ancestral:50,250;dpmpp-2m@5:10,25"`` -> ``[("ancestral", 0.0, 50), ..., ("dpmpp-2m", 5.0, 10), ...]``."""
    out = []
    for part in filter(None, text.split(";")):
        name, steps = part.split(":")
        sampler, _, churn = name.strip().partition("@")
        out += [(sampler, float(churn or 0), int(s)) for s in steps.split(",")]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cascade", required=True, help="cascade file (cdm demo writes runs/demo/cascade.json)")
    p.add_argument("--classifier", required=True, help="domain classifier dir (cdm train-classifier)")
    p.add_argument("--stage", choices=["cascade", "base", "sr"], default="cascade",
                   help="what the settings apply to and what is scored (module docstring)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"sampler[@churn]:steps,... ;-separated "
                                                              f"(default {DEFAULT_CONFIGS})")
    p.add_argument("--spacings", default="quadratic", help="time-grid spacings, comma-separated")
    p.add_argument("--churn-interval", default="0,1", help="LO,HI: churn where LO <= t/T <= HI")
    p.add_argument("--starts", default="1", help="comma-separated: SR stages start their reverse process at "
                                                 "t = START * T from their noised upsampled input (1: from noise; "
                                                 "StagePlan.start); every setting runs at each")
    p.add_argument("--n", type=int, default=1000, help="samples per configuration")
    p.add_argument("--seed", type=int, default=0, help="sample j uses seed SEED + j (choose a setting on one set of "
                                                         "seeds, report it on another)")
    p.add_argument("--n-ref", type=int, default=10000, help="real test images in the reference")
    p.add_argument("--bootstrap", type=int, default=30, help="resamples for the FID's standard error")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", default="docs/bench/sampler_quality.json")
    a = p.parse_args()
    interval = [float(v) for v in a.churn_interval.split(",")]

    paths, saved = read_cascade_file(a.cascade)
    cascade = load_cascade(paths, "cpu")
    k = len(cascade.stages)
    scored = 0 if a.stage == "base" else k - 1  # the stage whose output is scored
    ex = make_extractor("classifier", a.classifier)
    st = cascade.stages[scored]
    ref = reference_features(ex, load_reference(st.config.data, ReferenceSpec(split="test", n=a.n_ref)),
                             st.resolution)
    labels = cycle_labels(a.n, cascade.num_classes)
    seeds = list(range(a.seed, a.seed + a.n))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lower = lower_output(cascade, saved, labels, seeds, a, out) if a.stage == "sr" else None

    log = out.with_suffix(".jsonl")
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
    key = lambda r: (r.get("stage", "cascade"), r["sampler"], r.get("churn", 0.0), r["spacing"], r["steps"],  # noqa: E731
                     r.get("start", 1.0))
    done = {key(r) for r in rows if r["n"] == a.n and r.get("seed", 0) == a.seed}
    load = load_average()
    starts = [float(v) for v in a.starts.split(",")] if a.stage != "base" else [1.0]
    for spacing, start in [(sp, st) for sp in a.spacings.split(",") for st in starts]:
        for sampler, churn, steps in parse_configs(a.configs):
            if (a.stage, sampler, churn, spacing, steps, start) in done:
                continue
            setting = dict(steps=steps, sampler=sampler, spacing=spacing, churn=churn, churn_interval=interval,
                           start=start)
            t0 = time.perf_counter()
            images = sample_setting(cascade, saved, a.stage, setting, labels, seeds, lower, a.batch_size)
            seconds = time.perf_counter() - t0
            feats = ex(to_uint8(images))
            scores = quality_scores(feats, ref, metrics=("fid", "kid"))
            row = {"stage": a.stage, "sampler": sampler, "churn": churn, "churn_interval": interval if churn else None,
                   "spacing": spacing, "steps": steps, "start": start, "nfe_per_stage": steps, "seed": a.seed,
                   "nfe_total": steps * (k if a.stage == "cascade" else 1), "n": a.n, "fid": scores["fid"],
                   "fid_se": standard_error("fid", np.asarray(feats["features"], np.float64), ref, a.bootstrap),
                   "kid": scores["kid"], "kid_std": scores["kid_std"], "sample_s": round(seconds, 1),
                   "load_average": load}
            rows.append(row)
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{a.stage} {sampler}{f'@{churn:g}' if churn else ''} {spacing}{f' start {start:g}' if start < 1 else ''} "
                  f"{steps:4d} steps  "
                  f"FID {row['fid']:7.3f} ± {row['fid_se']:.3f}  {seconds:6.1f} s", flush=True)
    write_summary(rows, a, saved, ref, out)


def lower_output(cascade, saved: SamplingPlan, labels, seeds, a, out: Path) -> torch.Tensor:
    """The base (lower) stages' final output under the cascade file's own plan, cached."""
    cache = out.with_name(out.stem + f".lower-n{a.n}-seed{a.seed}.npy")
    if cache.exists():
        return torch.from_numpy(np.load(cache))
    bs, last = a.batch_size, len(cascade.stages) - 2
    z0 = torch.cat([cascade.sample(labels[i:i + bs], seeds[i:i + bs], saved, last_stage=last).images[-1]
                    for i in range(0, len(labels), bs)])
    np.save(cache, z0.numpy())
    return z0


def sample_setting(cascade, saved: SamplingPlan, stage: str, setting: dict, labels, seeds, lower, bs: int):
    """The scored images ``[n, C, R, R]`` of one setting (see the module docstring); its ``start``
    applies to the SR stages (the base always starts at 1)."""
    if stage == "cascade":
        k = len(saved.stages)
        plan = saved.override(**{**setting, "steps": [setting["steps"]], "start": [1.0] + [setting["start"]] * (k - 1)})
        return sample_batched(cascade, labels, seeds, plan, bs).images[-1]
    if stage == "base":
        plan = replace(saved.stages[0], **setting)
        return torch.cat([cascade.sample_stage(0, labels[i:i + bs], seeds[i:i + bs], plan)[0].clamp(-1, 1).cpu()
                          for i in range(0, len(labels), bs)])
    i = len(cascade.stages) - 1
    plan = replace(saved.stages[i], **setting)
    if saved.mode != "non-truncated":
        raise SystemExit("--stage sr holds the lower output fixed as z_0: use a non-truncated cascade file")
    return torch.cat([cascade.sample_stage(i, labels[j:j + bs], seeds[j:j + bs], plan, lowres=lower[j:j + bs],
                                           corrupt=True)[0].clamp(-1, 1).cpu() for j in range(0, len(labels), bs)])


def write_summary(rows: list[dict], a, saved: SamplingPlan, ref, out: Path) -> None:
    """A Markdown table (printed) and the JSON summary, with each row's FID relative to the
    ancestral run with the most steps on any grid (the reference)."""
    rows = [r for r in rows if r["n"] == a.n and r.get("stage", "cascade") == a.stage and r.get("seed", 0) == a.seed]
    anc = [r for r in rows if r["sampler"] == "ancestral"]
    ref_row = max(anc, key=lambda r: r["steps"]) if anc else None
    print(f"\n| sampler | churn | grid | start | NFE/stage | classifier FID ± SE | vs {ref_row and ref_row['steps']}-step "
          f"ancestral | sampling s |\n|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["sampler"], r.get("churn", 0), r["spacing"], -r.get("start", 1), r["steps"])):
        rel = f"{r['fid'] / ref_row['fid']:.2f}x" if ref_row else "-"
        print(f"| {r['sampler']} | {r.get('churn', 0):g} | {r['spacing']} | {r.get('start', 1):g} | {r['steps']} | {r['fid']:.2f} ± "
              f"{r.get('fid_se', float('nan')):.2f} | {rel} | {r['sample_s']} |")
    summary = {"cascade": a.cascade, "stage": a.stage, "sampling_levels": [s.level for s in saved.stages],
               "mode": saved.mode, "feature_space": ref.space, "reference": ref.source, "reference_row": ref_row,
               "rows": rows, "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                                         "torch": torch.__version__, "load_average_at_end": load_average()}}
    out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
