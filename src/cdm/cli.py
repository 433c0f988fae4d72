"""The ``cdm`` command line. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import replace

from . import cliargs as ca
from .cliargs import option
from .config import ConfigError, list_presets, load_stage_config, preset_description, to_dict
from .errors import USER_ERRORS, OneLineParser, os_error_message, warning_line


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
    cfg = NllConfig(reference=_reference(a, a.n), levels=a.level, mode=a.mode, t_samples=a.t_samples, seed=a.seed,
                    batch_size=a.batch_size, device=a.device, progress=not a.no_progress)
    r = evaluate_nll(paths, plan if a.cascade else None, cfg, a.out)
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
    from .eval.classifier import CAS_RECIPE
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
                         per_stage=not a.no_per_stage, cas=replace(CAS_RECIPE, epochs=a.cas_epochs) if a.cas else None)
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


def build_parser() -> argparse.ArgumentParser:
    from .demo import run_demo
    from .distill import DistillConfig
    from .eval import classifier
    from .eval.likelihood import NllConfig
    from .eval.quality import EvalConfig
    from .eval.sweep import SweepConfig
    from .plan import DEFAULT_GPU_TFLOPS, training_plan
    from .prepare import PrepareConfig
    from .shards import SampleRequest

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
    t.add_argument("--measure", type=ca.positive, metavar="N",
                   help="with the plan, time N training steps (synthetic inputs, on train.device, at the batch per "
                        "process) and print img/s; trains nothing")
    option(t, "--gpus", type=ca.positive, metavar="N", home=(training_plan, "processes"),
           help="plan for N processes/GPUs: memory per process at train.batch_size / N, hours on N GPUs")
    t.add_argument("--gpu-tflops", type=ca.positive_float, metavar="X",
                   help=f"achieved TFLOP/s per GPU for the plan's GPU-hours (default {DEFAULT_GPU_TFLOPS:g}: 40%% of "
                        "an A100's bf16 peak)")
    ca.common(t, None, "train.seed: the initial weights, batches and noise (default: the config's)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="sample a cascade and write grids and an .npz")
    ca.cascade_args(s)
    s.add_argument("--out", required=True, help="output directory")
    option(s, "--n", "--num-samples", dest="n", type=ca.positive, home=(SampleRequest, "n"),
           help="number of samples; under torchrun write --num-samples")
    s.add_argument("--classes", type=ca.classes, metavar="C,C,...",
                   help="classes to cycle through, by name or index: e.g. sneaker,bag or 7,8 (default: all "
                        "classes; an unknown name lists the valid ones)")
    ca.common(s, SampleRequest, "sample j uses seed SEED + j")
    option(s, "--batch-size", type=ca.positive, home=(SampleRequest, "batch_size"))
    s.add_argument("--num-shards", type=ca.positive, metavar="K",
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
    ca.cascade_args(n, plan_flags=())
    n.add_argument("--out", required=True, help="output directory (nll.json, nll.md)")
    n.add_argument("--level", type=ca.ints, help="augmentation level s: one value for every SR stage, or one per "
                                                  "stage with 0 for the base (e.g. 0,250); default: the cascade "
                                                  "file's levels, else 0")
    n.add_argument("--mode", choices=["truncated", "non-truncated"],
                   help="truncated: SR stages conditioned on the lower stage's forward-process z_s (docs/METHOD.md "
                        "section 3); non-truncated: every stage's full bound, SR stages on the augmented z_0 "
                        "(default: the cascade file's mode, else truncated)")
    option(n, "--n", type=ca.positive, home=(NllConfig, "reference.n"),
           help="number of images: a random class-stratified subset")
    ca.reference_args(n, NllConfig, n_ref=False)
    n.add_argument("--t-samples", type=ca.positive, metavar="K",
                   help="Monte-Carlo estimate with K uniform t per image and stage (default: the exact sum "
                        "over all T terms, T network calls per stage)")
    ca.common(n, NllConfig, "image j uses seed SEED + j")
    option(n, "--batch-size", type=ca.positive, home=(NllConfig, "batch_size"))
    n.set_defaults(func=cmd_nll)

    d = sub.add_parser("demo", help="train and sample the Fashion-MNIST 8->32 cascade (about 20 minutes on 2 CPU cores)")
    option(d, "--out", home=(run_demo, "out_dir"), help="output directory (re-running resumes)")
    option(d, "--scale", type=ca.positive_float, home=(run_demo, "scale"),
           help="multiply the training steps (e.g. 0.01 for a smoke run)")
    ca.common(d, run_demo, "train.seed of both stages, and the grid's sample j uses seed SEED + j")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("train-classifier", help="train the domain classifier (feature space for FID/KID/PR, and IS)")
    c.add_argument("--out", required=True, help="output directory (classifier.safetensors, report)")
    option(c, "--data-from", home=(classifier, "DATA_FROM"),
           help="the preset, config file or run directory whose [data] section to use")
    c.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data setting, e.g. --data source=folder --data path=~/pets")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="classifier setting, e.g. --set epochs=2 (see cdm.eval.classifier.ClassifierConfig)")
    ca.common(c, None, "the classifier's initial weights and batches (default: its seed setting, "
                       f"{classifier.ClassifierConfig.seed})", device_flag=False)
    c.set_defaults(func=cmd_train_classifier)

    e = sub.add_parser("eval", help="FID, KID, IS, precision/recall, per-stage checks and CAS of a cascade")
    ca.cascade_args(e)
    e.add_argument("--out", required=True, help="output directory (results.json, report.html, report.md)")
    option(e, "--n", type=ca.positive, home=(EvalConfig, "n"), help="samples to score")
    e.add_argument("--samples", help="score this samples.npz (from cdm sample) instead of sampling now")
    e.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="compare two cascades (each a cascade file, a folder holding cascade.json, or a stage "
                        "checkpoint): same seeds, same reference, a verdict per metric only beyond 2 standard errors")
    option(e, "--features", type=ca.spaces, home=(EvalConfig, "features"),
           help="feature spaces, comma-separated: classifier, inception")
    option(e, "--classifier", home=(EvalConfig, "classifier"), help="domain classifier (from cdm train-classifier)")
    ca.reference_args(e, EvalConfig)
    e.add_argument("--cas", action="store_true", help="also compute the Classification Accuracy Score")
    option(e, "--cas-epochs", type=ca.positive, home=(classifier, "CAS_RECIPE.epochs"),
           help="epochs of the CAS classifier (cdm.eval.classifier.CAS_RECIPE)")
    e.add_argument("--no-per-stage", action="store_true", help="skip the per-stage checks of SR stages")
    ca.common(e, EvalConfig, "sample j uses seed SEED + j")
    option(e, "--batch-size", type=ca.positive, home=(EvalConfig, "batch_size"))
    e.set_defaults(func=cmd_eval)

    w = sub.add_parser("sweep", help="search an SR stage's augmentation level s (and guidance weight), or the "
                                     "base stage's guidance weight",
                       description="Score candidate levels s of one SR stage (with --weights: jointly with the "
                                   "guidance weight w; for the base stage, --stage-index 0, w alone), each with a "
                                   "bootstrap error bar. The lowest is written into the cascade file (--cascade; "
                                   "with --stage, OUT/cascade.json) only when it beats the current setting beyond "
                                   "that noise.")
    ca.cascade_args(w, plan_flags=("steps", "sampler", "spacing"))
    w.add_argument("--out", required=True, help="output directory (resumable)")
    option(w, "--stage-index", type=int, home=(SweepConfig, "stage"),
           help="the stage to sweep (-1: the last; 0, the base stage, searches --weights alone)")
    option(w, "--levels", type=ca.ints, home=(SweepConfig, "levels"),
           help="candidate levels s (the current level is always added)")
    w.add_argument("--weights", type=ca.floats, metavar="W,W,...",
                   help="also search the stage's guidance weight over these, jointly with s for an SR stage "
                        "(e.g. 0,1,2,4; the current weight is always added); default: the plan's weight only")
    w.add_argument("--modes", type=lambda t: [v for v in t.split(",") if v],
                   help="comma-separated: non-truncated, truncated (default: both; ground-truth inputs: "
                        "non-truncated)")
    option(w, "--conditioning", choices=["generated", "ground-truth"], home=(SweepConfig, "conditioning"),
           help="the SR stage's inputs: the stage below's samples (generated), or real low-resolution images "
                "corrupted at s by the forward process (the paper's ablation; no cascade file is written)")
    option(w, "--ground-truth-split", choices=["train", "test", "all"], home=(SweepConfig, "ground_truth_split"),
           help="split the real low-resolution inputs are drawn from (train keeps them apart from the held-out "
                "images scored against)")
    w.add_argument("--keep-samples", action="store_true",
                   help="save every candidate's samples (OUT/samples/*.npz, uint8) before scoring them")
    option(w, "--n", type=ca.positive, home=(SweepConfig, "n"), help="samples per candidate")
    option(w, "--feature", type=ca.spaces, metavar="SPACE[,SPACE]", home=(EvalConfig, "features"),
           help="the feature space that ranks (classifier or inception); more, comma-separated, are scored "
                "beside it on the same samples (e.g. classifier,inception)")
    option(w, "--metric", choices=["fid", "kid"], home=(SweepConfig, "metric"), help="what ranks the candidates")
    option(w, "--classifier", home=(EvalConfig, "classifier"), help="domain classifier (from cdm train-classifier)")
    ca.reference_args(w, EvalConfig)
    w.add_argument("--no-write", action="store_true", help="never write a level into a cascade file")
    ca.common(w, EvalConfig, "sample j uses seed SEED + j")
    option(w, "--batch-size", type=ca.positive, home=(SweepConfig, "batch_size"))
    w.set_defaults(func=cmd_sweep)

    em = sub.add_parser("ema", help="post-hoc EMA: rebuild a run's weight average of any length after training",
                        description="Reconstruct the EMA of relative length SIGMA_REL (EDM2's post-hoc EMA) from "
                                    "the snapshots a run trained with train.ema_profiles wrote, and save it as a "
                                    "stage checkpoint per value (OUT/ema-<sigma_rel>.safetensors) for cdm sample, "
                                    "eval and sweep.")
    em.add_argument("run", help="the run directory (its ema/ snapshots and checkpoints)")
    em.add_argument("--sigma-rel", type=ca.floats, required=True,
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
    option(di, "--steps", type=ca.positive, home=(DistillConfig, "final_steps"), help="the distilled stage's DDIM steps")
    option(di, "--from-steps", type=ca.positive, home=(DistillConfig, "start_steps"),
           help="the teacher's DDIM steps in the first round (--from-steps / --steps must be a power of two)")
    option(di, "--iters", type=ca.positive, home=(DistillConfig, "iters"))
    option(di, "--batch-size", type=ca.positive, home=(DistillConfig, "batch_size"))
    option(di, "--lr", type=ca.positive_float, home=(DistillConfig, "lr"))
    ca.common(di, DistillConfig, "the students' batches and noise")
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
    pp.add_argument("--resolution", type=ca.positive, required=True,
                    help="the data resolution R of the cascade that trains on it (data.resolution)")
    option(pp, "--fit", choices=["pad", "resize", "resize-up"], home=(PrepareConfig, "fit"),
           help="how images reach R after a centre crop to square: pad (smaller ones centred on black, larger ones "
                "downscaled), resize (downscale; refuses smaller ones) or resize-up (enlarges smaller ones too: "
                "bicubic)")
    option(pp, "--channels", type=int, choices=[0, 1, 3], home=(PrepareConfig, "channels"),
           help="0: as stored (a folder with any colour image: RGB); 1 or 3 converts")
    option(pp, "--on-bad", choices=["skip", "fail"], home=(PrepareConfig, "on_bad"),
           help="an unreadable image is skipped and counted, or stops the preparation")
    option(pp, "--workers", type=int, metavar="N", home=(PrepareConfig, "workers"),
           help="decoding processes for a folder (0: one per core)")
    ca.common(pp, device_flag=False)
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
