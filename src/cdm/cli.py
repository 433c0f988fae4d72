"""The ``cdm`` command line. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings

from .config import PRECISIONS, ConfigError, list_presets, load_stage_config, preset_description, to_dict
from .diffusion import Spacing
from .distributed import is_device_name
from .errors import USER_ERRORS, OneLineParser, os_error_message, warning_line
from .samplers import SAMPLERS

def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _classes(text: str) -> list[int | str]:
    """``7,8`` or ``sneaker,bag`` (or both): integers are class indices, the rest class names, which
    the library resolves against the cascade's (:func:`cdm.generate.resolve_classes`)."""
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated class names or indices, got {text!r}")
    return [int(v) if v.lstrip("-").isdigit() else v for v in items]


def _checked(cast, ok, want: str):
    """An argparse type: ``cast(text)``, refused with one message unless ``ok`` of it holds."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return v
    return parse


_positive = _checked(int, lambda v: v >= 1, "an integer >= 1")
_positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_seed = _checked(int, lambda v: 0 <= v < 2 ** 63, "an integer seed in [0, 2^63)")
_spaces = _checked(lambda t: [v for v in t.split(",") if v], lambda v: v and set(v) <= {"classifier", "inception"},
                   "feature spaces, comma-separated: classifier, inception")
_device = _checked(str, is_device_name, "auto, cpu, cuda, cuda:N, mps or xpu")


def cmd_train(a: argparse.Namespace) -> int:
    from .train import InitFrom, train_stage

    if a.init_weights and not a.init:
        raise ConfigError("--init-weights picks the weights --init takes: pass --init RUN_OR_CHECKPOINT too")
    flags = [f"train.{k}={getattr(a, k)}" for k in ("device", "seed") if getattr(a, k) is not None]
    cfg = load_stage_config(a.config, a.set + flags)
    if a.dry_run or a.measure:
        from .plan import format_plan, measure_throughput, resolve_for_plan, training_plan

        cfg, data, note = resolve_for_plan(cfg)
        plan = training_plan(cfg, processes=a.gpus, data=data)
        rate = measure_throughput(cfg, a.measure, batch_size=plan.batch_size) if a.measure else None
        print(format_plan(plan, gpu_tflops=a.gpu_tflops, measured_img_s=rate), file=sys.stderr)
        if note:
            print(f"  note: {note}", file=sys.stderr)
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    init = InitFrom(a.init, a.init_weights or "ema") if a.init else None
    last = train_stage(cfg, a.out, fresh=a.fresh, progress=not a.no_progress, init=init)
    print(f"checkpoint: {last}")
    return 0


def _plan(a: argparse.Namespace):
    """(checkpoint files, sampling plan) from --cascade or --stage, with the plan flags applied."""
    from .cascade_file import resolve_cascade

    paths, plan = resolve_cascade(a.cascade, a.stage)
    return paths, plan.override(**{k: getattr(a, k) for k in a.plan_flags})


def cmd_sample(a: argparse.Namespace) -> int:
    from .shards import SampleRequest, sample_run

    paths, plan = _plan(a)
    req = SampleRequest(n=a.n, classes=a.classes, seed=a.seed, batch_size=a.batch_size, device=a.device,
                        precision=a.precision, num_shards=a.num_shards, shard=a.shard, progress=not a.no_progress)
    r = sample_run(paths, plan, req, a.out)
    for p in r["written"]:
        print(p)
    if r["missing"]:
        print(f"{len(r['missing'])} shards still to sample; 'cdm merge {a.out}' once all are done")
    elif r["samples"]:
        print(r["samples"])
    print(f"cascade file: {r['cascade']}")
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from .shards import merge_run

    print(merge_run(a.out))
    return 0


def _reference(a: argparse.Namespace, n_default: int | None = None):
    from .eval.reference import ReferenceSpec

    return ReferenceSpec(split=a.split, n=a.n_ref if n_default is None else n_default, seed=a.ref_seed,
                         path=a.reference or "")


def cmd_nll(a: argparse.Namespace) -> int:
    from .eval.likelihood import NllConfig, evaluate_nll

    paths, plan = _plan(a)
    mode = a.mode or ("truncated" if a.stage else None)  # the paper's bound, unless the cascade file says
    cfg = NllConfig(reference=_reference(a, a.n), levels=a.level, mode=mode, t_samples=a.t_samples, seed=a.seed,
                    batch_size=a.batch_size, device=a.device, progress=not a.no_progress)
    r = evaluate_nll(paths, plan, cfg, a.out)
    print(r["table"], end="")
    for p in r["written"]:
        print(p)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    s = run_demo(a.out, scale=a.scale, progress=not a.no_progress, device=a.device, seed=a.seed)
    print(json.dumps({"grids": s["grids"], "cascade": s["cascade"], "timings": s["timings"]}, indent=2))
    return 0


def cmd_train_classifier(a: argparse.Namespace) -> int:
    from .config import from_dict, parse_overrides
    from .eval.classifier import ClassifierConfig, train_domain_classifier

    data = load_stage_config(a.data_from, [f"data.{kv}" for kv in a.data]).data
    cfg = from_dict(ClassifierConfig, parse_overrides(a.set + ([f"seed={a.seed}"] if a.seed is not None else [])),
                    prefix="")
    s = train_domain_classifier(data, a.out, cfg, progress=not a.no_progress)
    print(f"classifier: {s['path']}  held-out top-1 {s['test']['top1']:.2f}% ({s['test_n']} images)")
    return 0


def _eval_config(a: argparse.Namespace, features: list[str]):
    from .eval.quality import EvalConfig

    return EvalConfig(features=features, classifier=a.classifier or "", reference=_reference(a), n=a.n,
                      seed=a.seed, batch_size=a.batch_size, device=a.device, precision=a.precision,
                      progress=not a.no_progress)


def cmd_eval(a: argparse.Namespace) -> int:
    from .eval.classifier import ClassifierConfig
    from .eval.compare import compare_cascades
    from .eval.quality import evaluate_cascade, score_line

    if a.compare:
        if a.cascade or a.stage or a.samples:
            raise ConfigError("--compare A B samples both cascades now: drop --cascade, --stage and --samples")
        r = compare_cascades(*a.compare, _eval_config(a, a.features), a.out, {k: getattr(a, k) for k in a.plan_flags})
        print("\n".join(r["lines"]) + f"\nreport: {a.out.rstrip('/')}/report.html")
        return 0
    paths, plan = _plan(a)
    r = evaluate_cascade(paths, plan, _eval_config(a, a.features), a.out, samples=a.samples,
                         per_stage=not a.no_per_stage, cas=ClassifierConfig(epochs=a.cas_epochs) if a.cas else None)
    for row in r["scores"]:
        print(score_line(row))
    if r["cas"]:
        print(f"CAS top-1 {r['cas']['generated']['top1']:.2f}%"
              + (f" (real data: {r['cas']['real']['top1']:.2f}%)" if "real" in r["cas"] else ""))
    print(f"reference: {r['reference']}")
    print(f"report: {a.out.rstrip('/')}/report.html")
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    from .eval.sweep import SweepConfig, describe, sweep_cascade

    paths, plan = _plan(a)
    cfg = SweepConfig(stage=a.stage_index, levels=a.levels, modes=a.modes, conditioning=a.conditioning,
                      ground_truth_split=a.ground_truth_split, n=a.n, seed=a.seed, batch_size=a.batch_size,
                      keep_samples=a.keep_samples, metric=a.metric, write_best=not a.no_write, weights=a.weights)
    s = sweep_cascade(paths, plan, a.out, cfg, _eval_config(a, a.feature), cascade_file=a.cascade,
                      log=(lambda *_: None) if a.no_progress else print)
    b = s["best"]
    se = b.get("metrics", {}).get(f"{a.metric}_se", float("nan"))
    print(f"lowest: {describe(b)}: {s['metric']} = {b['value']:.4f} ± {se:.2g}")
    print(s["decision"])
    print(f"report: {a.out.rstrip('/')}/report.html")
    return 0


def cmd_ema(a: argparse.Namespace) -> int:
    from .ema import export_posthoc

    for path, info in export_posthoc(a.run, a.sigma_rel, a.out, a.step):
        print(f"{path}  (post-hoc EMA sigma_rel={info['sigma_rel']} at step {info['step']}, "
              f"from {len(info['profiles'])} stored profiles)")
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_distill(a: argparse.Namespace) -> int:
    from .distill import DistillConfig, distill_stage, sampling_plan

    cfg = DistillConfig(start_steps=a.from_steps, final_steps=a.steps, iters=a.iters, batch_size=a.batch_size,
                        lr=a.lr, seed=a.seed, device=a.device, progress=not a.no_progress)
    path = distill_stage(a.teacher, cfg, a.out, fresh=a.fresh)
    plan = sampling_plan(a.steps)
    print(f"checkpoint: {path}")
    print(f"sample this stage with --sampler {plan.sampler} --spacing {plan.spacing} and {plan.steps} steps for it "
          f"(its cascade-file plan: {json.dumps(to_dict(plan))})")
    return 0


def cmd_prepare(a: argparse.Namespace) -> int:
    from .prepare import PrepareConfig, describe, prepare

    ps = prepare(PrepareConfig(source=a.source, out=a.out, resolution=a.resolution, fit=a.fit, channels=a.channels,
                               on_bad=a.on_bad, workers=a.workers, progress=not a.no_progress))
    print(describe(ps))
    print(f"train on it: --set data.source=prepared --set data.path={ps.path} --set data.resolution={a.resolution}")
    return 0


def cmd_presets(a: argparse.Namespace) -> int:
    names = list_presets()
    width = max(map(len, names))
    for p in names:
        print(f"{p:<{width}}  {preset_description(p)}")
    return 0


PLAN_FLAGS = ("steps", "levels", "mode", "sampler", "spacing", "guidance", "guidance_interval", "threshold", "churn",
              "churn_interval", "start")


def _common(p: argparse.ArgumentParser, seed: str = "", *, progress: bool = True, device: bool = True,
            from_config: bool = False) -> None:
    """The flags every command that does the work they name takes, each with one meaning: --no-progress
    (no progress bar), --device and --seed (``seed`` says what it seeds; "": no --seed). With
    ``from_config`` they default to None: the config's own (train.device, train.seed) then stands."""
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    if device:
        p.add_argument("--device", type=_device, default=None if from_config else "auto",
                       help="auto" + (" (the config's train.device by default)" if from_config else " (default)")
                            + ": cuda:LOCAL_RANK if CUDA is available, else cpu; or cpu, cuda, cuda:N, mps")
    if seed:
        p.add_argument("--seed", type=_seed, default=None if from_config else 0, help=seed)


