"""The experiment's report: ``report.md`` (assets in ``report/``) in the run directory, and with
``--publish DIR`` ``DIR/RESULTS.md`` (assets in ``DIR/results/``). Both come from ``summary.json``
and the kept samples. A hand-written reading between ``<!-- reading -->`` and ``<!-- /reading -->``
in an existing file is kept when the file is written again."""

from __future__ import annotations

import functools
import json
import math
import re
import time
from pathlib import Path

import torch

from cdm.files import atomic_write
from cdm.data import DataConfig, to_float
from cdm.eval.ledger import load_samples
from cdm.eval.reference import ReferenceSpec, load_reference
from cdm.eval.report import line_plot_svg
from cdm.eval.sweep import ground_truth_inputs
from cdm.images import make_grid
from cdm.metrics import consistency_psnr

from .checks import claims
from .run import best, condition, main_points

READING_OPEN, READING_CLOSE = "<!-- reading -->", "<!-- /reading -->"
READING_PLACEHOLDER = ("_Not written yet: after the full run, say here what the numbers show about the paper's "
                       "claims, and how far to trust them. This text survives re-publishing._")
ROW_NAMES = {"single": "single-stage {hi}×{hi}", "sr-none": "cascade, no augmentation",
             "sr-gaussian": "cascade, Gaussian augmentation", "sr-blur": "cascade, blur augmentation",
             "real": "real data"}


# ----------------------------------------------------------------------------- formatting
def _row_name(row: str, profile: dict) -> str:
    return ROW_NAMES.get(row, f"diagnostic variant {row}").format(hi=_scale(profile)[1])


def _scale(profile: dict) -> tuple[int, int]:
    """The study's base and final resolution (a summary written before profiles had them: 8 and 32)."""
    return profile.get("base_resolution", 8), profile.get("resolution", 32)


def _f(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _fid(r: dict | None) -> str:
    if r is None:
        return "—"
    m = r.get("metrics", {})
    return f"{m['fid']:.3g} ± {m['fid_se']:.2g}" if "fid_se" in m else _f(r["value"])


def _table(header: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]) + "\n"


def _flops(v: int | None) -> str:
    return "—" if v is None else f"{v / 1e12:.1f} TFLOP" if v >= 1e11 else f"{v / 1e9:.3g} GFLOP"


