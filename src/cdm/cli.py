"""The ``cdm`` command line. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import replace

from .cliparser import build_parser
from .config import ConfigError, list_presets, load_stage_config, preset_description, to_dict
from .errors import USER_ERRORS, os_error_message, warning_line


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
    from .eval.search import sweep_cascade
    from .eval.sweep import SweepConfig, describe

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


COMMANDS = {  # each command of cdm.cliparser.build_parser and the function that runs it
    "train": cmd_train,
    "sample": cmd_sample,
    "merge": cmd_merge,
    "nll": cmd_nll,
    "demo": cmd_demo,
    "train-classifier": cmd_train_classifier,
    "eval": cmd_eval,
    "sweep": cmd_sweep,
    "ema": cmd_ema,
    "distill": cmd_distill,
    "prepare": cmd_prepare,
    "presets": cmd_presets,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = warning_line  # cdm's warnings read as one line, like its errors
    try:
        return COMMANDS[args.command](args)
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
