"""Faults at run time, table-driven: each case sets up a run, breaks something, and names the exit
status and the message fragment the CLI must answer with (one line, no traceback). Then the cases
whose right answer is a behaviour rather than an error: a corrupt newest checkpoint is skipped, the
logged loss is right after a resume, files get the user's umask, a real full disk (tmpfs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cdm.checkpoint import (Checkpoint, CheckpointError, checkpoint_path, list_checkpoints, load_checkpoint,
                            save_checkpoint)
from cdm.cli import main
from cdm.runlock import RunLock

from conftest import tiny_config
from test_cli import write_tiny
from test_distributed import one_thread  # noqa: F401 (fixture)

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained tiny base and SR stage (3 steps each), shared by the cases, which must not change them."""
    tmp = tmp_path_factory.mktemp("runs")
    from conftest import toy_images

    data = toy_images(24, 16)
    npz = tmp / "toy.npz"
    np.savez(npz, images=data.images.numpy(), labels=data.labels.numpy())
    for name, res, lowres, aug in (("base", 8, 0, "none"), ("sr", 16, 8, "gaussian")):
        cfg = write_tiny(tmp, npz, name, res, lowres, aug)
        ema = ["--set=train.ema_profiles=0.05,0.1"] if name == "base" else []  # post-hoc EMA snapshots
        assert main(["train", str(cfg), "--out", str(tmp / name), "--no-progress", *ema]) == 0
    return tmp


def hold_lock(directory: Path, what: str = "training") -> subprocess.Popen:
    """Another process holding ``directory``'s run lock until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {SRC!r})
        from cdm.runlock import run_lock
        with run_lock({str(directory)!r}, {what!r}):
            print("held", flush=True)
            sys.stdin.read()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


_HELD: list[RunLock] = []  # locks this process holds for a case, released after it


def lock_here(directory: Path, what: str = "training") -> RunLock:
    """``directory``'s run lock, held by this process on its own open file: a run_lock the command
    under test takes conflicts with it as with another process's (flock locks belong to open files)."""
    _HELD.append(RunLock(directory, what).acquire())
    return _HELD[-1]


def diverged_copy(runs: Path, tmp: Path) -> Path:
    """A copy of the base stage's checkpoint whose EMA weights are NaN (a run that diverged)."""
    ck = load_checkpoint(list_checkpoints(runs / "base")[-1][1])
    bad = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ck.ema.items()}
    return save_checkpoint(tmp / "nan.safetensors", Checkpoint(config=ck.config, step=ck.step, model=ck.model, ema=bad))


def foreign_shard(runs: Path, tmp: Path) -> list[str]:
    """A sharded run in which shard 1 was sampled from another model with the same seeds."""
    common = ["--n", "4", "--steps", "1", "--num-shards", "2", "--out"]
    assert main(["sample", "--stage", str(runs / "base"), *common, str(tmp / "a")]) == 0
    other = diverged_copy(runs, tmp).parent / "other.safetensors"
    ck = load_checkpoint(list_checkpoints(runs / "base")[-1][1])
    save_checkpoint(other, Checkpoint(config=ck.config, step=ck.step, model=ck.model,
                                      ema={k: v * 0.5 for k, v in ck.ema.items()}))
    assert main(["sample", "--stage", str(other), *common, str(tmp / "b")]) == 0
    (tmp / "a" / "shard-0001.npz").write_bytes((tmp / "b" / "shard-0001.npz").read_bytes())
    return ["merge", str(tmp / "a")]


