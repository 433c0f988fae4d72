"""Real reference data: one deterministic train/held-out split for every source, random
class-stratified subsets, and scoring that says when it compares with training images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cdm.data import DataConfig, DataError, held_out_mask, load_dataset
from cdm.eval.reference import ReferenceSpec, load_reference, stratified_subset, training_overlap


def class_folder(root, per_class: int = 20, classes: int = 3, size: int = 12):
    """``classes`` sub-folders of ``per_class`` distinct grey PNGs each (sorted by class on disk)."""
    from PIL import Image

    g = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for j in range(per_class):
            a = g.integers(0, 60, (size, size), dtype=np.uint8)
            a[c * 3:c * 3 + 4, :] = 230  # a class-specific bright band
            Image.fromarray(a).save(root / f"class{c}" / f"{j:03d}.png")
    return root


def folder_data(root, **kw) -> DataConfig:
    return DataConfig(source="folder", path=str(root), resolution=12, **kw)


def test_a_folder_splits_by_file_into_disjoint_train_and_held_out_parts(tmp_path):
    root = class_folder(tmp_path / "f")
    every = load_dataset(folder_data(root, split="all"))
    train, test = load_dataset(folder_data(root)), load_dataset(folder_data(root, split="test"))
    assert len(train) + len(test) == len(every) == 60 and 1 <= len(test) <= 15
    rows = lambda d: {im.numpy().tobytes() for im in d.images}  # noqa: E731
    assert rows(train).isdisjoint(rows(test)) and rows(train) | rows(test) == rows(every)
    # the split is a property of each file: other resolutions and a grown folder move nothing
    assert len(load_dataset(DataConfig(source="folder", path=str(root), resolution=8, split="test"))) == len(test)
    from PIL import Image
    Image.fromarray(np.full((12, 12), 99, np.uint8)).save(root / "class0" / "new.png")
    assert rows(test) <= rows(load_dataset(folder_data(root, split="test")))
    keys = [f"class{c}/{j:03d}.png" for c in range(3) for j in range(20)]
    assert torch.equal(held_out_mask(keys, 0.1), held_out_mask(list(reversed(keys)), 0.1).flip(0))
    with pytest.raises(DataError, match="data.split must be one of"):
        folder_data(root, split="validation")


def test_reference_subsets_are_random_and_stratified_by_class(tmp_path):
    labels = torch.arange(300) // 100  # sorted by class, as a folder is
    idx = stratified_subset(labels, 30, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [10, 10, 10] and len(set(idx.tolist())) == 30
    assert not torch.equal(idx, stratified_subset(labels, 30, seed=1))
    assert torch.equal(idx, stratified_subset(labels, 30, seed=0))
    uneven = torch.tensor([0] * 70 + [1] * 20 + [2] * 10)
    assert torch.bincount(uneven[stratified_subset(uneven, 10, 0)]).tolist() == [7, 2, 1]
    root = class_folder(tmp_path / "f")
    ref = load_reference(folder_data(root), ReferenceSpec(split="all", n=9, seed=3))
    assert torch.bincount(ref.labels).tolist() == [3, 3, 3]  # not the first 9 files: one class
    assert "n=9 seed=3" in ref.source and len(ref.fingerprint) == 12
    with pytest.raises(DataError, match="holds 60"):
        stratified_subset(load_reference(folder_data(root), ReferenceSpec(split="all", n=0)).labels, 61, 0)


def test_overlap_with_the_training_images_is_counted(tmp_path):
    root = class_folder(tmp_path / "f")
    data = folder_data(root)  # what a stage trains on: the train split
    assert training_overlap(data, load_reference(data, ReferenceSpec(split="test", n=0))) == 0
    train = load_reference(data, ReferenceSpec(split="train", n=0))
    assert training_overlap(data, train) == len(train)
    assert training_overlap(data, load_reference(data, ReferenceSpec(split="all", n=0))) == len(train)


def test_a_stage_trains_on_the_train_split_and_eval_scores_against_the_held_out_part(tmp_path, capsys):
    """Nothing is trained on the held-out part of a folder; cdm eval compares with exactly it."""
    from cdm.cli import main

    root = class_folder(tmp_path / "f", per_class=30)
    test = load_dataset(folder_data(root, split="test"))
    seen = load_dataset(folder_data(root))  # what `cdm train` loads for this config (split = train)
    assert not {im.numpy().tobytes() for im in test.images} & {im.numpy().tobytes() for im in seen.images}
    toml = tmp_path / "base.toml"
    toml.write_text(f'''name = "base"
resolution = 12
[data]
source = "folder"
path = "{root}"
resolution = 12
[unet]
base_channels = 8
channel_mult = [1]
num_res_blocks = 1
attention_resolutions = []
[diffusion]
steps = 20
[train]
steps = 2
batch_size = 8
precision = "fp32"
sample_every = 0
''')
    assert main(["train", str(toml), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["train-classifier", "--out", str(tmp_path / "clf"), "--data-from", str(toml), "--no-progress",
                 "--set", "epochs=1", "--set", "width=8", "--set", "batch_size=16", "--set", "min_steps=0"]) == 0
    clf = json.loads((tmp_path / "clf" / "summary.json").read_text())
    assert clf["test_n"] == len(test) and clf["train_n"] == len(seen)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CDM_CACHE", str(tmp_path / "cache"))
        assert main(["eval", "--stage", str(tmp_path / "run"), "--out", str(tmp_path / "ev"), "--n", "12",
                     "--steps", "2", "--classifier", str(tmp_path / "clf"), "--no-per-stage"]) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["reference_overlap"] == {"base": 0} and res["reference"].startswith("folder:test")
    assert res["scores"][0]["n_real"] == len(test)
    assert "warning" not in capsys.readouterr().out
