"""The ``cdm`` command line's parser: every command and flag, each flag's default taken from the
library setting it stands for (:func:`cdm.cliargs.option`). :mod:`cdm.cli` runs what it parses."""

from __future__ import annotations

import argparse

from . import cliargs as ca
from .cliargs import option
from .config import list_presets
from .errors import OneLineParser


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

    m = sub.add_parser("merge", help="merge a sharded sample run's shards into samples.npz")
    m.add_argument("out", help="the sharded run's directory (the --out of 'cdm sample --num-shards')")

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

    d = sub.add_parser("demo", help="train and sample the Fashion-MNIST 8->32 cascade (about 20 minutes on 2 CPU cores)")
    option(d, "--out", home=(run_demo, "out_dir"), help="output directory (re-running resumes)")
    option(d, "--scale", type=ca.positive_float, home=(run_demo, "scale"),
           help="multiply the training steps (e.g. 0.01 for a smoke run)")
    ca.common(d, run_demo, "train.seed of both stages, and the grid's sample j uses seed SEED + j")

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

    sub.add_parser("presets", help="list the shipped stage presets, each with what it is for")
    return p