def _dur(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def _reading(path: Path) -> str:
    """The hand-written reading of an existing report (markers included), else a placeholder."""
    if path.exists():
        m = re.search(re.escape(READING_OPEN) + r".*?" + re.escape(READING_CLOSE), path.read_text(), re.S)
        if m:
            return m.group(0)
    return f"{READING_OPEN}\n{READING_PLACEHOLDER}\n{READING_CLOSE}"


# ----------------------------------------------------------------------------- assets
def _grid(images: torch.Tensor) -> bytes:
    """A PNG of up to 40 uint8 images ``[N, 1, 32, 32]``, 10 per row, enlarged twice."""
    import io

    from PIL import Image

    g = make_grid(to_float(images[:40]), nrow=10)
    g = g.repeat_interleave(2, 1).repeat_interleave(2, 2)
    buf = io.BytesIO()
    Image.fromarray(g[0].numpy()).save(buf, format="PNG")
    return buf.getvalue()


def _real_grid(data: DataConfig) -> bytes:
    real = load_reference(data, ReferenceSpec(split="test", n=0))  # in the data set's order
    pick = torch.cat([torch.nonzero(real.labels == c).flatten()[:4] for c in range(10)])
    order = pick.view(10, 4).T.flatten()  # row r: the r-th image of every class
    return _grid(real.images[order])


def _plots(points: list[dict], metric: str, label: str) -> str:
    gauss = [r for r in points if r["row"] == "sr-gaussian"]
    series: dict[str, list[tuple[float, float]]] = {}
    for cond in ("truncated", "non-truncated", "ground-truth"):
        series[cond] = [(r["level"], r["metrics"].get(metric, float("nan"))) for r in gauss if condition(r) == cond]
    ref = {}
    for key, cond, name in (("single", "single-stage", "single-stage"),
                            ("sr-none", "non-truncated", "no aug (generated)"),
                            ("sr-none", "ground-truth", "no aug (ground truth)")):
        r = next((r for r in points if r["row"] == key and condition(r) == cond), None)
        if r is not None and metric in r["metrics"]:
            ref[name] = r["metrics"][metric]
    return line_plot_svg(series, "augmentation level s", label,
                         f"Gaussian augmentation: {label} against s (lower is better)", width=640, height=380,
                         hlines=ref)


def assets(summary: dict, out: Path) -> dict[str, bytes]:
    """Plots (SVG) and sample grids (PNG) of the report, by file name."""
    pts = summary["points"]
    files = {"fid-vs-s.svg": _plots(pts, "fid", "classifier FID").encode()}
    if any("inception_fid" in r["metrics"] for r in pts):
        files["inception-fid-vs-s.svg"] = _plots(pts, "inception_fid", "Inception FID").encode()
    for r in main_points(pts) + _variant_points(summary):
        z = load_samples(out / "points" / r["samples"])
        if z is not None:
            files[f"samples-{r['row']}-{condition(r)}-s{r['level']}.png"] = _grid(z["images"])
    files["samples-real.png"] = _real_grid(DataConfig(**summary["data"]))
    return files


# ----------------------------------------------------------------------------- the markdown
def render(summary: dict, prefix: str, reading: str, out: Path) -> str:
    """The report's Markdown; assets are referred to as ``prefix + name``; ``out``: the run directory."""
    p, inv = summary["profile"], summary["timings"]["invocations"]
    lo, hi = _scale(p)
    head = [f"# Conditioning augmentation on Fashion-MNIST {lo}×{lo} → {hi}×{hi}: a reproduction\n", reading + "\n",
            f"Profile **{p['name']}** ({p['about']}). Written {time.strftime('%Y-%m-%d %H:%M')}; total wall time "
            f"{_dur(summary['total_seconds'])} over {len(inv)} invocation(s). Every cascade row shares one base "
            f"stage; sampling: {p['sampler']}, {p['sample_steps']} steps per stage, {p['spacing']} time grid.\n"]
    sections = (_main_section(summary), _claims_section(summary["points"]), _sweep_section(summary["points"], prefix),
                _diagnostics_section(summary, out), _samples_section(summary, prefix), _training_section(summary),
                _time_section(summary))
    return "\n".join(head + [line for sec in sections for line in sec])


def _main_section(summary: dict) -> list[str]:
    p, plan, tasks = summary["profile"], summary["plan"], summary["timings"]["tasks"]
    lo, _ = _scale(p)
    cas = {(c["row"], c.get("condition"), c.get("level")): c for c in summary["cas"]}
    rows = []
    for r in _main_table_points(summary["points"]):
        key = r["row"]
        c = cas.get((key, condition(r), r["level"]))
        train_s = sum(tasks.get(f"train {k}", 0.0) for k in (("single",) if key == "single" else ("base", key)))
        rows.append([_row_name(key, p), condition(r), r["level"], _fid(r), r["metrics"].get("kid"),
                     r["metrics"].get("inception_fid"), None if c is None else f"{c['top1']:.1f}%",
                     _flops(plan[key]["row_flops"]), _dur(train_s)])
    real = cas.get(("real", "real train images", None))
    if real:
        rows.append(["real data (train split)", *["—"] * 5, f"{real['top1']:.1f}%", "—", "—"])
    test = f"{p['cas_test_limit']} (class-stratified)" if p["cas_test_limit"] else "the 10,000"
    only = "" if p["inception_rows"] is None else f" (only for rows {', '.join(p['inception_rows'])})"
    return ["## Main results\n",
            _table(["row", "condition", "s", "classifier FID ± SE", "KID", "Inception FID", "CAS top-1",
                    "training FLOPs", "training wall time"], rows),
            f"Classifier FID and KID: {p['n']} samples against {p['n_ref']} real test images in the domain "
            f"classifier's {summary['classifier']['feature_dim']}-d feature space (the classifier's test top-1: "
            f"{summary['classifier']['top1']:.1f}%); ± is the bootstrap standard error over the generated samples "
            f"({p['bootstrap']} resamples, the reference held fixed). Inception FID: the first {p['n_incep']} "
            f"samples against {p['n_incep_ref']} real test images in the FID-Inception space{only}: biased "
            f"upwards at this size and far from Inception's domain, so compare rows, not papers. CAS: the "
            f"classifier recipe trained on the {p['n']} samples with their conditioning labels, tested on {test} "
            f"real test images, against the same recipe on {p['n']} real train images. Best s: the lowest "
            f"classifier FID of that condition. Training FLOPs: counted forward + backward FLOPs per example "
            f"(`cdm.flops`) × steps × batch, base + SR stage for the cascades. Ground-truth conditioning: real {lo}×{lo} "
            f"inputs made from a seeded subset of {p['n']} *train*-split images (with their labels), downsampled "
            f"exactly as in training and corrupted by the forward process at s; the train split keeps them out of "
            f"the test-split reference.\n"]


def _claims_section(pts: list[dict]) -> list[str]:
    return ["## The paper's claims, checked mechanically\n",
            _table(["claim (paper: ImageNet 16→64)", "here", "verdict"], [list(c) for c in claims(pts)]),
            "A difference counts when it exceeds twice the combined bootstrap standard error; otherwise the "
            "verdict is *not resolved*. The SE covers the generated set's sampling noise only, not the training "
            "run's (another seed trains other stages).\n"]


def _sweep_section(pts: list[dict], prefix: str) -> list[str]:
    out = ["## Sweep over the augmentation level s (Gaussian augmentation)\n", *_sweep_tables(pts),
           f"![classifier FID against s]({prefix}fid-vs-s.svg)\n"]
    if any("inception_fid" in r["metrics"] for r in pts):
        out.append(f"![Inception FID against s]({prefix}inception-fid-vs-s.svg)\n")
    out.append("Truncated: the base stage stops at s and hands over its z_s; non-truncated: the base runs to z_0, "
               "which is corrupted to z_s by the forward process; ground-truth: a real z_0 corrupted the same way. "
               "At s = 0 truncated and non-truncated are the same samples (a check). Dashed lines: the "
               "single-stage model and the cascade without augmentation.\n")
    return out


def _diagnostics_section(summary: dict, out: Path) -> list[str]:
    """Variants of the SR stages (``--diagnostics``) beside the no-augmentation and the shipped
    Gaussian stage, at the variants' levels."""
    variants = summary.get("diagnostics") or []
    if not variants:
        return []
    lo, _ = _scale(summary["profile"])
    pts, plan, tasks = summary["points"], summary["plan"], summary["timings"]["tasks"]
    levels = sorted({lv for v in variants for lv in v["levels"]})
    conds = ("non-truncated", "ground-truth")
    # a single stage's samples go in the generated column
    at = {(r["row"], "non-truncated" if condition(r) == "single-stage" else condition(r), r["level"]): r for r in pts}
    rows = []
    for key, about in (("single", "the FLOP-matched single stage (its samples under generated)"),
                       ("sr-none", "no augmentation"), ("sr-gaussian", "as shipped (the sweep above)"),
                       *((v["key"], v["about"]) for v in variants)):
        if key not in plan:
            continue
        border = [at.get((key, c, 0)) for c in conds]
        border = [None if r is None else _border_noise(out / "points" / r["samples"], summary["data"]) for r in border]
        gt0 = at.get((key, "ground-truth", 0))
        rows.append([key, about, f"{plan[key]['steps']} × {plan[key]['batch_size']}", _flops(plan[key]["row_flops"]),
                     _dur(tasks.get(f"train {key}")),
                     *(_fid(at.get((key, c, s))) for c in conds for s in levels),
                     " / ".join("—" if b is None else f"{100 * b:.1f}%" for b in border),
                     None if gt0 is None else _consistency(out / "points" / gt0["samples"], summary)])
    return ["## Diagnostics: variants of the SR stages\n",
            _table(["stage", "what differs", "steps × batch", "training FLOPs (row)", "training wall time",
                    *(f"{'generated' if c == 'non-truncated' else 'ground truth'} s = {s}" for c in conds
                      for s in levels), "background noise at s = 0 (generated / ground truth)",
                    "consistency PSNR at s = 0 (ground truth)"], rows),
            "Classifier FID ± SE, scored as the main rows (same base samples, same ground-truth inputs); "
            "generated inputs are non-truncated. Each variant is a shipped SR stage with one change (the "
            "*what differs* column), trained from scratch. Background noise: the fraction of pixels in the "
            "border that padding 28×28 to the study's size adds which are brighter than 16/255 (black, 0%, in "
            f"every real image; — where the data are resized rather than padded). Consistency PSNR: the samples "
            f"downsampled to {lo}×{lo} against the real {lo}×{lo} inputs they were conditioned on, in dB (higher: the stage follows its input more faithfully). Made with "
            "`--diagnostics`.\n"]


@functools.lru_cache(maxsize=2)
def _ground_truth(data_json: str, n: int, resolution: int, seed: int):
    """The experiment's ground-truth inputs (:func:`cdm.eval.sweep.ground_truth_inputs`), loaded once."""
    return ground_truth_inputs(DataConfig(**json.loads(data_json)), "train", n, resolution, seed)


def _consistency(path: Path, summary: dict) -> str | None:
    """Consistency PSNR (dB) of a ground-truth-conditioned point's samples with their low-resolution inputs."""
    z = load_samples(path)
    if z is None:
        return None
    p, sr = summary["profile"], summary["plan"]["sr-gaussian"]
    lowres, labels = _ground_truth(json.dumps(summary["data"], sort_keys=True), p["n"], sr["lowres_resolution"],
                                   p["seed"])
    if not torch.equal(z["labels"], labels):
        return None  # not the inputs this point was conditioned on
    x = to_float(z["images"])
    return f"{consistency_psnr(x, lowres):.1f} dB"


def _border_noise(path: Path, data: dict) -> float | None:
    """The fraction of border pixels (outside the central 28×28 that padding keeps; ``data``: the
    study's :class:`DataConfig` as a dict) above 16/255 in a point's samples; None for resized data."""
    z = load_samples(path) if data.get("fit", "pad") == "pad" else None
    if z is None:
        return None
    x = z["images"]
    w = (x.shape[-1] - 28) // 2
    inner = torch.zeros(x.shape[-2:], dtype=torch.bool)
    inner[w:-w, w:-w] = True
    return (x[..., ~inner] > 16).float().mean().item()


def _variant_points(summary: dict) -> list[dict]:
    """The best point with generated inputs (or the samples of a single stage) of each diagnostic variant."""
    picks = [best(summary["points"], v["key"], "single-stage" if v["row"] == "single" else "non-truncated")
             for v in summary.get("diagnostics") or []]
    return [r for r in picks if r is not None]


def _samples_section(summary: dict, prefix: str) -> list[str]:
    out = ["## Samples\n"]
    for r in main_points(summary["points"]) + _variant_points(summary):
        name = _row_name(r["row"], summary["profile"])
        out.append(f"**{name}, {condition(r)}, s = {r['level']}** (first 40 samples; column = "
                   f"class)\n\n![samples]({prefix}samples-{r['row']}-{condition(r)}-s{r['level']}.png)\n")
    return out + [f"**Real test images** (4 per class)\n\n![real images]({prefix}samples-real.png)\n"]


def _training_section(summary: dict) -> list[str]:
    plan, tasks = summary["plan"], summary["timings"]["tasks"]
    rows = [[k, v["name"], f"{v['lowres_resolution']}→{v['resolution']}" if v["lowres_resolution"]
             else f"{v['resolution']}", v["augment"], f"{v['steps']} × {v['batch_size']}", f"{v['params']:,}",
             f"{v['flops_per_image'] / 1e6:.0f} M", _flops(v["train_flops"]), _dur(tasks.get(f"train {k}"))]
            for k, v in plan.items()]
    single = plan["single"]
    return ["## Training\n",
            _table(["stage", "config", "resolution", "augmentation", "steps × batch", "parameters",
                    "FLOPs / example", "training FLOPs", "wall time"], rows),
            f"The single stage has the SR stage's U-Net without the low-resolution input and is trained for "
            f"{single['steps']} steps so that its training FLOPs ({_flops(single['train_flops'])}) match the base "
            f"plus one SR stage ({_flops(plan['sr-gaussian']['row_flops'])}). Wall time includes the periodic "
            f"sample grids; a resumed stage counts only the time spent in each invocation.\n"]


def _time_section(summary: dict) -> list[str]:
    tasks, pts = summary["timings"]["tasks"], summary["points"]
    sample_s, score_s = (sum(r.get(k) or 0.0 for r in pts) for k in ("sample_s", "score_s"))
    out = ["## Wall time, machine and commands\n",
           _table(["task", "wall time"], [[k, _dur(v)] for k, v in tasks.items()]
                  + [["**total**", _dur(summary["total_seconds"])]]),
           f"A task is timed when it ends: one killed midway (an interrupted invocation) is missing from the "
           f"table and from its invocation's time. The per-point times kept with every scored point do not "
           f"have that gap: {len(pts)} points, {_dur(sample_s)} of sampling (SR stages and single stages; the "
           f"shared base samples are drawn once per mode and level) and {_dur(score_s)} of scoring.\n"]
    for i in summary["timings"]["invocations"]:
        m = i["machine"]
        out.append(f"- `{i['command']}` — {i['started']}, {_dur(i['seconds'])}"
                   f"{'' if i['finished'] else ' (interrupted)'}; {m['cpu']}, {m['cores']} cores, "
                   f"torch {m['torch']}, {m['threads']} threads (OMP_NUM_THREADS={m['OMP_NUM_THREADS']}), "
                   f"device {m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}\n")
    out.append("\nPer-point times (sampling and scoring) are in `points/results.jsonl` (`sample_s`, `score_s`). "
               "To reproduce: `make repro` (the cpu profile, publishing into docs/), or the commands above; "
               "re-running a command resumes it.\n")
    return out


def _main_table_points(pts: list[dict]) -> list[dict]:
    picks = [best(pts, "single", "single-stage"), best(pts, "sr-none", "non-truncated"),
             best(pts, "sr-gaussian", "truncated"), best(pts, "sr-gaussian", "non-truncated"),
             best(pts, "sr-blur", "non-truncated"), best(pts, "sr-none", "ground-truth"),
             best(pts, "sr-gaussian", "ground-truth"), best(pts, "sr-blur", "ground-truth")]
    return [r for r in picks if r is not None]


def _sweep_tables(pts: list[dict]) -> list[str]:
    gauss = {(condition(r), r["level"]): r for r in pts if r["row"] == "sr-gaussian"}
    levels = sorted({lv for _, lv in gauss})
    conds = ("truncated", "non-truncated", "ground-truth")
    out = ["Classifier FID ± bootstrap SE:\n",
           _table(["s", *conds], [[s, *(_fid(gauss.get((c, s))) for c in conds)] for s in levels])]
    if any("inception_fid" in r["metrics"] for r in gauss.values()):
        out += ["Inception FID:\n", _table(["s", *conds], [
            [s, *(gauss[(c, s)]["metrics"].get("inception_fid") if (c, s) in gauss else None for c in conds)]
            for s in levels])]
    out += ["KID (classifier space):\n", _table(["s", *conds], [
        [s, *(gauss[(c, s)]["metrics"].get("kid") if (c, s) in gauss else None for c in conds)] for s in levels])]
    return out


def write_report(summary: dict, out: Path, target: Path, asset_dir: Path, prefix: str) -> Path:
    """Write ``target`` (Markdown) and its assets into ``asset_dir``, keeping ``target``'s reading."""
    for name, data in assets(summary, out).items():
        atomic_write(asset_dir / name, lambda tmp, d=data: Path(tmp).write_bytes(d))
    text = render(summary, prefix, _reading(target), out)
    atomic_write(target, lambda tmp: Path(tmp).write_text(text))
    return target
