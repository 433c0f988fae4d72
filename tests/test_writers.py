"""What writers say when a write fails, by errno, and the names and records of cdm ema's files."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from cdm.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from cdm.config import ConfigError
from cdm.ema import check_sigma_rels, export_name
from cdm.errors import os_error_message

from conftest import tiny_config


@pytest.mark.parametrize("code,advice", [
    (errno.ENOSPC, "free some disk space"),
    (errno.EDQUOT, "the disk quota is used up"),
    (errno.EROFS, "the file system is read-only; choose another path"),
    (errno.EACCES, "check its permissions, or choose another path"),
    (errno.EPERM, "check its permissions, or choose another path"),
    (errno.ENOTDIR, "a part of it is a file, not a directory: name a directory"),
    (errno.EEXIST, "the path is a file, not a directory: name a directory (e.g. another --out)"),
    (errno.EISDIR, "the path is a directory; give a file"),
])
def test_each_errno_gets_its_own_advice(code, advice):
    line = os_error_message(OSError(code, os.strerror(code), "runs/x"), "ema")
    assert advice in line and "\n" not in line and line.startswith("ema: ") and "(runs/x)" in line
    if code != errno.ENOSPC and code != errno.EDQUOT:
        assert "disk space" not in line, line


@pytest.mark.parametrize("code,advice,not_said", [
    (errno.EEXIST, "name a directory", "free disk space"),
    (errno.ENOTDIR, "name a directory", "free disk space"),
    (errno.EROFS, "read-only", "free disk space"),
    (errno.ENOSPC, "free some disk space", "name a directory"),
])
def test_a_checkpoint_that_cannot_be_written_says_why(tmp_path, monkeypatch, code, advice, not_said):
    import cdm.checkpoint as ck

    def fail(*a, **k):
        raise OSError(code, os.strerror(code), str(tmp_path / "x"))

    monkeypatch.setattr(ck, "save_file", fail)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path / "c.safetensors", Checkpoint(config=tiny_config(), step=1, model={},
                                                               ema={"w": torch.zeros(2)}))
    assert advice in str(e.value) and not_said not in str(e.value) and "earlier checkpoints are intact" in str(e.value)


def test_a_checkpoint_under_a_file_is_not_blamed_on_the_disk(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="name a directory") as e:
        save_checkpoint(tmp_path / "f" / "c.safetensors", Checkpoint(config=tiny_config(), step=1, model={},
                                                                     ema={"w": torch.zeros(2)}))
    assert "disk space" not in str(e.value)


def test_sigma_rels_are_checked_deduplicated_and_named_exactly():
    assert check_sigma_rels([0.05, 0.050, 0.1, 0.05]) == [0.05, 0.1]
    for bad in ([0.0], [-0.1], [0.2887], [0.3], [float("nan")], [float("inf")], []):
        with pytest.raises(ConfigError):
            check_sigma_rels(bad)
    assert export_name(0.05) == "ema-0.050.safetensors" and export_name(0.2) == "ema-0.200.safetensors"
    values = [0.05, 0.0501, 0.05001, 0.0504999, 1e-5, 0.123456789]
    names = [export_name(v) for v in values]
    assert len(set(names)) == len(names), names  # distinct values never share a file
    assert names[1] == "ema-0.0501.safetensors"
    assert [float(n[4:-12]) for n in names] == values  # the name gives the value back exactly


def test_an_export_records_what_made_it(tmp_path, capsys):
    from cdm.cli import main
    from cdm.train import train_stage

    from conftest import toy_images

    cfg = tiny_config(steps=50, ema_profiles=[0.05, 0.1], ema_snapshot_every=1)
    cfg.train.steps = 2
    run = tmp_path / "run"
    train_stage(cfg, run, progress=False, data=toy_images(16, 8))
    assert main(["ema", str(run), "--sigma-rel", "0.07,0.070,0.0701", "--out", str(tmp_path / "e")]) == 0
    assert sorted(p.name for p in (tmp_path / "e").glob("*.safetensors")) == ["ema-0.070.safetensors",
                                                                              "ema-0.0701.safetensors"]
    info = load_checkpoint(tmp_path / "e" / "ema-0.0701.safetensors").extra["posthoc_ema"]
    assert (info["sigma_rel"], info["step"], info["run"]) == (0.0701, 2, str(run.resolve()))
    assert sum(p["weight"] for p in info["profiles"]) == pytest.approx(1.0, abs=0.05)
