"""The command line: help, a tiny train -> sample run, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cdm.cli import main
from cdm.config import ConfigError

TINY = """
name = "{name}"
resolution = {res}
lowres_resolution = {lowres}
[data]
source = "npz"
path = "{npz}"
resolution = 16
[unet]
base_channels = 8
channel_mult = [1, 2]
num_res_blocks = 1
attention_resolutions = []
[diffusion]
steps = 50
[augment]
kind = "{aug}"
steps = 50
s_max = 25
[train]
steps = 3
batch_size = 4
precision = "fp32"
sample_every = 0
sample_steps = 2
"""


@pytest.mark.slow
def test_help():
    r = subprocess.run([sys.executable, "-m", "cdm.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout and "sample" in r.stdout and "demo" in r.stdout
    for cmd in ("train", "sample", "demo", "presets"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0


def write_tiny(tmp_path, toy_npz, name, res, lowres, aug):
    p = tmp_path / f"{name}.toml"
    p.write_text(TINY.format(name=name, res=res, lowres=lowres, npz=toy_npz, aug=aug))
    return p


def test_train_then_sample(tmp_path, toy_npz, capsys):
    base = write_tiny(tmp_path, toy_npz, "base", 8, 0, "none")
    sr = write_tiny(tmp_path, toy_npz, "sr", 16, 8, "gaussian")
    assert main(["train", str(base), "--out", str(tmp_path / "base"), "--no-progress"]) == 0
    assert main(["train", str(sr), "--out", str(tmp_path / "sr"), "--no-progress", "--set", "train.steps=2"]) == 0
    assert json.loads((tmp_path / "sr" / "config.json").read_text())["train"]["steps"] == 2
    out = tmp_path / "samples"
    assert main(["sample", "--stage", str(tmp_path / "base"), "--stage", str(tmp_path / "sr"), "--out", str(out),
                 "--n", "6", "--steps", "3", "--levels", "0,10", "--mode", "truncated"]) == 0
    assert (out / "stage0-8px.png").exists() and (out / "stage1-16px.png").exists()
    z = np.load(out / "samples.npz")
    assert z["stage1"].shape == (6, 1, 16, 16) and z["stage1"].dtype == np.uint8
    assert z["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    # the cascade file of what was sampled: the same command from it gives the same samples
    from cdm.cascade_file import read_cascade_file
    paths, plan = read_cascade_file(out / "cascade.json")
    assert plan.mode == "truncated" and plan.levels == [0, 10] and [st.steps for st in plan.stages] == [3, 3]
    assert main(["sample", "--cascade", str(out / "cascade.json"), "--out", str(out / "again"), "--n", "6"]) == 0
    assert np.array_equal(np.load(out / "again" / "samples.npz")["stage1"], z["stage1"])
    # grids show at most 100 samples; samples.npz holds them all
    assert main(["sample", "--stage", str(tmp_path / "base"), "--out", str(out / "many"), "--n", "130",
                 "--steps", "1", "--batch-size", "130"]) == 0
    from PIL import Image
    assert np.load(out / "many" / "samples.npz")["stage0"].shape[0] == 130
    w, h = Image.open(out / "many" / "stage0-8px.png").size
    rows = -(-100 // 3)  # 100 samples, a column per class, 8px tiles with 2px gaps, enlarged 8x
    assert (w, h) == ((3 * 10 + 2) * 8, (rows * 10 + 2) * 8)
    # The float32 switch: the same samples up to bf16 rounding.
    assert main(["sample", "--stage", str(tmp_path / "base"), "--stage", str(tmp_path / "sr"), "--out", str(out / "bf16"),
                 "--n", "6", "--steps", "3", "--levels", "0,10", "--mode", "truncated", "--precision", "bf16"]) == 0
    z16 = np.load(out / "bf16" / "samples.npz")
    assert np.abs(z16["stage1"].astype(int) - z["stage1"].astype(int)).mean() < 8
    from cdm.cascade_file import load_cascade
    assert {s.precision for s in load_cascade([tmp_path / "base", tmp_path / "sr"], precision="bf16").stages} == {"bf16"}
    with pytest.raises(ConfigError, match="precision"):
        load_cascade([tmp_path / "base"], precision="fp16")
    capsys.readouterr()
    assert main(["train", str(base), "--out", str(tmp_path / "x"), "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["unet"]["num_classes"] == 3 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv,message", [
    (["train", "fmnist-base", "--out", "{tmp}/r"], "did you mean fmnist-base8"),
    (["train", "fmnist-base8", "--out", "{tmp}/r", "--set", "train.setps=3"], "did you mean train.steps"),
    (["train", "fmnist-base8", "--out", "{tmp}/r", "--set", "data.path={tmp}/none"], "dataset-fashion-mnist"),
    (["sample", "--stage", "{tmp}/none", "--out", "{tmp}/s"], "does not exist"),
    (["sample", "--out", "{tmp}/s"], "either --cascade"),
    (["sample", "--cascade", "{tmp}/c.json", "--out", "{tmp}/s"], "does not exist"),
])
def test_bad_input_exits_with_a_clear_error(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdm: error:") and message in err and "Traceback" not in err


def test_sample_refuses_mismatched_stages(tmp_path, toy_npz, capsys):
    base = write_tiny(tmp_path, toy_npz, "base", 8, 0, "none")
    sr = write_tiny(tmp_path, toy_npz, "sr4", 16, 4, "gaussian")
    main(["train", str(base), "--out", str(tmp_path / "base"), "--no-progress"])
    main(["train", str(sr), "--out", str(tmp_path / "sr"), "--no-progress"])
    assert main(["sample", "--stage", str(tmp_path / "base"), "--stage", str(tmp_path / "sr"),
                 "--out", str(tmp_path / "s")]) == 2
    assert "expects 4px inputs but the stage below makes 8px" in capsys.readouterr().err
    assert main(["sample", "--stage", str(tmp_path / "base"), "--out", str(tmp_path / "s"), "--classes", "9"]) == 2
    assert "class labels must lie in [0, 2]" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    assert main(["sample", "--stage", str(tmp_path / "junk.safetensors"), "--out", str(tmp_path / "s")]) == 2
    assert "corrupt" in capsys.readouterr().err
