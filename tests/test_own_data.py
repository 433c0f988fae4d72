"""Your own images: the folder presets train on a folder named on the command line, and `cdm sample
--classes` takes class names as well as indices."""

from __future__ import annotations

import numpy as np
import pytest

from cdm.cascade import CascadeError
from cdm.cli import main
from cdm.data import FASHION_MNIST_CLASSES
from cdm.generate import resolve_classes

FOLDER_PRESETS = ("folder-base16", "folder-sr16to64")


def photo_folder(root, per_class: int = 6):
    """``root/cats`` and ``root/dogs``: RGB images of odd sizes, none below 64 px (class = a dark or a light one)."""
    from PIL import Image

    g = np.random.default_rng(0)
    for c, (name, lo) in enumerate((("cats", 0), ("dogs", 150))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            a = g.integers(lo, lo + 100, size=(64 + 3 * i, 66, 3), dtype=np.uint8)  # at least the presets' 64 px
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root


def cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdm: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("preset", FOLDER_PRESETS)
def test_a_folder_preset_says_to_name_the_folder(preset, tmp_path, capsys):
    err = cli_error(capsys, ["train", preset, "--out", str(tmp_path / "r"), "--no-progress"])
    assert "needs data.path" in err and "--set data.path=" in err
    # its plan needs no folder: it is planned with one class, and says so
    assert main(["train", preset, "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    assert "classes: unknown until data.path names the folder" in capsys.readouterr().err


@pytest.mark.slow
def test_folder_presets_train_and_sample_by_class_name(tmp_path, capsys):
    photos = photo_folder(tmp_path / "photos")
    fast = ["train.steps=1", "train.batch_size=4", "train.sample_every=1", "train.sample_steps=2",
            "train.precision=fp32", "data.split=all", f"data.path={photos}"]
    for preset in FOLDER_PRESETS:
        assert main(["train", preset, "--out", str(tmp_path / preset), "--no-progress",
                     *[a for kv in fast for a in ("--set", kv)]]) == 0
    from PIL import Image
    w, _ = Image.open(tmp_path / "folder-base16" / "samples" / "step-00000001.png").size
    assert w == (4 * 18 + 2) * 4  # 4 samples a row, 16px tiles (2px gaps) enlarged 4x to 64px
    stages = ["--stage", str(tmp_path / "folder-base16"), "--stage", str(tmp_path / "folder-sr16to64")]
    out = tmp_path / "samples"
    assert main(["sample", *stages, "--out", str(out), "--n", "3", "--steps", "1", "--levels", "0,100",
                 "--classes", "Dogs,0"]) == 0
    z = np.load(out / "samples.npz")
    assert z["labels"].tolist() == [1, 0, 1] and z["stage1"].shape == (3, 3, 64, 64)
    capsys.readouterr()  # the training runs' start-up summaries
    err = cli_error(capsys, ["sample", *stages, "--out", str(out / "x"), "--classes", "dgos"])
    assert "unknown class 'dgos'; did you mean 'dogs'? the classes are 0='cats', 1='dogs'" in err


def test_class_names_or_indices():
    names = FASHION_MNIST_CLASSES
    assert resolve_classes(["sneaker", "bag"], names) == [7, 8]
    assert resolve_classes([7, "8"], names) == [7, 8]
    assert resolve_classes(["Ankle boot", "ankle_boot", "ANKLE-BOOT", "top", "t-shirt", "T-shirt/top", "shirt"],
                           names) == [9, 9, 9, 0, 0, 0, 6]
    assert resolve_classes(None, names) is None and resolve_classes([12], names) == [12]  # checked by the cascade
    with pytest.raises(CascadeError, match=r"unknown class 'snaker'; did you mean 'Sneaker'\? the classes are "
                                           r"0='T-shirt/top', 1='Trouser'.*9='Ankle boot'"):
        resolve_classes(["sneaker", "snaker"], names)
    with pytest.raises(CascadeError, match="carry no class names; give class indices"):
        resolve_classes(["cat"], [])
    with pytest.raises(CascadeError, match=r"'x' names several classes \(a/x, b/x\); give their indices \(0, 1\)"):
        resolve_classes(["x"], ["a/x", "b/x"])
