"""Classifier-free guidance on the Fashion-MNIST cascade: FID, precision and recall
against the guidance weight w for the base stage, the (s, w) grid for the SR stage, and the best
guided cascade beside the best unguided one, per training seed.

For each training seed k, the stages are the convergence benchmark's ``--recipe`` runs (default ``new-puncond0.1``: the
presets with label dropout ``train.p_uncond = 0.1``); ``benchmarks/convergence.py`` trains them and
scores them unguided beside the presets without dropout). Everything is ``cdm sweep``
(:func:`cdm.eval.search.sweep_cascade`), never writing a cascade file, so every point is resumable
and carries a bootstrap error bar, precision and recall (classifier space, 1000 samples against the
10,000 test images):

1. **select** on samples with seeds ``--select-seed`` + j: the base stage's weight alone
   (``--stage-index 0``), then the SR stage's (s, w) grid on the *unguided* base's samples; the best
   unguided SR level is the w = 0 row of the same grid;
2. **report** on other samples (seeds ``--report-seed`` + j): the best guided cascade (base w*, SR
   (s*, w*)) and the best unguided one (base w = 0, SR (s0, 0)), both chosen in step 1.

Sampling: DPM-Solver++(2M) on the ``edm`` grid, ``--steps`` per stage (the setting the few-step study
measured), non-truncated. ``--publish DIR`` writes ``guidance.json``, ``guidance.md`` and
``guidance.png`` from what the runs left in ``--out``.

    .venv/bin/python benchmarks/guidance.py --out runs/guidance --runs runs/convergence --seeds 0,1
    .venv/bin/python benchmarks/guidance.py --out runs/guidance --seeds 0,1 --publish docs/bench/guidance
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import facts_line, load_average, machine_facts  # noqa: E402

from cdm.cascade import DEFAULT_SAMPLER, DEFAULT_SPACING, DEFAULT_STEPS, SamplingPlan, StagePlan  # noqa: E402
from cdm.checkpoint import resolve_checkpoint_path  # noqa: E402
from cdm.eval.quality import EvalConfig  # noqa: E402
from cdm.eval.search import sweep_cascade  # noqa: E402
from cdm.eval.sweep import SweepConfig, weight  # noqa: E402

def plan(steps: int, sr_level: int, w_base: float = 0.0, w_sr: float = 0.0) -> SamplingPlan:
    st = dict(steps=steps, sampler=DEFAULT_SAMPLER, spacing=DEFAULT_SPACING)  # cdm's default plan
    return SamplingPlan(mode="non-truncated", stages=[StagePlan(level=0, guidance=w_base, **st),
                                                     StagePlan(level=sr_level, guidance=w_sr, **st)])


def best(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: (r["value"], weight(r), r["level"]))


def point(r: dict) -> dict:
    m = r.get("metrics", {})
    return {"level": r["level"], "w": weight(r), "fid": r["value"], "fid_se": m.get("fid_se"),
            "precision": m.get("precision"), "recall": m.get("recall"), "n": r["n"], "seed": r["seed"]}


def run_seed(a, k: int, ev: EvalConfig) -> dict:
    ckpts = [resolve_checkpoint_path(Path(a.runs) / stage / recipe / f"seed{k}")
             for stage, recipe in (("base", a.recipe), ("sr", a.sr_recipe or a.recipe))]
    out = Path(a.out) / f"seed{k}"
    log = lambda s: print(f"[seed {k}] {s}", flush=True)  # noqa: E731
    sweep = lambda name, p, **cfg: sweep_cascade(  # noqa: E731
        ckpts, p, out / name, SweepConfig(n=a.n, modes=["non-truncated"], write_best=False, **cfg), ev, log=log)
    base = sweep("base-select", plan(a.steps, a.levels[0]), stage=0, weights=a.weights_base, seed=a.select_seed)
    sr = sweep("sr-select", plan(a.steps, a.levels[0]), stage=1, levels=a.levels, weights=a.weights_sr,
               seed=a.select_seed)
    wb = weight(best(base["rows"]))
    g, u = best(sr["rows"]), best([r for r in sr["rows"] if weight(r) == 0])
    guided = sweep("report-guided", plan(a.steps, g["level"], wb, weight(g)), stage=1, levels=[g["level"]],
                   weights=[weight(g)], seed=a.report_seed)
    unguided = guided if (wb, weight(g), g["level"]) == (0, 0, u["level"]) else sweep(
        "report-unguided", plan(a.steps, u["level"]), stage=1, levels=[u["level"]], seed=a.report_seed)
    return {"seed": k, "stages": [str(c) for c in ckpts],
            "base_select": [point(r) for r in sorted(base["rows"], key=weight)],
            "sr_select": [point(r) for r in sorted(sr["rows"], key=lambda r: (r["level"], weight(r)))],
            "chosen": {"base_w": wb, "sr_level": g["level"], "sr_w": weight(g), "unguided_sr_level": u["level"]},
            "report_guided": point(guided["best"]), "report_unguided": point(unguided["best"])}


def publish(a, results: list[dict], dest: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dest.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join(sys.argv), "machine": machine_facts(), "n": a.n, "steps": a.steps,
               "sampler": f"{DEFAULT_SAMPLER}, {DEFAULT_SPACING} grid", "select_seed": a.select_seed, "report_seed": a.report_seed,
               "seeds": results}
    (dest / "guidance.json").write_text(json.dumps(payload, indent=1))
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for row, (key, title) in enumerate([("base_select", "base 8x8"), ("sr_select", "SR 8->32")]):
        for col, metric in enumerate(["fid", "precision", "recall"]):
            ax = axes[row][col]
            for res in results:
                pts = res[key]
                levels = sorted({p["level"] for p in pts})
                for lv in levels:
                    xs = [p for p in pts if p["level"] == lv]
                    lab = f"seed {res['seed']}" + (f", s = {lv}" if key == "sr_select" else "")
                    ax.errorbar([p["w"] for p in xs], [p[metric] for p in xs],
                                yerr=[p["fid_se"] for p in xs] if metric == "fid" else None, marker="o", ms=3,
                                capsize=2, label=lab)
            ax.set_title(f"{title}: {metric}")
            ax.set_xlabel("guidance weight w")
            if col == 0:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(dest / "guidance.png", dpi=110)
    lines = [f"Machine: {facts_line(machine_facts())}; load average at publishing {load_average()}.", ""]
    for res in results:
        lines += [f"### Training seed {res['seed']}", "",
                  "| stage | s | w | FID ± SE | precision | recall |", "|---|---|---|---|---|---|"]
        for key, name in (("base_select", "base"), ("sr_select", "SR")):
            lines += [f"| {name} | {p['level'] if name == 'SR' else '-'} | {p['w']:g} | {p['fid']:.3f} ± {p['fid_se']:.3f} "
                      f"| {p['precision']:.3f} | {p['recall']:.3f} |" for p in res[key]]
        c, gd, ud = res["chosen"], res["report_guided"], res["report_unguided"]
        lines += ["", f"Chosen on seeds {a.select_seed}+: base w = {c['base_w']:g}; SR s = {c['sr_level']}, "
                      f"w = {c['sr_w']:g} (unguided: s = {c['unguided_sr_level']}). Reported on seeds {a.report_seed}+: "
                      f"guided cascade {gd['fid']:.3f} ± {gd['fid_se']:.3f} (precision {gd['precision']:.3f}, recall "
                      f"{gd['recall']:.3f}); unguided cascade {ud['fid']:.3f} ± {ud['fid_se']:.3f} (precision "
                      f"{ud['precision']:.3f}, recall {ud['recall']:.3f}).", ""]
    if len(results) > 1:
        diffs = [r["report_unguided"]["fid"] - r["report_guided"]["fid"] for r in results]
        m = sum(diffs) / len(diffs)
        sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1))
        lines += [f"Unguided minus guided cascade FID over training seeds: mean {m:.3f}, standard deviation {sd:.3f} "
                  f"({len(diffs)} seeds).", ""]
    (dest / "guidance.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--runs", default="runs/convergence", help="convergence.py's --out (holds the stages)")
    p.add_argument("--recipe", default="new-puncond0.1", help="the convergence recipe whose stages are guided")
    p.add_argument("--sr-recipe", default="", help="the SR stage's convergence recipe, if not --recipe's "
                   "(e.g. new-puncond0.1-pzero0.7, the preset's recipe today)")
    p.add_argument("--classifier", default="runs/convergence/classifier")
    p.add_argument("--seeds", type=lambda t: [int(v) for v in t.split(",")], default=[0, 1])
    p.add_argument("--weights-base", type=lambda t: [float(v) for v in t.split(",")], default=[0, 0.25, 0.5, 1, 2])
    p.add_argument("--weights-sr", type=lambda t: [float(v) for v in t.split(",")], default=[0, 0.5, 1, 2])
    p.add_argument("--levels", type=lambda t: [int(v) for v in t.split(",")], default=[50, 100, 200])
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"steps per stage (default {DEFAULT_STEPS}: cdm's default)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--select-seed", type=int, default=100_000)
    p.add_argument("--report-seed", type=int, default=0)
    p.add_argument("--publish", help="write guidance.json/.md/.png here")
    a = p.parse_args()
    ev = EvalConfig(classifier=a.classifier, device="cpu")
    results = [run_seed(a, k, ev) for k in a.seeds]  # resumable: finished points are read back
    if a.publish:
        publish(a, results, Path(a.publish))


if __name__ == "__main__":
    main()
