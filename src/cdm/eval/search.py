"""``cdm sweep``: the sweep engine (:mod:`cdm.eval.sweep`) run with error bars, the level it finds
decided on and written, and the report.

:func:`sweep_cascade` is ``cdm sweep``: every point gets an error bar (a bootstrap standard error
over the samples), and the level found is written into the cascade file only when it beats the
plan's current (mode, level) beyond the noise (:func:`cdm.eval.verdict.beyond_noise`, the rule
``cdm eval --compare`` uses: more than twice the standard error of their difference, here taken
as independent, which over-states it: the points share seeds); otherwise the report says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from torch import Tensor

from ..cascade import Mode, SamplingPlan
from ..cascade_file import CASCADE_FILE, load_cascade, read_cascade_file, write_cascade_file
from ..files import atomic_write
from ..config import ConfigError
from ..data import to_uint8
from ..runlock import holding_lock
from .features import make_extractor, reference_features
from .ledger import Judge
from .quality import EvalConfig, check_overlap
from .scores import quality_scores, standard_error
from .reference import load_reference
from .report import Report, heatmap_svg, line_plot_svg
from .sweep import Conditioning, SweepConfig, best_level, condition_label, describe, run_sweep, weight
from .verdict import NOISE_SE, beyond_noise


def sweep_plot(rows: list[dict], metric_name: str, stage: int) -> str:
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        key = condition_label(r) + (f", w = {weight(r):g}" if weight(r) else "")
        series.setdefault(key, []).append((r["level"], r["value"]))
    return line_plot_svg(series, "augmentation level s", metric_name,
                         f"stage {stage}: {metric_name} against s (lower is better)")


def decide(rows: list[dict], metric: str, mode: str, level: int, w: float = 0.0
            ) -> tuple[dict, dict | None, bool, str]:
    """``(best row, current row, write?, why)``: the best setting wins only beyond the noise."""
    best = best_level(rows)
    cur = next((r for r in rows if r["mode"] == mode and r["level"] == level and weight(r) == w), None)
    now = describe({"stage": rows[0].get("stage"), "mode": mode, "level": level, "guidance": w})
    if cur is None:
        return best, None, False, (f"the cascade's current setting ({now}) was not swept, so nothing was compared "
                                   f"with it; the file is left as it was")
    if best is cur:
        return best, cur, False, f"the current setting ({now}) is the best; nothing to change"
    se = math.hypot(best["metrics"].get(f"{metric}_se", 0.0), cur["metrics"].get(f"{metric}_se", 0.0))
    gain = cur["value"] - best["value"]
    won = describe(best)
    if beyond_noise(gain, se):
        return best, cur, True, (f"{won} beats the current {now} by {gain:.4g} (> {NOISE_SE:g} x {se:.3g}, "
                                 f"{NOISE_SE:g} standard errors of the difference)")
    return best, cur, False, (f"{won} is lower than the current {now} by {gain:.4g}, within the noise "
                              f"({NOISE_SE:g} x {se:.3g}): the file is left as it was; sweep with more samples (--n) to tell "
                              f"them apart")


@holding_lock("sweeping")
def sweep_cascade(checkpoints: list[Path], plan: SamplingPlan, out_dir: str | Path, cfg: SweepConfig,
                  ev: EvalConfig, cascade_file: str | Path | None = None, log=print) -> dict:
    """``cdm sweep``: search SR stage ``cfg.stage``'s level (both modes with generated inputs, or
    with ground-truth inputs) with the cascade sampled as ``plan`` says, ranked by ``cfg.metric``
    in ``ev.features[0]`` against ``ev.reference``; write ``summary.json``, a plot and a report,
    and (generated inputs, ``cfg.write_best``) the winning (mode, s) into ``cascade_file`` (else
    ``OUT/cascade.json``) only when it beats the current one beyond the noise."""
    if cfg.metric not in ("fid", "kid"):
        raise ConfigError(f"sweep metric must be 'fid' or 'kid', got {cfg.metric!r}")
    generated = cfg.conditioning_kind() is Conditioning.GENERATED
    out = Path(out_dir)
    cascade = load_cascade(checkpoints, ev.device, ev.precision)
    i = cfg.stage % len(cascade.stages)
    mode, level, w = plan.mode, plan.stages[i].level, plan.stages[i].guidance
    if generated and Mode(mode) in cfg.resolved_modes() and level not in cfg.levels:
        cfg = replace(cfg, levels=sorted({*cfg.levels, level}))  # the current setting is a candidate too
    if cfg.weights and w not in cfg.weights:
        cfg = replace(cfg, weights=sorted({*cfg.weights, w}))
    ex = make_extractor(ev.features[0], ev.classifier, ev.device)
    ref_set = load_reference(cascade.stages[i].config.data, ev.reference)
    overlap = check_overlap(cascade, ref_set, log)
    ref = reference_features(ex, ref_set, cascade.stages[i].resolution, ev.cache_dir)
    name = f"{cfg.metric}[{ex.name}]"
    beside = [make_extractor(s, ev.classifier, ev.device) for s in ev.features[1:]]  # scored, not ranking
    beside = [(e, reference_features(e, ref_set, cascade.stages[i].resolution, ev.cache_dir)) for e in beside]

    def score(x: Tensor, labels: Tensor) -> dict:
        x = to_uint8(x)
        feats = ex(x)
        q = quality_scores(feats, ref, (cfg.metric, "pr"))
        row = {cfg.metric: q[cfg.metric], f"{cfg.metric}_se": standard_error(cfg.metric, feats["features"], ref),
               "precision": q["precision"], "recall": q["recall"]}
        for e, r in beside:  # the same samples in another feature space, side by side
            f = e(x)
            row[f"{cfg.metric}[{e.name}]"] = quality_scores(f, r, (cfg.metric,))[cfg.metric]
            row[f"{cfg.metric}[{e.name}]_se"] = standard_error(cfg.metric, f["features"], r)
        return row

    rows = run_sweep(cascade, plan, cfg, Judge(score, name, cfg.metric), out, progress=log)
    best, cur, write, why = decide(rows, cfg.metric, mode, level, w)
    if not generated:
        write, why = False, "ground-truth inputs are an ablation, not a way to sample: no cascade file is written"
    elif not cfg.write_best:
        write, why = False, f"not written (--no-write); {why}"
    target = Path(cascade_file) if cascade_file else out / CASCADE_FILE
    if write:
        paths, saved = read_cascade_file(target) if cascade_file else (checkpoints, plan)
        saved = replace(saved, mode=Mode(best["mode"]).value)
        saved.stages = [replace(st, level=int(best["level"]), guidance=weight(best)) if j == i else st
                        for j, st in enumerate(saved.stages)]
        write_cascade_file(target, paths, saved)
        why += f"; written into {target}"
    summary = {"metric": name, "reference": ref.source, "reference_overlap": overlap, "stage": i,
               "conditioning": cfg.conditioning, "best": best, "current": cur, "written": write, "decision": why,
               "best_per_mode": {m: best_level([r for r in rows if r["mode"] == m]) for m in {r["mode"] for r in rows}},
               "rows": rows}
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    _sweep_report(summary, cfg, plan, out)
    return summary


def _sweep_report(summary: dict, cfg: SweepConfig, plan: SamplingPlan, out: Path) -> Path:
    i, name, rows = summary["stage"], summary["metric"], summary["rows"]
    rep = Report(f"cdm augmentation-level sweep (stage {i})")
    inputs = ("the stage below's samples" if cfg.conditioning_kind() is Conditioning.GENERATED else
              f"ground-truth inputs: {cfg.n} real {cfg.ground_truth_split}-split images (seed {cfg.seed}), "
              f"downsampled as in training and corrupted at s by the forward process")
    sp = plan.stages[i]
    rep.text(f"{cfg.n} samples per candidate; conditioned on {inputs}; metric {name} against {summary['reference']} "
             f"(reference images a stage trained on: {summary['reference_overlap']}); stage {i} sampled with "
             f"{sp.sampler}, {sp.steps} steps, {sp.spacing} grid.")
    if i == 0:
        rep.svg(line_plot_svg({"base stage": sorted((weight(r), r["value"]) for r in rows)}, "guidance weight w", name,
                              f"stage 0: {name} against w (lower is better)"), "sweep.svg", "metric against w")
    else:
        rep.svg(sweep_plot(rows, name, i), "sweep.svg", "metric against the augmentation level")
    for m in sorted({r["mode"] for r in rows} if i > 0 and len({weight(r) for r in rows}) > 1 else ()):
        grid = {(r["level"], weight(r)): r["value"] for r in rows if r["mode"] == m}
        rep.svg(heatmap_svg(grid, "augmentation level s", "guidance weight w", f"{name}, {m} (lower is better)"),
                f"heatmap-{m}.svg", f"{name} over (s, w), {m}")
    se, b = f"{cfg.metric}_se", summary["best"]
    m = lambda r, k: r.get("metrics", {}).get(k)  # noqa: E731
    beside = sorted({k for r in rows for k in r.get("metrics", {}) if k.startswith(f"{cfg.metric}[")
                     and not k.endswith("_se")})  # other feature spaces, scored side by side
    rep.table([{**r, "guidance": weight(r), "± se": m(r, se), "precision": m(r, "precision"), "recall": m(r, "recall"),
                **{k: m(r, k) for k in beside}, **{f"{k} ± se": m(r, f"{k}_se") for k in beside}}
               for r in sorted(rows, key=lambda r: (r["mode"], r["level"], weight(r)))],
              ["conditioning", "mode", "level", "guidance", "value", "± se", "precision", "recall",
               *[c for k in beside for c in (k, f"{k} ± se")], "n", "steps", "sampler"])
    rep.text(f"Lowest: {describe(b)} ({name} = {b['value']:.4f} ± "
             f"{b.get('metrics', {}).get(se, float('nan')):.2g}, one bootstrap standard error). {summary['decision']}.")
    return rep.write(out)
