"""One way to name a stage's config everywhere (a preset, a config file, a run directory or its
config.json), presets that fit small photos and can be guided, and cascade files that survive a move."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from cdm.cascade_file import read_cascade_file, write_cascade_file
from cdm.cascade import SamplingPlan
from cdm.cli import main
from cdm.config import list_presets, load_stage_config, read_preset

from test_cli import write_tiny


def small_photos(root, per_class: int = 5):
    """``root/red`` and ``root/blue``: 32 px and larger RGB photos (two classes by colour)."""
    from PIL import Image

    g = np.random.default_rng(0)
    for c, name in enumerate(("red", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            a = g.integers(0, 80, size=(32 + 4 * (i % 2), 32 + 2 * i, 3), dtype=np.uint8)
            a[..., 0 if c == 0 else 2] += 150
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A trained tiny base stage (2 steps) on a toy .npz: a run directory with config.json."""
    from conftest import toy_images

    tmp = tmp_path_factory.mktemp("run")
    data = toy_images(80, 16)  # enough for a held-out split the classifier tests on
    npz = tmp / "toy.npz"
    np.savez(npz, images=data.images.numpy(), labels=data.labels.numpy())
    cfg = write_tiny(tmp, npz, "base", 8, 0, "none")
    assert main(["train", str(cfg), "--out", str(tmp / "base"), "--no-progress", "--set", "train.steps=2"]) == 0
    return tmp / "base"