def _add_cascade_args(p: argparse.ArgumentParser, plan_flags: tuple[str, ...] = PLAN_FLAGS) -> None:
    p.add_argument("--cascade", help="cascade file (JSON, see the README's 'Cascade files') naming the stage "
                                     "checkpoints and the sampling plan")
    p.add_argument("--stage", action="append", default=[], metavar="CHECKPOINT",
                   help="a stage checkpoint or run directory, base first (repeat per stage)")
    p.add_argument("--precision", choices=list(PRECISIONS),
                   help="network precision while sampling (default: what each stage was trained with, auto for "
                        "the presets: bf16 autocast where the device computes bf16 natively, else fp32)")
    flags = {
        "steps": dict(type=_ints, help="sampler steps, one value or one per stage (e.g. 10,6; default: the cascade "
                                       "file's, else 6 per stage)"),
        "levels": dict(type=_ints, help="augmentation level s per stage, 0 for the base (e.g. 0,250)"),
        "mode": dict(choices=["truncated", "non-truncated"], help="how SR stages get their input"),
        "sampler": dict(choices=list(SAMPLERS),
                        help="reverse-process sampler of every stage (default: the cascade file's, else dpmpp-2m)"),
        "spacing": dict(choices=[sp.value for sp in Spacing],
                        help="time-grid spacing of every stage (default: the cascade file's, else edm): "
                             "uniform in t, quadratic (DDIM's), logsnr (DPM-Solver's) or edm (Karras et al.'s)"),
        "guidance": dict(type=_floats, help="classifier-free guidance weight w, one value or one per stage: the "
                                            "prediction is (1 + w) cond - w uncond, so 0 is unguided (Imagen's "
                                            "scale is 1 + w); needs stages trained with train.p_uncond > 0"),
        "guidance_interval": dict(type=_floats, metavar="LO,HI",
                                  help="guide only where LO <= t/T <= HI (default 0,1: every step)"),
        "threshold": dict(choices=["static", "dynamic", "none"],
                          help="the x0 estimate: static clips to [-1, 1] (default), dynamic is Imagen's "
                               "(for high guidance weights), none leaves it"),
        "churn": dict(type=float, help="EDM's stochastic churn S_churn for the deterministic samplers (ddim, "
                                       "dpmpp-2m): fresh noise before each step, gamma = S_churn / steps "
                                       "(default 0: none)"),
        "churn_interval": dict(type=_floats, metavar="LO,HI", help="churn only where LO <= t/T <= HI (default 0,1)"),
        "start": dict(type=_floats, metavar="F,F,...",
                      help="one per stage, 1 for the base: an SR stage with F < 1 starts its reverse process at "
                           "t = F*T from its upsampled input noised to that level, not from pure noise at T "
                           "(non-truncated mode; default 1)")}
    for name in plan_flags:
        p.add_argument(f"--{name.replace('_', '-')}", **flags[name])
    p.set_defaults(plan_flags=plan_flags)


