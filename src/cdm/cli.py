"""The ``cdm`` command line. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import sys

from .cascade import CascadeError
from .checkpoint import CheckpointError
from .config import ConfigError, list_presets, load_stage_config, to_dict
from .data import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError, CascadeError)


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

    from .sample import (balanced_labels, default_sampling, load_cascade, read_cascade_file, sample_batched,
                         write_samples)
    from .train import pick_device

    if bool(a.cascade) == bool(a.stage):
        raise ConfigError("pass either --cascade FILE or one --stage CHECKPOINT per stage (base first)")
    if a.cascade:
        paths, sampling = read_cascade_file(a.cascade)
    else:
        paths, sampling = a.stage, None
    cascade = load_cascade(paths, pick_device(a.device))
    if sampling is None:
        sampling = default_sampling(cascade)
    k = len(cascade.stages)
    if a.steps:
        steps = a.steps * k if len(a.steps) == 1 else a.steps
        if len(steps) != k:
            raise ConfigError(f"--steps needs 1 or {k} values, got {len(a.steps)}")
        for st, n in zip(sampling.stages, steps):
            st.steps = n
    if a.levels:
        if len(a.levels) != k:
            raise ConfigError(f"--levels needs {k} values (0 for the base stage), got {len(a.levels)}")
        for st, s in zip(sampling.stages, a.levels):
            st.level = s
    if a.mode:
        sampling.mode = a.mode
    if a.classes:
        classes = torch.tensor(a.classes)
        labels = classes.repeat((a.n + len(classes) - 1) // len(classes))[:a.n]
    else:
        labels = balanced_labels(a.n, cascade.num_classes)
    seeds = list(range(a.seed, a.seed + a.n))
    result = sample_batched(cascade, labels, seeds, sampling, a.batch_size)
    for p in write_samples(result, cascade, a.out):
        print(p)
    print(a.out.rstrip("/") + "/samples.npz")
    return 0


def cmd_nll(a: argparse.Namespace) -> int:
    from .likelihood import bound_table, cascade_bound, evaluation_set, write_bound
    from .sample import load_cascade, read_cascade_file
    from .train import pick_device

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


def cmd_presets(a: argparse.Namespace) -> int:
    for p in list_presets():
        print(p)
    return 0


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
    s.add_argument("--cascade", help="cascade file (JSON) naming the stage checkpoints and sampling settings")
    s.add_argument("--stage", action="append", default=[], metavar="CHECKPOINT",
                   help="a stage checkpoint or run directory, base first (repeat per stage)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--n", type=_positive, default=100, help="number of samples (default 100)")
    s.add_argument("--steps", type=_ints, help="sampler steps, one value or one per stage (e.g. 100,50)")
    s.add_argument("--levels", type=_ints, help="augmentation level s per stage, 0 for the base (e.g. 0,250)")
    s.add_argument("--mode", choices=["truncated", "non-truncated"], help="how SR stages get their input")
    s.add_argument("--classes", type=_ints, help="class labels to cycle through (default: all classes)")
    s.add_argument("--seed", type=int, default=0, help="sample j uses seed SEED + j")
    s.add_argument("--batch-size", type=_positive, default=64)
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_sample)

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

    d = sub.add_parser("demo", help="train and sample the Fashion-MNIST 8->32 cascade (about 10 minutes on 2 cores)")
    d.add_argument("--out", default="runs/demo", help="output directory (default runs/demo; re-running resumes)")
    d.add_argument("--scale", type=float, default=1.0, help="multiply the training steps (e.g. 0.01 for a smoke run)")
    d.add_argument("--device", default="auto")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    pr = sub.add_parser("presets", help="list the shipped stage presets")
    pr.set_defaults(func=cmd_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"cdm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cdm: interrupted; the last checkpoint is kept, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