CASES = [
    # (name, setup(runs, tmp) -> argv, exit status, message fragment)
    ("second training into a locked run directory",
     lambda r, t: (hold_lock(t / "run"), ["train", str(r / "base.toml"), "--out", str(t / "run"), "--no-progress"])[1],
     2, "in use by another cdm process"),
    ("sampling into a directory a training holds",
     lambda r, t: (hold_lock(t / "s"), ["sample", "--stage", str(r / "base"), "--out", str(t / "s"), "--n", "2",
                                        "--steps", "1"])[1],
     2, "in use by another cdm process"),
    ("merge a shard sampled from another model",
     lambda r, t: foreign_shard(r, t), 2, "was sampled for another run"),
    ("sampling a diverged (NaN) checkpoint",
     lambda r, t: ["sample", "--stage", str(diverged_copy(r, t)), "--out", str(t / "s"), "--n", "2", "--steps", "2"],
     2, "produced non-finite values: its weights are not finite, they have diverged"),
    ("truncated sampling at s = T",
     lambda r, t: ["sample", "--stage", str(r / "base"), "--stage", str(r / "sr"), "--out", str(t / "s"), "--n", "2",
                   "--steps", "1", "--levels", "0,50", "--mode", "truncated"],
     2, "needs s < its T = 50"),
    ("a level the augmentation cannot reach",
     lambda r, t: ["sample", "--stage", str(r / "base"), "--stage", str(r / "sr"), "--out", str(t / "s"), "--n", "2",
                   "--steps", "1", "--levels", "0,51"],
     2, "must be an integer in [0, 50]"),
    ("sampling into a path under a regular file",
     lambda r, t: ((t / "f").write_text("x"), ["sample", "--stage", str(r / "base"), "--out", str(t / "f" / "s"),
                                               "--n", "2", "--steps", "1"])[1],
     2, "cdm: error:"),
    ("a run directory whose only checkpoint is damaged",
     lambda r, t: (damage(r, t), ["sample", "--stage", str(t / "broken"), "--out", str(t / "s"), "--n", "2"])[1],
     2, "no checkpoint in"),
    ("--init from a path that does not exist",
     lambda r, t: ["train", str(r / "base.toml"), "--out", str(t / "run"), "--init", str(t / "none"), "--no-progress"],
     2, "cannot initialise from"),
    ("--init from a run whose only checkpoint is damaged",
     lambda r, t: (damage(r, t), ["train", str(r / "base.toml"), "--out", str(t / "run"), "--init",
                                  str(t / "broken"), "--no-progress"])[1],
     2, "is intact: pass a checkpoint file or another run to --init"),
    ("--init a super-resolution stage from a base run",
     lambda r, t: ["train", str(r / "sr.toml"), "--out", str(t / "run"), "--init", str(r / "base"), "--no-progress"],
     2, "initialise an SR stage from an SR run"),
    ("--init-weights without --init",
     lambda r, t: ["train", str(r / "base.toml"), "--out", str(t / "run"), "--init-weights", "raw"],
     2, "pass --init RUN_OR_CHECKPOINT too"),
    ("merge of an unfinished sharded run",
     lambda r, t: (main(["sample", "--stage", str(r / "base"), "--n", "4", "--steps", "1", "--num-shards", "2",
                         "--shard", "0", "--out", str(t / "a")]), ["merge", str(t / "a")])[1],
     2, "1 of 2 shards are not finished"),
    ("eval --compare with a path that does not exist",
     lambda r, t: ["eval", "--compare", str(r / "base"), str(t / "none"), "--out", str(t / "c")],
     2, "does not exist; give a cascade file (JSON)"),
    ("eval --compare with --stage as well",
     lambda r, t: ["eval", "--compare", str(r / "base"), str(r / "base"), "--stage", str(r / "base"), "--out",
                   str(t / "c")],
     2, "drop --cascade, --stage and --samples"),
    ("eval --compare of cascades with different outputs",
     lambda r, t: ((t / "two.json").write_text(json.dumps({"stages": [str(r / "base"), str(r / "sr")],
                                                               "sampling": {"stages": [{}, {}]}})),
                   ["eval", "--compare", str(r / "base"), str(t / "two.json"), "--out", str(t / "c")])[1],
     2, "final outputs differ"),
]


DISTIL = ["--steps", "1", "--from-steps", "2", "--iters", "1", "--batch-size", "2", "--device", "cpu", "--no-progress"]


def distilled(runs: Path, tmp: Path, *more: str) -> Path:
    """A one-round distillation of the base stage (2 -> 1 steps, one iteration) in ``tmp/d``."""
    assert main(["distill", str(runs / "base"), "--out", str(tmp / "d"), *DISTIL, *more]) == 0
    return tmp / "d"


def exported(runs: Path, tmp: Path) -> Path:
    assert main(["ema", str(runs / "base"), "--sigma-rel", "0.1", "--out", str(tmp / "e")]) == 0
    return tmp / "e"


def sampled(runs: Path, tmp: Path, *more: str) -> Path:
    assert main(["sample", "--stage", str(runs / "base"), "--n", "4", "--steps", "1", "--out", str(tmp / "a"),
                 *more]) == 0
    return tmp / "a"


