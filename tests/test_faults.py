"""Faults: a run killed by SIGKILL resumes exactly; a full disk or a NaN keeps the last good
checkpoint; checkpoints are verified on load; loading one never runs code."""

from __future__ import annotations

import errno
import importlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cdm.checkpoint as checkpoint_module
import cdm.step as step_mod
from cdm.checkpoint import (Checkpoint, CheckpointError, atomic_write, checkpoint_path, list_checkpoints,
                            load_checkpoint, load_stage, save_checkpoint)
from cdm.cli import main
from cdm.stage import Stage
from cdm.train import train_stage

from conftest import tiny_config, toy_images
from test_cli import write_tiny
from test_distributed import one_thread  # noqa: F401 (fixture)
from test_train import make_cfg


def save_tiny(path: Path, step: int = 0, **kw) -> Path:
    """A checkpoint of an untrained tiny stage (no training needed to test loading)."""
    cfg = tiny_config(steps=50, **kw)
    torch.manual_seed(0)
    sd = Stage(cfg).net.state_dict()
    return save_checkpoint(path, Checkpoint(config=cfg, step=step, model=sd, ema={k: v.clone() for k, v in sd.items()}))


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit status 2 and one clear line on stderr (after the start-up summary, if
    training had begun); return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    *summary, last = err.splitlines()
    assert last.startswith("cdm: error: ") and err.endswith("\n") and "Traceback" not in err, err
    assert not summary or (summary[0].startswith("cdm train ") and "cdm: error" not in "".join(summary)), err
    return last + "\n"


def log_steps(run: Path) -> list[int]:
    """The steps of a run's loss lines (not of its config-change lines)."""
    return [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


# ----------------------------------------------------------------------------- killed runs
@pytest.mark.slow
def test_a_run_killed_at_a_random_moment_resumes_exactly(tmp_path, toy_npz, one_thread):
    cfg = write_tiny(tmp_path, toy_npz, "base", 8, 0, "none")
    common = ["--no-progress", "--set=train.ckpt_every=3", "--set=train.log_every=1", "--set=train.warmup_steps=0",
              "--set=train.lr=1e-3"]
    run = tmp_path / "killed"
    delay = random.uniform(0.0, 0.3)
    with open(tmp_path / "stderr.txt", "w") as err:
        child = subprocess.Popen([sys.executable, "-m", "cdm.cli", "train", str(cfg), "--out", str(run),
                                  "--set=train.steps=1000", *common], stdout=subprocess.DEVNULL, stderr=err,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + 120
            while not list_checkpoints(run):  # wait for a first checkpoint, then kill at a random moment
                assert child.poll() is None, (tmp_path / "stderr.txt").read_text()
                assert time.monotonic() < deadline, "no checkpoint within 120 s"
                time.sleep(0.01)
            time.sleep(delay)
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert child.returncode == -signal.SIGKILL
    kept = list_checkpoints(run)[-1][0]
    assert 3 <= kept < 24, (kept, delay)

    target = "--set=train.steps=24"
    assert main(["train", str(cfg), "--out", str(run), target, *common]) == 0  # resumes from `kept`
    assert main(["train", str(cfg), "--out", str(tmp_path / "straight"), target, *common]) == 0
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(run)
    assert a.step == b.step == 24
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]) and torch.equal(a.ema[k], b.ema[k]), (k, kept, delay)
    assert log_steps(run) == list(range(1, 25))  # steps re-run after the kill are logged once
    assert not list((run / "checkpoints").glob("*.tmp"))


# ----------------------------------------------------------------------------- full disk
def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")

    def fails_halfway(tmp: str) -> None:
        Path(tmp).write_text("par")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError):
        atomic_write(p, fails_halfway)
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_a_disk_that_fills_during_a_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch, one_thread):
    data, run = toy_images(16, 16), tmp_path / "run"
    train_stage(make_cfg(2), run, progress=False, data=data)
    good = checkpoint_path(run, 2)
    before = good.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)  # part of the file made it to disk ...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)  # ... then the disk was full

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*earlier checkpoints are intact"):
        train_stage(make_cfg(4), run, progress=False, data=data)
    assert good.read_bytes() == before and load_checkpoint(run).step == 2
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert not list((run / "checkpoints").glob("*.tmp"))
    monkeypatch.undo()  # space freed: the same call resumes
    assert train_stage(make_cfg(4), run, progress=False, data=data) == checkpoint_path(run, 4)


