"""Config files, presets and overrides."""

from __future__ import annotations

import pytest

from cdm.config import ConfigError, list_presets, load_stage_config, read_preset


def test_presets_load_and_resolve():
    assert {"fmnist-base8", "fmnist-sr8to32", "fmnist-single32", "folder-sr32to64"} <= set(list_presets())
    for name in list_presets():
        cfg = load_stage_config(name).resolve(channels=1, num_classes=10)
        assert cfg.unet.resolution == cfg.resolution and cfg.unet.num_classes == (10 if cfg.class_conditional else 0)
    sr = load_stage_config("fmnist-sr8to32").resolve(channels=1, num_classes=10)
    base = load_stage_config("fmnist-base8")
    assert sr.unet.lowres_channels == 1 and sr.unet.aug_level_embedding
    # the SR preset's augmentation is the base preset's forward process (truncation is exact)
    assert (sr.augment.schedule, sr.augment.steps) == (base.diffusion.schedule, base.diffusion.steps)


def test_overrides_are_typed():
    cfg = load_stage_config("fmnist-base8", ["train.steps=7", "train.lr=0.01", "data.flip=true",
                                             "unet.channel_mult=1,2", "diffusion.prediction=v"])
    assert cfg.train.steps == 7 and cfg.train.lr == 0.01 and cfg.data.flip is True
    assert cfg.unet.channel_mult == [1, 2] and cfg.diffusion.prediction == "v"


def test_file_config(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "x"\nresolution = 16\n[train]\nsteps = 3\n')
    cfg = load_stage_config(str(p), ["train.batch_size=4"])
    assert cfg.name == "x" and cfg.resolution == 16 and cfg.train.steps == 3 and cfg.train.batch_size == 4


@pytest.mark.parametrize("override,message", [
    (["train.stpes=5"], "did you mean train.steps"),
    (["trian.steps=5"], "did you mean train"),
    (["train.steps=five"], "train.steps must be an integer"),
    (["train.steps=0"], "train.steps must be >= 1"),
    (["data.flip=maybe"], "data.flip must be true or false"),
    (["unet.resolution=64"], "unet.resolution is derived"),
    (["diffusion.schedule=quadratic"], "quadratic"),
    (["augment.s_max=2000"], r"augment.s_max must lie in \[0, augment.steps=1000\]"),
    (["train.precision=fp16"], "one of auto, bf16, fp32"),
    (["train.steps"], "key=value"),
])
def test_bad_config_is_explained(override, message):
    with pytest.raises(ConfigError, match=message):
        load_stage_config("fmnist-sr8to32", override)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="did you mean fmnist-base8"):
        read_preset("fmnist-base")
    with pytest.raises(ConfigError, match="does not exist"):
        load_stage_config(str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("resolution = = 3")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_stage_config(str(bad))


def test_stage_coherence():
    with pytest.raises(ConfigError, match="needs a super-resolution stage"):
        load_stage_config("fmnist-base8", ["augment.kind=gaussian"]).resolve(1, 10)
    with pytest.raises(ConfigError, match="must be below"):
        load_stage_config("fmnist-sr8to32", ["lowres_resolution=32"]).resolve(1, 10)
    with pytest.raises(ConfigError, match="exceeds data.resolution"):
        load_stage_config("fmnist-sr8to32", ["resolution=64"]).resolve(1, 10)