def a_file(tmp: Path) -> Path:
    (tmp / "f").write_text("x")
    return tmp / "f"


WRITERS = [
    # every command that writes into a directory takes its lock: a second writer is refused at once
    ("cdm ema into a locked directory",
     lambda r, t: (lock_here(t / "e"), ["ema", str(r / "base"), "--sigma-rel", "0.1", "--out", str(t / "e")])[1],
     2, "in use by another cdm process (pid"),
    ("cdm distill into a locked directory",
     lambda r, t: (lock_here(t / "d"), ["distill", str(r / "base"), "--out", str(t / "d"), *DISTIL])[1],
     2, "in use by another cdm process (pid"),
    ("cdm train-classifier into a locked directory",
     lambda r, t: (lock_here(t / "c"), ["train-classifier", "--out", str(t / "c"), "--data-from", str(r / "base.toml"),
                                        "--data", "held_out=0.5", "--set", "epochs=1", "--no-progress"])[1],
     2, "in use by another cdm process (pid"),
    ("cdm merge while a process samples into the run",
     lambda r, t: (lock_here(sampled(r, t, "--num-shards", "2"), "sampling"), ["merge", str(t / "a")])[1],
     2, "in use by another cdm process (pid"),
    # cdm ema's options, checked before any work
    ("cdm ema with sigma_rel beyond the flat average",
     lambda r, t: ["ema", str(r / "base"), "--sigma-rel", "0.05,0.3", "--out", str(t / "e")],
     2, "--sigma-rel 0.3 is out of range: each relative EMA length must lie in (0, 0.2887)"),
    ("cdm ema with sigma_rel 0", lambda r, t: ["ema", str(r / "base"), "--sigma-rel", "0", "--out", str(t / "e")],
     2, "--sigma-rel 0 is out of range"),
    ("cdm ema at a step without a snapshot",
     lambda r, t: ["ema", str(r / "base"), "--sigma-rel", "0.1", "--step", "99", "--out", str(t / "e")],
     2, "no EMA snapshot at step 99 in"),
    ("cdm ema of a run trained without snapshots",
     lambda r, t: ["ema", str(r / "sr"), "--sigma-rel", "0.1", "--out", str(t / "e")],
     2, "has no EMA snapshots (no ema/step-*.safetensors); train it with train.ema_profiles set"),
    ("cdm ema of a run that does not exist",
     lambda r, t: ["ema", str(t / "none"), "--sigma-rel", "0.1", "--out", str(t / "e")], 2, "does not exist"),
    ("cdm ema --out a file",
     lambda r, t: ["ema", str(r / "base"), "--sigma-rel", "0.1", "--out", str(a_file(t))],
     2, "is a file: name a directory"),
    # cdm distill: the record of its teacher and settings, and the teacher it is given
    ("cdm distill into rounds of other settings",
     lambda r, t: ["distill", str(r / "base"), "--out", str(distilled(r, t)), *DISTIL, "--lr", "0.01"],
     2, "holds rounds distilled from " + "{runs}/base/checkpoints/step-00000003.safetensors with --lr 0.0001; use "
        "another --out, or --fresh"),
    ("cdm distill into rounds of another teacher",
     lambda r, t: ["distill", str(diverged_copy(r, t)), "--out", str(distilled(r, t)), *DISTIL],
     2, "holds rounds distilled from {runs}/base/checkpoints/step-00000003.safetensors with the same settings"),
    ("cdm distill --out the teacher's run directory",
     lambda r, t: ["distill", str(r / "base"), "--out", str(r / "base"), *DISTIL], 2, "lies inside --out"),
    ("cdm distill --out a file",
     lambda r, t: ["distill", str(r / "base"), "--out", str(a_file(t)), *DISTIL], 2, "is a file: name a directory"),
    ("cdm distill a distilled stage from other steps",
     lambda r, t: ["distill", str(distilled(r, t) / "steps-1"), "--out", str(t / "d2"), *DISTIL],
     2, "is a stage distilled for 1 DDIM steps: distil it further with --from-steps 1"),
    ("cdm distill with steps that do not halve to the end",
     lambda r, t: ["distill", str(r / "base"), "--out", str(t / "d"), "--steps", "3", "--from-steps", "8"],
     2, "must be a power of two"),
    # cdm train-classifier: settings that cannot train, an --out that is a file (refused before training)
    ("cdm train-classifier with a negative learning rate",
     lambda r, t: ["train-classifier", "--out", str(t / "c"), "--data-from", str(r / "base.toml"), "--data",
                   "held_out=0.5", "--set", "lr=-1"], 2, "classifier setting lr must be a number > 0, got -1.0"),
    ("cdm train-classifier with batch size 0",
     lambda r, t: ["train-classifier", "--out", str(t / "c"), "--data-from", str(r / "base.toml"), "--data",
                   "held_out=0.5", "--set", "batch_size=0"], 2, "classifier setting batch_size must be >= 1, got 0"),
    ("cdm train-classifier --out a file",
     lambda r, t: ["train-classifier", "--out", str(a_file(t)), "--data-from", str(r / "base.toml"), "--data",
                   "held_out=0.5", "--set", "epochs=1"], 2, "File exists ({tmp}/f); the path is a file, not a "
                                                            "directory: name a directory"),
    ("cdm ema --out under a file",
     lambda r, t: ["ema", str(r / "base"), "--sigma-rel", "0.1", "--out", str(a_file(t) / "e")],
     2, "ema: cannot use the path: Not a directory ({tmp}/f/e); a part of it is a file, not a directory"),
    # cdm merge of what is no sharded run
    ("cdm merge of a plain sample run",
     lambda r, t: ["merge", str(sampled(r, t))], 2,
     "was not sharded (its samples.npz is whole): there is nothing to merge"),
    ("cdm merge of a directory that does not exist",
     lambda r, t: ["merge", str(t / "none")], 2, "is not a directory: give the --out of 'cdm sample --num-shards K'"),
    # cdm train into another command's output
    ("cdm train into a distillation",
     lambda r, t: ["train", str(r / "base.toml"), "--out", str(distilled(r, t)), "--no-progress"],
     2, "holds a distillation (cdm distill), not a training run"),
    ("cdm train into a distilled round",
     lambda r, t: ["train", str(r / "base.toml"), "--out", str(distilled(r, t) / "steps-1"), "--no-progress"],
     2, "steps-1 holds a distilled stage (cdm distill), not a training run: sample it with cdm sample --stage"),
    ("cdm train --fresh into a distilled round",
     lambda r, t: ["train", str(r / "base.toml"), "--out", str(distilled(r, t) / "steps-1"), "--fresh",
                   "--no-progress"],
     2, "holds a distilled stage (cdm distill), not a training run"),
    ("cdm train into post-hoc EMA exports",
     lambda r, t: ["train", str(r / "base.toml"), "--out", str(exported(r, t)), "--no-progress"],
     2, "holds post-hoc EMA exports (cdm ema), not a training run"),
    # NaN from a guidance weight far too large is not blamed on the weights
    ("sampling with a guidance weight too large",
     lambda r, t: ["sample", "--stage", str(r / "base"), "--out", str(t / "s"), "--n", "2", "--steps", "2",
                   "--guidance", "1e300"],
     2, "the guidance weight w=1e+300 is too large; lower --guidance or use --threshold dynamic"),
]
CASES += WRITERS


