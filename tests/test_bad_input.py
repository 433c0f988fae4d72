"""Bad input: each case ends the CLI with exit status 2 and one clear line on stderr."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from cdm.data import DataConfig, DataError, load_dataset

from test_cli import write_tiny
from test_faults import cli_error, save_tiny


def image_folder(root, bad: bool = True):
    """Two classes of small PNGs; with ``bad``, a truncated JPEG and a text file named .png too."""
    from PIL import Image

    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (16, 16), 60 + 100 * i).save(root / cls / f"{i}.png")
    if bad:
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "JPEG")
        (root / "a" / "cut.jpg").write_bytes(buf.getvalue()[:300])
        (root / "b" / "notes.png").write_text("not an image")
    (root / "b" / "README.txt").write_text("not an image suffix: ignored")
    return root


def test_an_image_folder_with_bad_files_skips_them_with_a_count_or_fails(tmp_path, toy_npz, capsys):
    root = image_folder(tmp_path / "imgs")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\)"):
        data = load_dataset(DataConfig(source="folder", path=str(root), resolution=16, split="all"))
    assert data.images.shape == (4, 1, 16, 16) and data.labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(DataError, match="cannot read image .*cut.jpg"):
        load_dataset(DataConfig(source="folder", path=str(root), resolution=16, on_bad="fail"))
    cfg = write_tiny(tmp_path, toy_npz, "base", 8, 0, "none")
    err = cli_error(capsys, ["train", str(cfg), "--out", str(tmp_path / "r"), "--set", "data.source=folder",
                             "--set", f"data.path={root}", "--set", "data.on_bad=fail"])
    assert "cannot read image" in err and "data.on_bad=skip" in err
    assert "data.on_bad must be 'skip' or 'fail'" in cli_error(
        capsys, ["train", str(cfg), "--out", str(tmp_path / "r"), "--set", "data.on_bad=ignore"])


@pytest.mark.parametrize("case,message", [
    ("missing npz", "does not exist"),
    ("truncated npz", "is it a complete .npz file"),
    ("not an npz", "is it a complete .npz file"),
    ("RGBA npz", r"C in (1, 3)"),
    ("two channels", "data.channels must be 0 (as stored), 1 (grayscale) or 3 (RGB)"),
    ("missing fashion-mnist", "apt-get install dataset-fashion-mnist"),
    ("unknown key in a file", "unknown config key train.stpes; did you mean train.steps?"),
    ("sample_level above T", "train.sample_level: augmentation level s must be an integer in [0, 50]"),
])
def test_bad_training_input(case, message, tmp_path, toy_npz, capsys):
    cfg = write_tiny(tmp_path, toy_npz, "sr", 16, 8, "gaussian")
    sets = {"missing npz": [f"data.path={tmp_path}/none.npz"],
            "truncated npz": [f"data.path={tmp_path}/cut.npz"],
            "not an npz": [f"data.path={tmp_path}/text.npz"],
            "RGBA npz": [f"data.path={tmp_path}/rgba.npz"],
            "two channels": ["data.channels=2"],
            "missing fashion-mnist": ["data.source=fashion-mnist", f"data.path={tmp_path}"],
            "unknown key in a file": [],
            "sample_level above T": ["train.sample_level=51"]}[case]
    (tmp_path / "cut.npz").write_bytes(toy_npz.read_bytes()[:200])
    (tmp_path / "text.npz").write_text("images")
    np.savez(tmp_path / "rgba.npz", images=np.zeros((4, 16, 16, 4), np.uint8))
    if case == "unknown key in a file":
        cfg.write_text(cfg.read_text().replace("steps = 3", "stpes = 3"))
    argv = ["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]
    assert message in cli_error(capsys, argv + [a for kv in sets for a in ("--set", kv)])


@pytest.mark.parametrize("extra,message", [
    (["--levels", "0,51"], "augmentation level s must be an integer in [0, 50], got 51"),
    (["--levels", "0,-1"], "augmentation level s must be an integer in [0, 50], got -1"),
    (["--levels", "5,10"], "the base stage has no augmentation level"),
    (["--classes", "4"], "class labels must lie in [0, 2] (or 3 for 'no class')"),
    (["--classes", "-1"], "class labels must lie in [0, 2]"),
    (["--shard", "0"], "--shard I needs --num-shards K"),
    (["--num-shards", "2", "--shard", "2"], "shard 2 does not exist: the run has shards 0..1"),
    (["--num-shards", "9"], "--num-shards must lie in [1, 4]"),
])
def test_bad_sampling_input(extra, message, tmp_path, capsys):
    base = save_tiny(tmp_path / "base.safetensors", resolution=8, name="base")
    sr = save_tiny(tmp_path / "sr.safetensors", resolution=16, lowres=8, aug="gaussian", name="sr")
    argv = ["sample", "--stage", str(base), "--stage", str(sr), "--out", str(tmp_path / "s"), "--n", "4",
            "--steps", "1", *extra]
    assert message in cli_error(capsys, argv)


def test_stages_that_do_not_fit_together(tmp_path, capsys):
    base = save_tiny(tmp_path / "base.safetensors", resolution=8, name="base")
    for name, kw, message in [
            ("sr4", dict(resolution=16, lowres=4, aug="gaussian"), "expects 4px inputs but the stage below makes 8px"),
            ("rgb", dict(resolution=16, lowres=8, aug="gaussian", channels=3), "expects 3-channel inputs"),
            ("classes", dict(resolution=16, lowres=8, aug="gaussian", classes=5), "disagree on the number of classes"),
            ("base2", dict(resolution=16), "only the first stage may be a base stage")]:
        other = save_tiny(tmp_path / f"{name}.safetensors", name=name, **kw)
        assert message in cli_error(capsys, ["sample", "--stage", str(base), "--stage", str(other),
                                             "--out", str(tmp_path / "s")])
    assert "starts with a base stage" in cli_error(capsys, ["sample", "--stage", str(tmp_path / "sr4.safetensors"),
                                                            "--out", str(tmp_path / "s")])


def test_a_cascade_file_with_an_unknown_key(tmp_path, capsys):
    save_tiny(tmp_path / "base.safetensors", resolution=8, name="base")
    f = tmp_path / "cascade.json"
    f.write_text(json.dumps({"stages": ["base.safetensors"], "sampling": {"mdoe": "truncated"}}))
    assert "unknown config key sampling.mdoe; did you mean sampling.mode?" in cli_error(
        capsys, ["sample", "--cascade", str(f), "--out", str(tmp_path / "s")])
