"""Live logs: training writes TensorBoard event files that read back as log.jsonl says, and trains
as before when the tensorboard package is missing or the logs are switched off."""

from __future__ import annotations

import json
import sys
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