def damage(runs: Path, tmp: Path) -> None:
    run = tmp / "broken"
    (run / "checkpoints").mkdir(parents=True)
    src = list_checkpoints(runs / "base")[-1][1]
    data = bytearray(src.read_bytes())
    data[-100] ^= 0xFF
    (run / "checkpoints" / src.name).write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("name,setup,status,fragment", CASES, ids=[c[0] for c in CASES])
def test_fault_table(name, setup, status, fragment, runs, tmp_path, capsys):
    procs = []
    real_popen = subprocess.Popen

    def track(*a, **k):
        p = real_popen(*a, **k)
        procs.append(p)
        return p

    subprocess.Popen = track
    try:
        argv = setup(runs, tmp_path)
    finally:
        subprocess.Popen = real_popen
    try:
        capsys.readouterr()
        assert main(argv) == status
        err = capsys.readouterr().err
        assert err.startswith("cdm: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert fragment.replace("{runs}", str(runs)).replace("{tmp}", str(tmp_path)) in err, err
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=10)
        while _HELD:
            _HELD.pop().release()


def test_an_augmentation_level_above_the_trained_range_warns(runs, tmp_path, capsys):
    # the tiny SR stage trained on s in 0..25 (augment.s_max) of its 50-step process
    with pytest.warns(UserWarning, match=r"above the levels this stage was trained on \(augment.s_max = 25\)"):
        assert main(["sample", "--stage", str(runs / "base"), "--stage", str(runs / "sr"), "--out",
                     str(tmp_path / "s"), "--n", "2", "--steps", "1", "--levels", "0,40"]) == 0


