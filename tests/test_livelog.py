"""Live logs: training writes TensorBoard event files that read back as log.jsonl says, and trains
as before when the tensorboard package is missing or the logs are switched off."""

from __future__ import annotations

import json
import os
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from cdm import livelog
from cdm.checkpoint import list_checkpoints
from cdm.livelog import LiveLog, NoLiveLog, open_live_log
from cdm.train import train_stage

from conftest import toy_images
from test_train import make_cfg


def read_events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_training_writes_tensorboard_scalars_and_grids(tmp_path):
    pytest.importorskip("tensorboard")
    data = toy_images(16, 16)
    run = tmp_path / "run"
    train_stage(make_cfg(4, sample_every=2), run, progress=False, data=data)
    acc = read_events(run / "tb")
    tags = acc.Tags()
    assert {"train/loss", "train/grad_norm", "train/lr", "train/img_per_s", "train/consistency_psnr_db",
            "train/copy_psnr_db"} <= set(tags["scalars"]), tags
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in lines if "loss" in r}
    assert {e.step: e.value for e in acc.Scalars("train/loss")} == pytest.approx(loss, rel=1e-6)
    psnr = {r["step"]: r["consistency_psnr_db"] for r in lines if "samples" in r}
    assert {e.step: e.value for e in acc.Scalars("train/consistency_psnr_db")} == pytest.approx(psnr, rel=1e-6)
    grids = acc.Images("train/samples")
    assert [e.step for e in grids] == [2, 4] and grids[0].width >= 64 * 4  # 8px tiles shown >= 64px each

    # A run resumed from an earlier checkpoint logs the later steps again: TensorBoard keeps one of each.
    list_checkpoints(run)[-1][1].unlink()  # as if killed after step 4 was logged but before it was saved
    (run / "good.json").unlink(missing_ok=True)
    train_stage(make_cfg(4, sample_every=2), run, progress=False, data=data)
    assert [e.step for e in read_events(run / "tb").Scalars("train/loss")] == [1, 2, 3, 4]
    # --fresh starts the live log over as well
    train_stage(make_cfg(2), run, progress=False, data=data, fresh=True)
    assert [e.step for e in read_events(run / "tb").Scalars("train/loss")] == [1, 2]


def test_images_from_arrays(tmp_path):
    pytest.importorskip("tensorboard")
    live = LiveLog(tmp_path / "tb")
    live.image(0, "chw", torch.zeros(3, 4, 5, dtype=torch.uint8))
    live.image(0, "hw", np.zeros((4, 5), np.uint8))
    live.scalars(0, {"x": 1.5, "step": 0, "time": 1e9, "name": "a", "bad": float("nan")})
    live.close()
    acc = read_events(tmp_path / "tb")
    assert [(e.width, e.height) for t in ("train/chw", "train/hw") for e in acc.Images(t)] == [(5, 4), (5, 4)]
    assert acc.Tags()["scalars"] == ["train/x"]


def test_training_without_tensorboard_runs_and_says_so_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it now fails
    monkeypatch.setattr(livelog, "_told", False)
    data = toy_images(16, 16)
    with pytest.warns(UserWarning, match=r"live logs are off .*pip install tensorboard.*train.tensorboard=false"):
        train_stage(make_cfg(2), tmp_path / "a", progress=False, data=data)
    assert not (tmp_path / "a" / "tb").exists() and (tmp_path / "a" / "log.jsonl").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process, not once per stage
        assert isinstance(open_live_log(tmp_path / "b"), NoLiveLog)


def test_switched_off(tmp_path, monkeypatch):
    monkeypatch.setattr(livelog, "_told", False)
    data = toy_images(16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off, the live logs say nothing (the stage's own warnings aside)
        warnings.filterwarnings("ignore", message=".*without label dropout")
        train_stage(make_cfg(2, tensorboard=False), tmp_path / "r", progress=False, data=data)
    assert not (tmp_path / "r" / "tb").exists()


def _one_warning(record, match: str) -> None:
    lines = [str(w.message) for w in record if "live logs" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert __import__("re").search(match, lines[0]), lines[0]


def test_a_tb_dir_that_cannot_be_written_turns_live_logs_off_and_training_goes_on(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    run.mkdir()
    (run / "tb").write_text("a file where the event files' directory belongs")  # unwritable, even for root
    with pytest.warns(UserWarning) as record:
        last = train_stage(make_cfg(2), run, progress=False, data=toy_images(16, 16))
    _one_warning(record, r"live logs are off \((FileExistsError|NotADirectoryError).*training goes on")
    assert last.is_file() and len((run / "log.jsonl").read_text().splitlines()) == 2


def test_a_read_only_tb_dir_turns_live_logs_off(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb").chmod(0o500)
    try:
        import torch.utils.tensorboard as tb

        def refuse(self, *a, **k):  # root may write anywhere: the refusal a read-only tb/ gives others
            raise PermissionError(13, "Permission denied", str(tmp_path / "tb"))

        if os.geteuid() == 0:
            monkeypatch.setattr(tb.SummaryWriter, "__init__", refuse)
        with pytest.warns(UserWarning) as record:
            assert isinstance(open_live_log(tmp_path), NoLiveLog)
        _one_warning(record, r"live logs are off \(PermissionError.*Permission denied")
    finally:
        (tmp_path / "tb").chmod(0o700)


def test_a_broken_tensorboard_install_turns_live_logs_off(tmp_path, monkeypatch):
    broken = types.ModuleType("torch.utils.tensorboard")

    class SummaryWriter:  # e.g. a protobuf that does not match the tensorboard package
        def __init__(self, *a, **k):
            raise TypeError("Descriptors cannot be created directly")

    broken.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", broken)
    with pytest.warns(UserWarning) as record:
        last = train_stage(make_cfg(2), tmp_path / "run", progress=False, data=toy_images(16, 16))
    _one_warning(record, r"live logs are off \(TypeError: Descriptors")
    assert last.is_file()


def test_a_write_error_mid_run_turns_live_logs_off_once_and_training_finishes(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    calls = []

    def add_scalar(self, *a, **k):
        calls.append(a)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    with pytest.warns(UserWarning) as record:
        last = train_stage(make_cfg(4), tmp_path / "run", progress=False, data=toy_images(16, 16))
    _one_warning(record, r"live logs are off from now on \(OSError: .*No space left.*training goes on")
    assert last.is_file() and len(calls) == 4  # nothing written after the failure
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 4