def test_a_run_directory_or_its_config_json_names_a_stage_config(tiny_run, tmp_path, capsys):
    saved = json.loads((tiny_run / "config.json").read_text())
    assert saved["unet"]["resolution"] == 8 and saved["data"]["class_names"]  # derived keys it holds
    for source in (tiny_run, tiny_run / "config.json"):
        cfg = load_stage_config(str(source), ["train.steps=7"])
        assert cfg.resolution == 8 and cfg.train.steps == 7 and cfg.data.path == saved["data"]["path"]
        assert cfg.data.class_names == [] and cfg.data.fingerprint == ""  # derived again from the data
    # the same name works in train (a new run from an old run's config) and train-classifier
    assert main(["train", str(tiny_run), "--out", str(tmp_path / "again"), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["unet"]["num_classes"] == saved["unet"]["num_classes"]
    assert main(["train-classifier", "--data-from", str(tiny_run / "config.json"), "--out", str(tmp_path / "clf"),
                 "--set", "epochs=1", "--set", "width=8", "--set", "min_steps=2", "--no-progress"]) == 0
    assert (tmp_path / "clf" / "classifier.safetensors").is_file()


def test_a_hand_written_config_still_may_not_set_derived_keys(tmp_path, capsys):
    f = tmp_path / "mine.toml"
    f.write_text('[unet]\nresolution = 8\n')
    assert main(["train", str(f), "--out", str(tmp_path / "r"), "--dry-run"]) == 2
    assert "unet.resolution is derived" in capsys.readouterr().err
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory without config.json: name a run directory" in err


def test_every_class_conditional_cascade_preset_can_be_guided():
    for name in list_presets():
        cfg = load_stage_config(name)
        if cfg.class_conditional and name != "fmnist-single32":  # the studies' unguided single-model baseline
            assert cfg.train.p_uncond > 0, name
            assert cfg.data.fit != "resize-up", name  # no preset enlarges images


def test_folder_presets_cover_32_64_and_256_px_sources():
    tops = {}
    for name in list_presets():
        d = read_preset(name)
        if d["data"]["source"] == "folder":
            tops.setdefault(d["data"]["resolution"], []).append((d.get("lowres_resolution", 0), d["resolution"]))
    assert (0, 8) in tops[32] and (8, 32) in tops[32]  # an 8 -> 32 cascade for 32 px photos
    assert (0, 16) in tops[64] and (16, 64) in tops[64]  # a 16 -> 64 cascade for 64 px photos
    assert (64, 256) in tops[256] and read_preset("folder-sr64to256")["train"]["crop"]  # trained on crops


def test_32px_photos_train_a_guidable_cascade_from_the_presets_as_they_are(tmp_path, capsys):
    """The route a user with 32 px colour photos takes: no resolution overridden (only the network's
    width and the run's length, to keep the test fast), then guided sampling."""
    photos = small_photos(tmp_path / "photos")
    fast = ["train.steps=1", "train.batch_size=4", "train.sample_every=0", "train.precision=fp32",
            "data.split=all", "unet.base_channels=16", f"data.path={photos}"]
    for preset in ("folder-base8", "folder-sr8to32"):
        assert main(["train", preset, "--out", str(tmp_path / preset), "--no-progress",
                     *[a for kv in fast for a in ("--set", kv)]]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained with label dropout: guidance raises no warning
        assert main(["sample", "--stage", str(tmp_path / "folder-base8"), "--stage", str(tmp_path / "folder-sr8to32"),
                     "--out", str(tmp_path / "s"), "--n", "2", "--steps", "1", "--levels", "0,100",
                     "--guidance", "1,1", "--classes", "red,blue"]) == 0
    z = np.load(tmp_path / "s" / "samples.npz")
    assert z["stage1"].shape == (2, 3, 32, 32) and z["labels"].tolist() == [1, 0]  # classes sorted: blue, red


def test_a_cascade_file_names_its_checkpoints_relative_to_itself_and_survives_a_move(tiny_run, tmp_path):
    home = tmp_path / "project"
    shutil.copytree(tiny_run, home / "runs" / "base")
    ckpt = sorted((home / "runs" / "base" / "checkpoints").glob("step-*.safetensors"))[-1]
    f = write_cascade_file(home / "samples" / "cascade.json", [ckpt], SamplingPlan.uniform(1))
    assert json.loads(f.read_text())["stages"] == [f"../runs/base/checkpoints/{ckpt.name}"]
    moved = tmp_path / "elsewhere"
    shutil.move(home, moved)
    paths, _ = read_cascade_file(moved / "samples" / "cascade.json")
    assert paths[0].resolve() == (moved / "runs" / "base" / "checkpoints" / ckpt.name).resolve() and paths[0].is_file()


def test_sampling_the_reserved_no_class_label_of_a_stage_without_label_dropout_warns(tiny_run):
    from cdm.cascade_file import load_cascade

    cascade = load_cascade([tiny_run], device="cpu")
    nc = cascade.num_classes
    assert cascade.stages[0].config.train.p_uncond == 0
    with pytest.warns(UserWarning, match="reserved 'no class' label, which stage"):
        cascade.check_labels(torch.tensor([0, nc]))


WORK = {  # command -> its required arguments; each takes the common flags it does the work of
    "train": ["fmnist-base8", "--out", "o"], "sample": ["--out", "o"], "nll": ["--out", "o"], "demo": [],
    "eval": ["--out", "o"], "sweep": ["--out", "o"], "distill": ["t", "--out", "o"]}


@pytest.mark.parametrize("command", sorted(WORK))
def test_every_command_that_samples_or_trains_takes_the_common_flags(command):
    from cdm.cli import build_parser

    a = build_parser().parse_args([command, *WORK[command], "--no-progress", "--device", "cpu", "--seed", "3"])
    assert (a.no_progress, a.device, a.seed) == (True, "cpu", 3)
    c = build_parser().parse_args(["train-classifier", "--out", "o", "--no-progress", "--seed", "3"])
    assert (c.no_progress, c.seed) == (True, 3)
    assert build_parser().parse_args(["prepare", "s", "--out", "o", "--resolution", "8", "--no-progress"]).no_progress


def test_a_wrong_device_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--stage", "x", "--out", "o", "--device", "gpu"])
    assert e.value.code == 2 and "expected auto, cpu, cuda, cuda:N, mps or xpu, got 'gpu'" in capsys.readouterr().err