def _add_reference_args(p: argparse.ArgumentParser, n_ref: bool = True) -> None:
    p.add_argument("--split", choices=["test", "train", "all"], default="test",
                   help="split of the stages' data set to compare with (default test: Fashion-MNIST's test set; "
                        "for a folder or .npz the held-out part training never reads, see data.held_out)")
    p.add_argument("--reference", metavar="PATH",
                   help="compare with these real images instead (a folder of class sub-folders, or an .npz)")
    if n_ref:
        p.add_argument("--n-ref", type=_positive, default=10000,
                       help="reference images: a random class-stratified subset of this many (default 10000)")
    p.add_argument("--ref-seed", type=_seed, default=0, help="seed of the reference subset (default 0)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="cdm", description="Cascaded diffusion models with conditioning augmentation.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one stage of a cascade",
                       description="Train (or resume) one stage. CONFIG is a preset (cdm presets: "
                                   f"{', '.join(list_presets())}), a .toml/.json file, or a run directory (or its "
                                   "config.json), whose derived keys are filled in again.")
    t.add_argument("config", help="preset, config file, or run directory")
    t.add_argument("--out", required=True, help="run directory (resumed if it holds checkpoints)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 (repeatable)")
    t.add_argument("--fresh", action="store_true", help="discard the run directory's checkpoints and start over")
    t.add_argument("--init", metavar="RUN_OR_CHECKPOINT",
                   help="fine-tune: start a fresh run from these weights (a run directory's newest intact checkpoint, "
                        "or a checkpoint file) at step 0 with a fresh optimiser; a run directory that has its own "
                        "checkpoints resumes from them instead (with --fresh it starts over from these weights)")
    t.add_argument("--init-weights", choices=["ema", "raw"],
                   help="which weights --init takes: ema (default) or raw (the trained network's)")
    t.add_argument("--dry-run", action="store_true",
                   help="print the plan (parameters, FLOPs, estimated peak memory, GPU time) to stderr and the "
                        "resolved config to stdout, and exit")
    t.add_argument("--measure", type=_positive, default=0, metavar="N",
                   help="with the plan, time N training steps (synthetic inputs, on train.device, at the batch per "
                        "process) and print img/s; trains nothing")
    t.add_argument("--gpus", type=_positive, default=1, metavar="N",
                   help="plan for N processes/GPUs: memory per process at train.batch_size / N, hours on N GPUs")
    t.add_argument("--gpu-tflops", type=_positive_float, metavar="X",
                   help="achieved TFLOP/s per GPU for the plan's GPU-hours (default 124.8: 40%% of an A100's "
                        "bf16 peak)")
    _common(t, "train.seed: the initial weights, batches and noise (default: the config's)", from_config=True)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="sample a cascade and write grids and an .npz")
    _add_cascade_args(s)
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--n", "--num-samples", dest="n", type=_positive, default=100,
                   help="number of samples (default 100); under torchrun write --num-samples")
    s.add_argument("--classes", type=_classes, metavar="C,C,...",
                   help="classes to cycle through, by name or index: e.g. sneaker,bag or 7,8 (default: all "
                        "classes; an unknown name lists the valid ones)")
    _common(s, "sample j uses seed SEED + j (default 0)")
    s.add_argument("--batch-size", type=_positive, default=64)
    s.add_argument("--num-shards", type=_positive, metavar="K",
                   help="split the run into K shards (shard-XXXX.npz + manifest.json in --out), resumable; "
                        "merged into samples.npz when all are done. Under torchrun: default K = world size, "
                        "and rank r samples shards r, r + world size, ...")
    s.add_argument("--shard", type=int, metavar="I", help="sample only shard I of --num-shards K")
    s.set_defaults(func=cmd_sample)

    m = sub.add_parser("merge", help="merge a sharded sample run's shards into samples.npz")
    m.add_argument("out", help="the sharded run's directory (the --out of 'cdm sample --num-shards')")
    m.set_defaults(func=cmd_merge)

    n = sub.add_parser("nll", help="the cascade's variational bound on -log p(x) in bits per dimension",
                       description="Evaluate the cascade's likelihood bound (docs/METHOD.md section 3) on real "
                                   "images: per stage and in total, in bits per dimension, with standard errors.")
    _add_cascade_args(n, plan_flags=())
    n.add_argument("--out", required=True, help="output directory (nll.json, nll.md)")
    n.add_argument("--level", type=_ints, help="augmentation level s: one value for every SR stage, or one per "
                                                "stage with 0 for the base (e.g. 0,250); default: the cascade "
                                                "file's levels, else 0")
    n.add_argument("--mode", choices=["truncated", "non-truncated"],
                   help="truncated: SR stages conditioned on the lower stage's forward-process z_s (docs/METHOD.md "
                        "section 3); non-truncated: every stage's full bound, SR stages on the augmented z_0 "
                        "(default: the cascade file's mode, else truncated)")
    n.add_argument("--n", type=_positive, default=1000,
                   help="number of images: a random class-stratified subset (default 1000)")
    _add_reference_args(n, n_ref=False)
    n.add_argument("--t-samples", type=_positive, metavar="K",
                   help="Monte-Carlo estimate with K uniform t per image and stage (default: the exact sum "
                        "over all T terms, T network calls per stage)")
    _common(n, "image j uses seed SEED + j (default 0)")
    n.add_argument("--batch-size", type=_positive, default=64)
    n.set_defaults(func=cmd_nll)

    d = sub.add_parser("demo", help="train and sample the Fashion-MNIST 8->32 cascade (about 20 minutes on 2 CPU cores)")
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo; re-running resumes)")
    d.add_argument("--scale", type=_positive_float, default=1.0,
                   help="multiply the training steps (e.g. 0.01 for a smoke run)")
    _common(d, "train.seed of both stages, and the grid's sample j uses seed SEED + j (default 0)")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("train-classifier", help="train the domain classifier (feature space for FID/KID/PR, and IS)")
    c.add_argument("--out", required=True, help="output directory (classifier.safetensors, report)")
    c.add_argument("--data-from", default="fmnist-sr8to32",
                   help="the preset, config file or run directory whose [data] section to use (default "
                        "fmnist-sr8to32)")
    c.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data setting, e.g. --data source=folder --data path=~/pets")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="classifier setting, e.g. --set epochs=2 (see cdm.eval.classifier.ClassifierConfig)")
    _common(c, "the classifier's initial weights and batches (default: its seed setting, 0)", device=False,
            from_config=True)
    c.set_defaults(func=cmd_train_classifier)

    e = sub.add_parser("eval", help="FID, KID, IS, precision/recall, per-stage checks and CAS of a cascade")
    _add_cascade_args(e)
    e.add_argument("--out", required=True, help="output directory (results.json, report.html, report.md)")
    e.add_argument("--n", type=_positive, default=1000, help="samples to score (default 1000)")
    e.add_argument("--samples", help="score this samples.npz (from cdm sample) instead of sampling now")
    e.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="compare two cascades (each a cascade file, a folder holding cascade.json, or a stage "
                        "checkpoint): same seeds, same reference, a verdict per metric only beyond 2 standard errors")
    e.add_argument("--features", type=_spaces, default=["classifier"],
                   help="feature spaces, comma-separated: classifier, inception (default classifier)")
    e.add_argument("--classifier", help="domain classifier (from cdm train-classifier)")
    _add_reference_args(e)
    e.add_argument("--cas", action="store_true", help="also compute the Classification Accuracy Score")
    e.add_argument("--cas-epochs", type=_positive, default=4)
    e.add_argument("--no-per-stage", action="store_true", help="skip the per-stage checks of SR stages")
    _common(e, "sample j uses seed SEED + j (default 0)")
    e.add_argument("--batch-size", type=_positive, default=250)
    e.set_defaults(func=cmd_eval)

    w = sub.add_parser("sweep", help="search an SR stage's augmentation level s (and guidance weight), or the "
                                     "base stage's guidance weight",
                       description="Score candidate levels s of one SR stage (with --weights: jointly with the "
                                   "guidance weight w; for the base stage, --stage-index 0, w alone), each with a "
                                   "bootstrap error bar. The lowest is written into the cascade file (--cascade; "
                                   "with --stage, OUT/cascade.json) only when it beats the current setting beyond "
                                   "that noise.")
    _add_cascade_args(w, plan_flags=("steps", "sampler", "spacing"))
    w.add_argument("--out", required=True, help="output directory (resumable)")
    w.add_argument("--stage-index", type=int, default=-1,
                   help="the stage to sweep (default: the last; 0, the base stage, searches --weights alone)")
    w.add_argument("--levels", type=_ints, default=[0, 50, 100, 200, 300, 500],
                   help="candidate levels s (default 0,50,100,200,300,500; the current level is always added)")
    w.add_argument("--weights", type=_floats, metavar="W,W,...",
                   help="also search the stage's guidance weight over these, jointly with s for an SR stage "
                        "(e.g. 0,1,2,4; the current weight is always added); default: the plan's weight only")
    w.add_argument("--modes", type=lambda t: [v for v in t.split(",") if v],
                   help="comma-separated: non-truncated, truncated (default: both; ground-truth inputs: "
                        "non-truncated)")
    w.add_argument("--conditioning", choices=["generated", "ground-truth"], default="generated",
                   help="the SR stage's inputs: the stage below's samples (default), or real low-resolution "
                        "images corrupted at s by the forward process (the paper's ablation; no cascade "
                        "file is written)")
    w.add_argument("--ground-truth-split", default="train", choices=["train", "test", "all"],
                   help="split the real low-resolution inputs are drawn from (default train, so that they "
                        "are not the held-out images scored against)")
    w.add_argument("--keep-samples", action="store_true",
                   help="save every candidate's samples (OUT/samples/*.npz, uint8) before scoring them")
    w.add_argument("--n", type=_positive, default=500, help="samples per candidate (default 500)")
    w.add_argument("--feature", default=["classifier"], type=_spaces, metavar="SPACE[,SPACE]",
                   help="the feature space that ranks (classifier, the default, or inception); more, comma-"
                        "separated, are scored beside it on the same samples (e.g. classifier,inception)")
    w.add_argument("--metric", default="fid", choices=["fid", "kid"])
    w.add_argument("--classifier", help="domain classifier (from cdm train-classifier)")
    _add_reference_args(w)
    w.add_argument("--no-write", action="store_true", help="never write a level into a cascade file")
    _common(w, "sample j uses seed SEED + j (default 0)")
    w.add_argument("--batch-size", type=_positive, default=250)
    w.set_defaults(func=cmd_sweep)

    em = sub.add_parser("ema", help="post-hoc EMA: rebuild a run's weight average of any length after training",
                        description="Reconstruct the EMA of relative length SIGMA_REL (EDM2's post-hoc EMA) from "
                                    "the snapshots a run trained with train.ema_profiles wrote, and save it as a "
                                    "stage checkpoint per value (OUT/ema-<sigma_rel>.safetensors) for cdm sample, "
                                    "eval and sweep.")
    em.add_argument("run", help="the run directory (its ema/ snapshots and checkpoints)")
    em.add_argument("--sigma-rel", type=_floats, required=True,
                    help="relative EMA lengths, comma-separated, each in (0, 0.289), e.g. 0.02,0.05,0.1,0.2")
    em.add_argument("--step", type=int, help="reconstruct at this snapshot's step (default: the last)")
    em.add_argument("--out", required=True, help="output directory")
    em.set_defaults(func=cmd_ema)

    di = sub.add_parser("distill", help="progressive distillation: a stage that samples in a few DDIM steps",
                        description="Distil a trained stage (Salimans & Ho 2022): each round trains a student to "
                                    "take in one DDIM step two of its teacher's, halving the steps from --from-steps "
                                    "to --steps. OUT/steps-N/ holds each round's checkpoint (finished rounds are "
                                    "skipped on a re-run); sample the result with ddim, uniform spacing, N steps.")
    di.add_argument("teacher", metavar="TEACHER_RUN_OR_CHECKPOINT", help="the stage to distil (its EMA weights)")
    di.add_argument("--out", required=True, help="output directory (resumable, one round at a time)")
    di.add_argument("--steps", type=_positive, default=4, help="the distilled stage's DDIM steps (default 4)")
    di.add_argument("--from-steps", type=_positive, default=64,
                    help="the teacher's DDIM steps in the first round (default 64; --from-steps / --steps must be a "
                         "power of two)")
    di.add_argument("--iters", type=_positive, default=2000, help="optimiser steps per round (default 2000)")
    di.add_argument("--batch-size", type=_positive, default=64)
    di.add_argument("--lr", type=_positive_float, default=1e-4, help="AdamW learning rate, annealed to 0 each round")
    _common(di, "the students' batches and noise (default 0)")
    di.add_argument("--fresh", action="store_true", help="discard the rounds in --out (of another teacher or settings)")
    di.set_defaults(func=cmd_distill)

    pp = sub.add_parser("prepare", help="write a data set once at its data resolution, for training and "
                                        "evaluation to read lazily (data sets larger than memory)",
                        description="Decode SOURCE once into a prepared set at --resolution (docs/SCALE.md): "
                                    "uint8 images read by index, labels, and a manifest with the held-out split and "
                                    "a content fingerprint. Resumes after a kill; refuses an --out holding "
                                    "another data set.")
    pp.add_argument("source", help="a folder of images (one sub-folder per class), an .npz with 'images' (and "
                                   "'labels'), a folder of Fashion-MNIST IDX files, or fashion-mnist")
    pp.add_argument("--out", required=True, help="the prepared set's folder")
    pp.add_argument("--resolution", type=_positive, required=True,
                    help="the data resolution R of the cascade that trains on it (data.resolution)")
    pp.add_argument("--fit", choices=["pad", "resize", "resize-up"], default="pad",
                    help="how images reach R after a centre crop to square: pad (smaller ones centred on black, "
                         "larger ones downscaled; default), resize (downscale; refuses smaller ones) or resize-up "
                         "(enlarges smaller ones too: bicubic)")
    pp.add_argument("--channels", type=int, choices=[0, 1, 3], default=0,
                    help="0 (default): as stored (a folder with any colour image: RGB); 1 or 3 converts")
    pp.add_argument("--on-bad", choices=["skip", "fail"], default="skip",
                    help="an unreadable image is skipped and counted (default), or stops the preparation")
    pp.add_argument("--workers", type=int, default=0, metavar="N",
                    help="decoding processes for a folder (default 0: one per core)")
    _common(pp, device=False)
    pp.set_defaults(func=cmd_prepare)

    pr = sub.add_parser("presets", help="list the shipped stage presets, each with what it is for")
    pr.set_defaults(func=cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = warning_line  # cdm's warnings read as one line, like its errors
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"cdm: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    except OSError as e:  # a file cdm reads or writes: one line, not a traceback (other errors are bugs)
        print(f"cdm: error: {os_error_message(e, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cdm: interrupted; the last checkpoint is kept, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
