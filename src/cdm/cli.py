"""The ``cdm`` command line. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import sys

from .cascade import CascadeError
from .checkpoint import CheckpointError
from .config import ConfigError, list_presets, load_stage_config, to_dict
from .data import DataError
from .diffusion import Spacing
from .distributed import DistributedError
from .samplers import SAMPLERS
from .shards import ShardError
from .train import TrainingError

USER_ERRORS = (ConfigError, DataError, CheckpointError, CascadeError, ShardError, TrainingError, DistributedError)


def _user_errors() -> tuple[type[Exception], ...]:
    from .features import FeatureError
    return USER_ERRORS + (FeatureError,)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def cmd_train(a: argparse.Namespace) -> int:
    from .data import load_dataset
    from .train import train_stage

    cfg = load_stage_config(a.config, a.set)
    if a.dry_run:
        data = load_dataset(cfg.data)
        cfg.data.class_names = data.class_names
        cfg.resolve(channels=data.images.shape[1], num_classes=data.num_classes)
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    last = train_stage(cfg, a.out, fresh=a.fresh, progress=not a.no_progress)
    print(f"checkpoint: {last}")
    return 0


def cmd_sample(a: argparse.Namespace) -> int:
    import torch

    from .checkpoint import resolve_checkpoint_path
    from .distributed import env_rank, pick_device
    from .sample import balanced_labels, load_cascade, sample_batched, write_samples
    from .shards import sample_sharded

    if a.shard is not None and a.num_shards is None:
        raise ConfigError("--shard I needs --num-shards K")
    paths, sampling = _cascade_args(a)
    paths = [resolve_checkpoint_path(p) for p in paths]
    cascade = load_cascade(paths, pick_device(a.device), a.precision)
    if a.classes:
        classes = torch.tensor(a.classes)
        labels = classes.repeat((a.n + len(classes) - 1) // len(classes))[:a.n]
    else:
        labels = balanced_labels(a.n, cascade.num_classes)
    rank, size, _ = env_rank()
    if a.num_shards is not None or size > 1:  # a sharded run; under torchrun, rank r takes shards r, r+size, ...
        k = a.num_shards or size
        written, left, merged = sample_sharded(cascade, paths, sampling, labels, a.seed, a.out, k,
                                               [a.shard] if a.shard is not None else range(rank, k, size),
                                               a.batch_size)
        for p in written:
            print(p)
        print(merged if merged else f"{k - len(left)} of {k} shards done; 'cdm merge {a.out}' once all are")
        return 0
    seeds = list(range(a.seed, a.seed + a.n))
    result = sample_batched(cascade, labels, seeds, sampling, a.batch_size)
    for p in write_samples(result, cascade, a.out):
        print(p)
    print(a.out.rstrip("/") + "/samples.npz")
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from .shards import merge_shards

    print(merge_shards(a.out))
    return 0


def cmd_nll(a: argparse.Namespace) -> int:
    from .likelihood import bound_table, cascade_bound, evaluation_set, write_bound
    from .distributed import pick_device
    from .sample import load_cascade, read_cascade_file

    if bool(a.cascade) == bool(a.stage):
        raise ConfigError("pass either --cascade FILE or one --stage CHECKPOINT per stage (base first)")
    if a.cascade:
        paths, sampling = read_cascade_file(a.cascade)
        levels, mode = [st.level for st in sampling.stages], sampling.mode
    else:
        paths, levels, mode = a.stage, [0] * len(a.stage), "truncated"
    cascade = load_cascade(paths, pick_device(a.device))
    k = len(cascade.stages)
    if a.level:
        if len(a.level) not in (1, k) or (len(a.level) == 1 and k == 1 and a.level[0]):
            raise ConfigError(f"--level needs one value for every super-resolution stage or {k} values "
                              f"(0 for the base stage), got {len(a.level)}")
        levels = [0] + a.level * (k - 1) if len(a.level) == 1 else a.level
    mode = a.mode or mode
    data = evaluation_set(cascade.stages[-1].config.data, a.split, a.n, a.data)
    bound = cascade_bound(cascade, data.images, data.labels, levels, mode, t_samples=a.t_samples,
                          seeds=range(a.seed, a.seed + a.n), batch_size=a.batch_size, progress=not a.no_progress)
    summary = {**bound.summary(), "levels": levels, "split": a.split, "seed": a.seed,
               "data": a.data or cascade.stages[-1].config.data.source,
               "stages_from": [str(p) for p in paths]}
    written = write_bound(summary, a.out)
    print(bound_table(summary), end="")
    for p in written:
        print(p)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    s = run_demo(a.out, scale=a.scale, progress=not a.no_progress, device=a.device)
    print(json.dumps({"grids": s["grids"], "cascade": s["cascade"], "timings": s["timings"]}, indent=2))
    return 0


def _cascade_args(a: argparse.Namespace):
    """(checkpoint paths, sampling settings) from --cascade or --stage, with --steps/--levels/--mode
    overrides applied."""
    from .sample import default_sampling, read_cascade_file

    if bool(a.cascade) == bool(a.stage):
        raise ConfigError("pass either --cascade FILE or one --stage CHECKPOINT per stage (base first)")
    if a.cascade:
        paths, sampling = read_cascade_file(a.cascade)
    else:
        paths = a.stage
        sampling = default_sampling(len(paths))
    k = len(sampling.stages)
    if getattr(a, "steps", None):
        steps = a.steps * k if len(a.steps) == 1 else a.steps
        if len(steps) != k:
            raise ConfigError(f"--steps needs 1 or {k} values, got {len(a.steps)}")
        for st, n in zip(sampling.stages, steps):
            st.steps = n
    if getattr(a, "levels", None):
        if len(a.levels) != k:
            raise ConfigError(f"--levels needs {k} values (0 for the base stage), got {len(a.levels)}")
        for st, s in zip(sampling.stages, a.levels):
            st.level = s
    if getattr(a, "mode", None):
        sampling.mode = a.mode
    if getattr(a, "sampler", None):
        sampling.sampler = a.sampler
    if getattr(a, "spacing", None):
        sampling.spacing = a.spacing
    return paths, sampling


def cmd_train_classifier(a: argparse.Namespace) -> int:
    from .classifier import ClassifierConfig
    from .config import from_dict, load_stage_config, parse_overrides
    from .evaljobs import train_domain_classifier

    data = load_stage_config(a.data_from, [f"data.{kv}" for kv in a.data]).data
    cfg = from_dict(ClassifierConfig, parse_overrides(a.set), prefix="")
    s = train_domain_classifier(data, a.out, cfg, progress=not a.no_progress)
    print(f"classifier: {s['path']}  test top-1 {s['test']['top1']:.2f}%")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .classifier import ClassifierConfig
    from .evaljobs import evaluate_cascade

    paths, sampling = _cascade_args(a)
    r = evaluate_cascade(paths, sampling, a.out, n=a.n, features=a.features, classifier=a.classifier,
                         n_ref=a.n_ref, split=a.split, samples=a.samples, per_stage=not a.no_per_stage, cas=a.cas,
                         cas_config=ClassifierConfig(epochs=a.cas_epochs), seed=a.seed, batch_size=a.batch_size,
                         device=a.device, precision=a.precision)
    for row in r["scores"]:
        keys = [k for k in ("fid", "kid", "is", "precision", "recall") if k in row]
        print(f"stage {row['stage']} ({row['resolution']}px) [{row['feature_space']}, n={row['n_fake']} vs "
              f"{row['n_real']}]: " + ", ".join(f"{k}={row[k]:.4g}" for k in keys))
    if r["cas"]:
        print(f"CAS top-1 {r['cas']['generated']['top1']:.2f}%"
              + (f" (real data: {r['cas']['real']['top1']:.2f}%)" if "real" in r["cas"] else ""))
    print(f"report: {a.out.rstrip('/')}/report.html")
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    from .evaljobs import sweep_cascade
    from .sweep import SweepConfig, condition_label

    cfg = SweepConfig(stage=a.stage_index, levels=a.levels, modes=a.modes, conditioning=a.conditioning,
                      ground_truth_split=a.ground_truth_split, n=a.n, seed=a.seed, batch_size=a.batch_size,
                      keep_samples=a.keep_samples)
    s = sweep_cascade(a.cascade, a.out, cfg, feature=a.feature, metric=a.metric, classifier=a.classifier,
                      n_ref=a.n_ref, split=a.split, write_best=not a.no_write, device=a.device,
                      sampler=a.sampler, steps=a.steps, spacing=a.spacing)
    b = s["best"]
    print(f"best: {condition_label(b)} s={b['level']} {s['metric']}={b['value']:.4f}; "
          f"report: {a.out.rstrip('/')}/report.html")
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


def cmd_presets(a: argparse.Namespace) -> int:
    for p in list_presets():
        print(p)
    return 0


def _add_cascade_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cascade", help="cascade file (JSON) naming the stage checkpoints and sampling settings")
    p.add_argument("--stage", action="append", default=[], metavar="CHECKPOINT",
                   help="a stage checkpoint or run directory, base first (repeat per stage)")
    p.add_argument("--steps", type=_ints, help="sampler steps, one value or one per stage (e.g. 100,50)")
    p.add_argument("--levels", type=_ints, help="augmentation level s per stage, 0 for the base (e.g. 0,250)")
    p.add_argument("--mode", choices=["truncated", "non-truncated"], help="how SR stages get their input")
    p.add_argument("--sampler", choices=list(SAMPLERS),
                   help="reverse-process sampler (default: the cascade file's, else ancestral)")
    p.add_argument("--spacing", choices=[sp.value for sp in Spacing],
                   help="time-grid spacing (default: the cascade file's, else uniform); "
                        "quadratic suits few-step ddim / dpmpp-2m")
    p.add_argument("--precision", choices=["bf16", "fp32"],
                   help="network precision while sampling (default: what each stage was trained in, bf16 "
                        "autocast for the presets); fp32 is the exact but slower switch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cdm", description="Cascaded diffusion models with conditioning augmentation.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one stage of a cascade",
                       description="Train (or resume) one stage. CONFIG is a .toml/.json file or a preset "
                                   f"name ({', '.join(list_presets())}).")
    t.add_argument("config", help="config file or preset name")
    t.add_argument("--out", required=True, help="run directory (resumed if it holds checkpoints)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 (repeatable)")
    t.add_argument("--fresh", action="store_true", help="discard the run directory's checkpoints and start over")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="sample a cascade and write grids and an .npz")
    _add_cascade_args(s)
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--n", "--num-samples", dest="n", type=_positive, default=100,
                   help="number of samples (default 100); under torchrun write --num-samples")
    s.add_argument("--classes", type=_ints, help="class labels to cycle through (default: all classes)")
    s.add_argument("--seed", type=int, default=0, help="sample j uses seed SEED + j")
    s.add_argument("--batch-size", type=_positive, default=64)
    s.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK if CUDA is available, else cpu")
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
                       description="Evaluate the cascade's likelihood bound (METHOD.md section 3) on real images: "
                                   "per stage and in total, in bits per dimension, with standard errors.")
    n.add_argument("--cascade", help="cascade file (JSON); its levels and mode are the defaults")
    n.add_argument("--stage", action="append", default=[], metavar="CHECKPOINT",
                   help="a stage checkpoint or run directory, base first (repeat per stage)")
    n.add_argument("--out", required=True, help="output directory (nll.json, nll.md)")
    n.add_argument("--level", type=_ints, help="augmentation level s: one value for every SR stage, or one per "
                                                "stage with 0 for the base (e.g. 0,250); default: the cascade "
                                                "file's levels, else 0")
    n.add_argument("--mode", choices=["truncated", "non-truncated"],
                   help="truncated: SR stages conditioned on the lower stage's forward-process z_s (METHOD.md "
                        "section 3); non-truncated: every stage's full bound, SR stages on the augmented z_0 "
                        "(default: the cascade file's mode, else truncated)")
    n.add_argument("--n", type=_positive, default=1000, help="number of images (the first N; default 1000)")
    n.add_argument("--split", choices=["train", "test"], default="test", help="Fashion-MNIST split (default test)")
    n.add_argument("--data", help="evaluate these images instead (same kind as the stage's data source)")
    n.add_argument("--t-samples", type=_positive, metavar="K",
                   help="Monte-Carlo estimate with K uniform t per image and stage (default: the exact sum "
                        "over all T terms, T network calls per stage)")
    n.add_argument("--seed", type=int, default=0, help="image j uses seed SEED + j")
    n.add_argument("--batch-size", type=_positive, default=64)
    n.add_argument("--device", default="auto")
    n.add_argument("--no-progress", action="store_true")
    n.set_defaults(func=cmd_nll)

    d = sub.add_parser("demo", help="train and sample the Fashion-MNIST 8->32 cascade (about 11 minutes on 2 CPU cores)")
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo; re-running resumes)")
    d.add_argument("--scale", type=float, default=1.0, help="multiply the training steps (e.g. 0.01 for a smoke run)")
    d.add_argument("--device", default="auto")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("train-classifier", help="train the domain classifier (feature space for FID/KID/PR, and IS)")
    c.add_argument("--out", required=True, help="output directory (classifier.safetensors, report)")
    c.add_argument("--data-from", default="fmnist-sr8to32",
                   help="stage config or preset whose [data] section to use (default fmnist-sr8to32)")
    c.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data setting, e.g. --data source=folder --data path=~/pets")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="classifier setting, e.g. --set epochs=2 (see cdm.classifier.ClassifierConfig)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_train_classifier)

    e = sub.add_parser("eval", help="FID, KID, IS, precision/recall, per-stage checks and CAS of a cascade")
    _add_cascade_args(e)
    e.add_argument("--out", required=True, help="output directory (results.json, report.html, report.md)")
    e.add_argument("--n", type=_positive, default=1000, help="samples to score (default 1000)")
    e.add_argument("--samples", help="score this samples.npz (from cdm sample) instead of sampling now")
    e.add_argument("--features", type=lambda t: [v for v in t.split(",") if v], default=["classifier"],
                   help="feature spaces, comma-separated: classifier, inception (default classifier)")
    e.add_argument("--classifier", help="domain classifier (from cdm train-classifier)")
    e.add_argument("--n-ref", type=_positive, default=10000, help="real reference images (default 10000)")
    e.add_argument("--split", default="test", help="real split to compare against (default test)")
    e.add_argument("--cas", action="store_true", help="also compute the Classification Accuracy Score")
    e.add_argument("--cas-epochs", type=_positive, default=4)
    e.add_argument("--no-per-stage", action="store_true", help="skip the per-stage checks of SR stages")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=_positive, default=250)
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=cmd_eval)

    w = sub.add_parser("sweep", help="search an SR stage's augmentation level s (truncated and non-truncated)")
    w.add_argument("--cascade", required=True, help="cascade file; the best level is written back into it")
    w.add_argument("--out", required=True, help="output directory (resumable)")
    w.add_argument("--stage-index", type=int, default=-1, help="the SR stage to sweep (default: the last)")
    w.add_argument("--levels", type=_ints, default=[0, 50, 100, 200, 300, 500], help="candidate levels s")
    w.add_argument("--modes", type=lambda t: [v for v in t.split(",") if v],
                   help="comma-separated: non-truncated, truncated (default: both; ground-truth inputs: "
                        "non-truncated)")
    w.add_argument("--conditioning", choices=["generated", "ground-truth"], default="generated",
                   help="the SR stage's inputs: the stage below's samples (default), or real low-resolution "
                        "images corrupted at s by the forward process (the paper's ablation; the cascade "
                        "file is not changed)")
    w.add_argument("--ground-truth-split", default="train",
                   help="split the real low-resolution inputs are drawn from (default train, so that they "
                        "are not the test images scored against)")
    w.add_argument("--keep-samples", action="store_true",
                   help="save every candidate's samples (OUT/samples/*.npz, uint8) before scoring them")
    w.add_argument("--n", type=_positive, default=500, help="samples per candidate (default 500)")
    w.add_argument("--feature", default="classifier", choices=["classifier", "inception"])
    w.add_argument("--metric", default="fid", choices=["fid", "kid"])
    w.add_argument("--classifier", help="domain classifier (from cdm train-classifier)")
    w.add_argument("--n-ref", type=_positive, default=10000)
    w.add_argument("--split", default="test")
    w.add_argument("--no-write", action="store_true", help="do not write the best level into the cascade file")
    w.add_argument("--sampler", choices=list(SAMPLERS), help="sampler for the sweep (default: the cascade file's)")
    w.add_argument("--steps", type=_ints, help="sampler steps for the sweep, one value or one per stage")
    w.add_argument("--spacing", choices=[sp.value for sp in Spacing], help="time-grid spacing for the sweep")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--batch-size", type=_positive, default=250)
    w.add_argument("--device", default="cpu")
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

    pr = sub.add_parser("presets", help="list the shipped stage presets")
    pr.set_defaults(func=cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"cdm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cdm: interrupted; the last checkpoint is kept, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