# ----------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_a_non_finite_step_stops_training_and_keeps_the_last_good_checkpoint(what, tmp_path, toy_npz, monkeypatch,
                                                                              capsys, one_thread):
    cfg = write_tiny(tmp_path, toy_npz, "base", 8, 0, "none")
    argv = ["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", "--set=train.steps=6",
            "--set=train.ckpt_every=2", "--set=train.log_every=1", "--set=train.keep_checkpoints=1"]
    calls = []
    if what == "loss":
        real = step_mod.batch_loss

        def poisoned(*a, **k):
            calls.append(1)
            return real(*a, **k) * (float("nan") if len(calls) == 5 else 1.0)

        monkeypatch.setattr(step_mod, "batch_loss", poisoned)
    else:
        real = torch.nn.utils.clip_grad_norm_

        def poisoned(*a, **k):
            calls.append(1)
            return real(*a, **k) * (float("inf") if len(calls) == 5 else 1.0)

        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    err = cli_error(capsys, argv)
    assert f"the {what} became {'nan' if what == 'loss' else 'inf'} at step 5" in err
    # step 2 is proven good (steps 3-4 ran finite and checkpoint 4 was written); checkpoint 4, the
    # last one before the divergence, may hold the weights that caused it: it is set aside, not deleted
    assert "last good checkpoint" in err and "step-00000002.safetensors" in err and ".diverged" in err
    run = tmp_path / "run"
    assert [s for s, _ in list_checkpoints(run)] == [2]  # kept although keep_checkpoints = 1
    assert (run / "checkpoints" / "step-00000004.safetensors.diverged").is_file()
    assert all(v.isfinite().all() for v in load_checkpoint(run).model.values())
    monkeypatch.undo()
    assert main(argv) == 0 and load_checkpoint(run).step == 6 and log_steps(run) == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- verification
def test_a_checkpoint_is_verified_on_load(tmp_path, capsys):
    p = save_tiny(tmp_path / "a.safetensors")
    load_checkpoint(p)
    raw = bytearray(p.read_bytes())
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF  # one bit-rotten byte of tensor data
    (tmp_path / "b.safetensors").write_bytes(flipped)
    with pytest.raises(CheckpointError, match="do not match its checksum"):
        load_checkpoint(tmp_path / "b.safetensors")
    (tmp_path / "c.safetensors").write_bytes(raw[:len(raw) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "c.safetensors")
    tensors, meta = load_file(p), checkpoint_module.read_metadata(p)
    save_file(tensors, tmp_path / "d.safetensors", metadata={**meta, "step": "7"})  # edited metadata
    with pytest.raises(CheckpointError, match="do not match its checksum"):
        load_checkpoint(tmp_path / "d.safetensors")
    save_file(tensors, tmp_path / "e.safetensors", metadata={**meta, "format_version": "99"})
    err = cli_error(capsys, ["sample", "--stage", str(tmp_path / "e.safetensors"), "--out", str(tmp_path / "s")])
    assert "format version 99" in err and "retrain it or use the cdm version that wrote it" in err
    old = {k: v for k, v in meta.items() if k != "checksum"}
    save_file(tensors, tmp_path / "v1.safetensors", metadata={**old, "format_version": "1"})
    with pytest.raises(CheckpointError, match="format version 1, not"):  # an older format is refused, not read
        load_checkpoint(tmp_path / "v1.safetensors")


# ----------------------------------------------------------------------------- security
class RunsCode:
    """Unpickling this writes a file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "code ran")


def test_loading_a_pickle_never_runs_it(tmp_path, toy_npz, monkeypatch, capsys):
    marker = tmp_path / "code-ran"
    pickle.loads(pickle.dumps(RunsCode(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()  # the trap is real: unpickling it runs code

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    files = [tmp_path / "model.pt", tmp_path / "disguised.safetensors", run / "checkpoints" / "step-00000001.safetensors"]
    for f in files:
        f.write_bytes(pickle.dumps({"model": RunsCode(marker)}))
    torch.save({"model": RunsCode(marker)}, tmp_path / "zipped.safetensors")  # torch's zip format
    files.append(tmp_path / "zipped.safetensors")
    (tmp_path / "old.safetensors").write_bytes(pickle.dumps({"model": RunsCode(marker)}, protocol=0))

    def never(*a, **k):
        raise AssertionError("something tried to unpickle a file")

    importlib.import_module("torch._dynamo")  # it subclasses pickle.Unpickler when first imported: not after the stub

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, never)
    for f in files:
        with pytest.raises(CheckpointError, match="never unpickles files, because unpickling can run arbitrary code"):
            load_checkpoint(f)
        with pytest.raises(CheckpointError, match="never unpickles"):
            load_stage(f)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(tmp_path / "old.safetensors")
    assert "never unpickles" in cli_error(capsys, ["sample", "--stage", str(files[0]), "--out", str(tmp_path / "s")])
    cfg = write_tiny(tmp_path, toy_npz, "base", 8, 0, "none")
    assert "never unpickles" in cli_error(capsys, ["train", str(cfg), "--out", str(run), "--no-progress"])
    assert not marker.exists()


def test_a_checkpoint_whose_header_length_starts_with_the_pickle_byte_still_loads(tmp_path):
    """A safetensors file begins with its header's length; when that length is 128 mod 256 its first
    byte is 0x80, the pickle opcode. It is still a checkpoint, not a pickle."""
    cfg = tiny_config()
    stage = Stage(cfg)
    for k in range(256):
        path = save_checkpoint(tmp_path / "c.safetensors", Checkpoint(
            config=cfg, step=k, model=stage.net.state_dict(), ema={}, extra={"pad": "x" * k}))
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        raise AssertionError("no padding gave a header length of 128 mod 256")
    assert load_checkpoint(path).step == k
