"""Reproduce the paper's conditioning-augmentation findings on Fashion-MNIST 8x8 -> 32x32.

    python experiments/fmnist_repro.py --out runs/repro [--profile cpu|smoke|gpu] [--publish docs] [--diagnostics]

Trains one base stage, three SR stages (no, Gaussian and blur augmentation) and a single-stage
32x32 model with the training FLOPs of base + SR; scores every (row, condition, s) point (FID
with bootstrap SE and KID in the domain classifier's space, FID in Inception space, CAS for the
main rows); with --diagnostics also variants of the SR stages (what a change of recipe or of
training seed does); writes ``report.md`` into --out and, with --publish DIR, ``DIR/RESULTS.md``.
Re-running the same command resumes; what is done is skipped. See ``cdmrepro/run.py``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cdmrepro.profiles import PROFILES, get_profile  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fmnist_repro.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run directory (re-running resumes it)")
    p.add_argument("--profile", choices=list(PROFILES), default="cpu",
                   help="; ".join(f"{k}: {v.about}" for k, v in PROFILES.items()))
    p.add_argument("--publish", metavar="DIR", help="also write DIR/RESULTS.md and DIR/results/ (e.g. docs)")
    p.add_argument("--steps-scale", type=float, help="multiply every stage's training steps (default: the profile's)")
    p.add_argument("--n", type=int, help="samples per point (default: the profile's)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (default: the profile's)")
    p.add_argument("--data-path", default="", help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS)")
    p.add_argument("--diagnostics", action="store_true",
                   help="also train and score the profile's variants of the SR stages (clean-only, more clean "
                        "examples, twice the steps, a second training seed), to explain the Gaussian stage's "
                        "quality at s = 0 and size the run-to-run noise")
    p.add_argument("--dry-run", action="store_true", help="print the profile and the stages' plan, then exit")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="training progress bars on stderr (default: when stderr is a terminal)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    import torch

    from cdm.errors import USER_ERRORS
    from cdmrepro.report import write_report
    from cdmrepro.run import RunConfig, describe_plan, run_experiment

    if a.threads:
        torch.set_num_threads(a.threads)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    try:
        profile = get_profile(a.profile, a.steps_scale, a.n)
        out = Path(a.out)
        if a.dry_run:
            print(describe_plan(profile, a.device or "", a.data_path, a.diagnostics))
            return 0
        command = shlex.join(["python", "experiments/fmnist_repro.py", *argv])
        progress = sys.stderr.isatty() if a.progress is None else a.progress
        summary = run_experiment(RunConfig(out, profile, a.device or "", a.data_path, command, progress,
                                           a.diagnostics), log)
        log(f"report: {write_report(summary, out, out / 'report.md', out / 'report', 'report/')}")
        if a.publish:
            d = Path(a.publish)
            log(f"published: {write_report(summary, out, d / 'RESULTS.md', d / 'results', 'results/')}")
    except USER_ERRORS as e:
        print(f"fmnist_repro: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmnist_repro: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
