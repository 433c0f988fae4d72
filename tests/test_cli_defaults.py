"""One home per default: every flag of every ``cdm`` command that has a default takes it from the
library setting it stands for (a settings dataclass's field, a function's parameter or a module
constant; :func:`cdm.cliargs.option`), and ``--help`` shows that value — so the command line and
Python run the same thing unless told otherwise."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from cdm.cli import build_parser
from cdm.cliargs import home_default, shown
from cdm.distill import DistillConfig
from cdm.eval.classifier import CAS_RECIPE
from cdm.eval.likelihood import NllConfig
from cdm.eval.quality import EvalConfig
from cdm.eval.sweep import SweepConfig
from cdm.prepare import PrepareConfig
from cdm.shards import SampleRequest


def commands() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices


def _no_default(action: argparse.Action) -> bool:
    return action.default is None or action.default is False or action.default == [] \
        or isinstance(action, argparse._HelpAction)


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_default_has_its_home_in_the_library(name):
    for act in commands()[name]._actions:
        if _no_default(act):
            continue
        where = f"cdm {name} {'/'.join(act.option_strings) or act.dest}"
        assert hasattr(act, "home"), f"{where}: default {act.default!r} is written in the CLI; take it from the " \
                                     f"library with cdm.cliargs.option"
        assert act.default == home_default(*act.home), where
        said = re.findall(r"\(default ([^)]*)\)|^default (.*)$", act.help or "")
        want = [] if shown(act.default) is None else [shown(act.default)]  # shown once, as it is
        assert [a or b for a, b in said] == want, f"{where}: help {act.help!r}"


def _defaults(cls) -> dict:
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}


def _parsed(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_a_bare_command_line_asks_for_the_library_defaults():
    """Spelled out for the settings objects the issue named: what each command passes when no flag is
    given equals the dataclass's own default, field by field."""
    a = _parsed(["sample", "--stage", "s", "--out", "o"])
    d = _defaults(SampleRequest)
    assert (a.n, a.seed, a.batch_size, a.device) == (d["n"], d["seed"], d["batch_size"], d["device"])

    a = _parsed(["eval", "--stage", "s", "--out", "o"])
    d = _defaults(EvalConfig)
    ref = d["reference"]
    assert (a.n, a.features, a.seed, a.batch_size, a.device) == (d["n"], d["features"], d["seed"], d["batch_size"],
                                                                  d["device"])
    assert (a.split, a.n_ref, a.ref_seed) == (ref.split, ref.n, ref.seed)
    assert a.cas_epochs == CAS_RECIPE.epochs  # was 4 in the CLI, 3 from Python

    a = _parsed(["sweep", "--stage", "s", "--out", "o"])
    d = _defaults(SweepConfig)
    assert (a.stage_index, a.levels, a.conditioning, a.ground_truth_split, a.n, a.metric, a.batch_size) == \
        (d["stage"], d["levels"], d["conditioning"], d["ground_truth_split"], d["n"], d["metric"], d["batch_size"])

    a = _parsed(["nll", "--stage", "s", "--out", "o"])
    d = _defaults(NllConfig)
    assert (a.n, a.split, a.ref_seed, a.seed, a.batch_size, a.mode) == \
        (d["reference"].n, d["reference"].split, d["reference"].seed, d["seed"], d["batch_size"], d["mode"])

    a = _parsed(["distill", "t", "--out", "o"])
    d = _defaults(DistillConfig)
    assert (a.steps, a.from_steps, a.iters, a.batch_size, a.lr, a.seed) == \
        (d["final_steps"], d["start_steps"], d["iters"], d["batch_size"], d["lr"], d["seed"])

    a = _parsed(["prepare", "src", "--out", "o", "--resolution", "32"])
    d = {f.name: f.default for f in dataclasses.fields(PrepareConfig)}
    assert (a.fit, a.channels, a.on_bad, a.workers) == (d["fit"], d["channels"], d["on_bad"], d["workers"])


def test_nll_without_a_cascade_file_takes_the_papers_truncated_bound():
    """The library, not the CLI, says what --mode defaults to when stages are named one by one."""
    from cdm.eval.likelihood import NLL_MODE, _levels

    assert NLL_MODE == "truncated"
    assert _levels(3, None, None) == [0, 0, 0]