def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_intact_one(runs, tmp_path, toy_npz):
    run = tmp_path / "run"
    cfg = write_tiny(tmp_path, toy_npz, "base", 8, 0, "none")
    assert main(["train", str(cfg), "--out", str(run), "--no-progress", "--set=train.ckpt_every=1",
                 "--set=train.keep_checkpoints=3"]) == 0
    newest = list_checkpoints(run)[-1][1]
    newest.write_bytes(newest.read_bytes()[:-64])  # truncated, e.g. by a copy that did not finish
    with pytest.warns(UserWarning, match="skipping .*step-00000003.*before it"):
        assert main(["sample", "--stage", str(run), "--out", str(tmp_path / "s"), "--n", "2", "--steps", "1"]) == 0
    with pytest.warns(UserWarning, match="skipping"):  # training resumes from step 2, re-does step 3
        assert main(["train", str(cfg), "--out", str(run), "--no-progress", "--set=train.ckpt_every=1",
                     "--set=train.keep_checkpoints=3"]) == 0
    assert load_checkpoint(list_checkpoints(run)[-1][1]).step == 3


def test_the_logged_loss_after_a_resume_is_the_mean_over_the_steps_it_covers(tmp_path, toy_npz, one_thread):
    """log_every = 2 does not divide ckpt_every = 3: after resuming at step 3 the first window holds
    one step (step 4); its loss must be that step's, as in an uninterrupted run."""
    cfg = write_tiny(tmp_path, toy_npz, "base", 8, 0, "none")
    common = ["--no-progress", "--set=train.ckpt_every=3", "--set=train.log_every=2"]
    assert main(["train", str(cfg), "--out", str(tmp_path / "whole"), "--set=train.steps=6", *common]) == 0
    assert main(["train", str(cfg), "--out", str(tmp_path / "cut"), "--set=train.steps=3", *common]) == 0
    assert main(["train", str(cfg), "--out", str(tmp_path / "cut"), "--set=train.steps=6", *common]) == 0

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                if "loss" in r}

    whole, cut = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    # uninterrupted: windows end at 2, 4, 6; resumed: 2, 3 (the end of the first run), then 4 (one step), 6
    assert cut[2] == pytest.approx(whole[2], rel=1e-5) and cut[6] == pytest.approx(whole[6], rel=1e-5)
    assert (cut[3] + cut[4]) / 2 == pytest.approx(whole[4], rel=1e-5)  # steps 3 and 4, each logged alone


def test_files_are_written_with_the_users_umask(runs, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["sample", "--stage", str(runs / "base"), "--out", str(tmp_path / "s"), "--n", "2",
                     "--steps", "1"]) == 0
    finally:
        os.umask(old)
    for name in ("samples.npz", "cascade.json"):
        assert (tmp_path / "s" / name).stat().st_mode & 0o777 == 0o644, name
    ck = list_checkpoints(runs / "base")[-1][1]
    assert ck.stat().st_mode & 0o044  # readable by group and others under the usual umask


def test_a_real_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """A 256 KiB tmpfs (needs the right to mount; skipped otherwise): the second, larger checkpoint
    does not fit; the error is one line and the first checkpoint is intact."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        cfg = tiny_config(steps=50)
        path = checkpoint_path(mnt, 1)
        save_checkpoint(path, Checkpoint(config=cfg, step=1, model={"w": torch.zeros(1000)}, ema={"w": torch.zeros(1000)}))
        with pytest.raises(CheckpointError, match="No space left on device.*earlier checkpoints are intact"):
            save_checkpoint(path, Checkpoint(config=cfg, step=2, model={"w": torch.zeros(100_000)},
                                             ema={"w": torch.zeros(100_000)}))
        assert load_checkpoint(path).step == 1
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
