"""The paper's headline at equal compute on Fashion-MNIST 8x8 -> 32x32 (16x16 -> 64x64 with
``--profile gpu``): cascades (no / Gaussian
augmentation, several base-stage shares of the budget) against a single stage with the same
training FLOPs, at several budgets, over several training seeds (``cdmrepro/headline.py``).

    python experiments/headline.py --out runs/headline [--profile cpu|smoke|gpu] [--publish docs]
        [--record docs/headline] [--seeds 0,1] [--only 'b2/*'] [--report-only]
        [--defer-inception | --fill-inception]

Re-running the same command resumes; what is done is skipped. The study outlives a 2-core machine's
session: with ``--record DIR`` its finished cells (a few hundred bytes each) are kept in
``DIR/cells.jsonl``; commit that file and a fresh clone trains only the cells missing from it.
The report is rewritten after every cell.

A machine without the FID Inception weights (a lent GPU, say) runs with ``--defer-inception``: its
row cells are recorded with the Inception FID pending and their report samples kept under
``OUT/points/samples``; bring that folder back and ``--fill-inception --out THAT_RUN --record ...``
scores them where the weights are.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cdmrepro.headline import (HEADLINES, fill_inception, plan_headline, report_from_record, report_name,  # noqa: E402
                               run_headline, RunOptions, write_markdown)
from cdmrepro.profiles import PROFILES, get_profile  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from cdm.config import ConfigError
    from cdm.errors import USER_ERRORS

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="headline.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run directory (re-running resumes it)")
    p.add_argument("--profile", choices=list(HEADLINES), default="cpu",
                   help="; ".join(f"{k}: {v.about}" for k, v in PROFILES.items() if k in HEADLINES))
    p.add_argument("--publish", metavar="DIR", help="also write DIR/HEADLINE.md (e.g. docs)")
    p.add_argument("--device", default="", help="auto, cpu, cuda ... (default: the profile's)")
    p.add_argument("--data-path", default="", help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--record", metavar="DIR", default="",
                   help="folder of cells.jsonl, the finished cells (default: --out); commit it to resume elsewhere")
    p.add_argument("--seeds", default="", help="train only these of the profile's seeds, e.g. 1,2, once seed 0 (which chooses each "
                        "row's split) is recorded (default: all)")
    p.add_argument("--only", default="", metavar="GLOBS",
                   help="run only the cells whose key matches one of these comma-separated patterns, e.g. "
                        "'b2/seed0/f0.1/*' (keys as in cells.jsonl), so that processes can split one seed's cells")
    p.add_argument("--dry-run", action="store_true", help="print every stage's steps and FLOPs, then exit")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from the recorded cells (--record), training nothing")
    once = p.add_mutually_exclusive_group()
    once.add_argument("--defer-inception", action="store_true",
                      help="leave the row cells' Inception FIDs pending (no Inception weights here) and keep their "
                           "report samples under OUT/points/samples for --fill-inception")
    once.add_argument("--fill-inception", action="store_true",
                      help="score the pending Inception FIDs of the record's cells from the samples under "
                           "OUT/points/samples, training nothing")
    a = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    try:
        profile, h = get_profile(a.profile), HEADLINES[a.profile]
        if a.dry_run:
            for k, v in plan_headline(profile, h, a.device or profile.device, a.data_path).items():
                print(f"{k:32s} {v.config.train.steps:6d} steps x {v.config.train.batch_size:3d}  "
                      f"{v.train_flops / 1e12:8.2f} TFLOP")
            return 0
        try:
            seeds = tuple(int(k) for k in a.seeds.split(",")) if a.seeds else None
        except ValueError:
            raise ConfigError(f"--seeds takes comma-separated integers, e.g. 1,2; got {a.seeds!r}") from None
        if seeds is not None and not set(seeds) <= set(h.seeds):
            raise ConfigError(f"--seeds {a.seeds}: the {a.profile} profile's seeds are {list(h.seeds)}")
        command = shlex.join(["python", "experiments/headline.py", *argv])

        def write(summary: dict) -> None:
            Path(a.out).mkdir(parents=True, exist_ok=True)
            write_markdown(summary, Path(a.out) / "headline.md")
            if a.publish:
                write_markdown(summary, Path(a.publish) / report_name(profile))

        if a.fill_inception:
            s = fill_inception(Path(a.out), profile, h, a.device or profile.device, a.data_path, command, log,
                               Path(a.record or a.out))
        elif a.report_only:
            s = report_from_record(Path(a.record or a.out), profile, h, a.device or profile.device, a.data_path,
                                   command, log)
        else:
            opts = RunOptions(record=Path(a.record) if a.record else None, seeds=seeds, after_cell=write,
                              defer_inception=a.defer_inception, only=tuple(g for g in a.only.split(",") if g))
            s = run_headline(Path(a.out), profile, h, a.device, a.data_path, command, log, opts)
        write(s)
        log(f"report: {Path(a.out) / 'headline.md'}" + (f", {Path(a.publish) / report_name(profile)}"
                                                          if a.publish else ""))
    except USER_ERRORS as e:
        print(f"headline: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
