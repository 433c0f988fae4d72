"""How a run starts: --init takes another run's weights exactly (EMA or raw) and refuses weights
that do not fit; resuming wins over --init; a resume applies the config changes it may and refuses
the others by name; the start-up summary says what is happening."""

from __future__ import annotations

import json

import pytest
import torch

import cdm.step as step_mod
import cdm.train as train_mod
from cdm.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from cdm.config import ConfigError
from cdm.start import RESUMABLE, InitFrom, change_lines, check_resume
from cdm.train import train_stage

from conftest import tiny_config, toy_images


def cfg_(steps: int = 3, resolution: int = 8, lowres: int = 0, aug: str = "none", **train):
    cfg = tiny_config(resolution=resolution, lowres=lowres, aug=aug, classes=3, data_resolution=16, steps=50,
                      **{"log_every": 1, "ckpt_every": 2, **train})
    cfg.train.steps = steps
    return cfg


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny base stage trained 3 steps (checkpoints at 2 and 3), whose EMA and raw weights differ."""
    run = tmp_path_factory.mktemp("source") / "run"
    train_stage(cfg_(3, lr=1e-2), run, progress=False, data=toy_images(16, 16))
    return run


def step0_weights(monkeypatch, n_emas: int) -> dict:
    """Record, in a run that trains next, the network's weights at its first step (before any
    update), and its ``n_emas`` EMAs' (the EMA, then each post-hoc profile) before their first update."""
    seen: dict = {"net": None, "emas": []}
    loss, update = step_mod.batch_loss, train_mod.ema_update

    def first_loss(stage, *a, **kw):
        if seen["net"] is None:
            seen["net"] = {k: v.clone() for k, v in stage.net.state_dict().items()}
        return loss(stage, *a, **kw)

    def first_updates(ema, net, beta):
        if len(seen["emas"]) < n_emas:
            seen["emas"].append({k: v.clone() for k, v in ema.state_dict().items()})
        return update(ema, net, beta)

    monkeypatch.setattr(step_mod, "batch_loss", first_loss)
    monkeypatch.setattr(train_mod, "ema_update", first_updates)
    return seen


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_init_starts_from_the_chosen_weights_exactly(weights, source, tmp_path, monkeypatch, capsys):
    src_path, src = list_checkpoints(source)[-1][1], load_checkpoint(source)
    chosen = src.ema if weights == "ema" else src.model
    other = src.model if weights == "ema" else src.ema
    assert any(not torch.equal(chosen[k], other[k]) for k in chosen)  # the test can tell them apart

    seen = step0_weights(monkeypatch, 2)
    cfg = cfg_(2, ema_profiles=[0.05], lr=1e-3)  # another recipe; the same network
    last = train_stage(cfg, tmp_path / "ft", progress=False, data=toy_images(16, 16), init=InitFrom(source, weights))
    assert_equal(seen["net"], chosen)  # the weights at step 0, before the first update
    assert len(seen["emas"]) == 2
    for ema in seen["emas"]:  # the EMA and the post-hoc profile start there too
        assert_equal(ema, chosen)

    ck = load_checkpoint(last)
    assert ck.step == 2 and list_checkpoints(tmp_path / "ft")[-1][0] == 2  # step 0, not the source's step 3
    assert int(ck.optimizer["state"][0]["step"]) == 2  # a fresh optimiser: two updates, not the source's five
    record = json.loads((tmp_path / "ft" / "init.json").read_text())
    assert record["path"] == str(src_path.resolve()) and record["weights"] == weights and record["step"] == 3
    assert record["checkpoint_checksum"].startswith("sha256:") and record["weights_sha256"].startswith("sha256:")
    assert ck.extra["init"] == record  # each checkpoint keeps it too
    log = [json.loads(line) for line in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert log[0] == {"step": 0, "init": record}
    err = capsys.readouterr().err
    assert f"initialised from {source} ({weights} weights of step 3)" in err


def test_init_refuses_weights_that_do_not_fit_and_says_what_to_do(source, tmp_path):
    data = toy_images(16, 16)
    sr = cfg_(2, resolution=16, lowres=8, aug="gaussian")
    with pytest.raises(CheckpointError) as e:
        train_stage(sr, tmp_path / "sr", progress=False, data=data, init=InitFrom(source))
    msg = str(e.value)
    assert "input_conv.weight is [8, 1, 3, 3] in the checkpoint but [8, 2, 3, 3] in this network" in msg
    assert "missing from the checkpoint: level_embed.0.weight" in msg
    assert "initialise an SR stage from an SR run" in msg and "\n" not in msg
    wide = cfg_(2)
    wide.unet.base_channels = 16
    wide.resolve(channels=1, num_classes=3)
    with pytest.raises(CheckpointError, match=r"time_embed.0.weight is \[32, 8\] in the checkpoint but \[64, 16\] in "
                                              r"this network \(and \d+ more .*unet.base_channels \(8 in the "
                                              r"checkpoint, 16 here\)"):
        train_stage(wide, tmp_path / "wide", progress=False, data=data, init=InitFrom(source))
    assert not list_checkpoints(tmp_path / "wide")


def test_a_different_network_whose_tensors_fit_is_allowed(source, tmp_path):
    """An 8px network with attention at 4px has the tensors of a 16px one with attention at 8px."""
    big = tiny_config(resolution=16, classes=3, data_resolution=16, steps=50, log_every=1, ckpt_every=1)
    big.train.steps = 1
    big.unet.dropout = 0.1
    last = train_stage(big, tmp_path / "big", progress=False, data=toy_images(16, 16), init=InitFrom(source, "raw"))
    assert load_checkpoint(last).config.resolution == 16


def test_a_missing_or_damaged_init_is_one_line(tmp_path):
    data = toy_images(16, 16)
    with pytest.raises(CheckpointError, match="cannot initialise from .*none .*does not exist"):
        train_stage(cfg_(2), tmp_path / "r", progress=False, data=data, init=InitFrom(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="cannot initialise from .*empty .*holds no checkpoints"):
        train_stage(cfg_(2), tmp_path / "r", progress=False, data=data, init=InitFrom(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="init weights must be one of ema, raw"):
        InitFrom(tmp_path, "best")


def test_resuming_wins_over_init_and_fresh_starts_over_from_it(source, tmp_path, capsys):
    data = toy_images(16, 16)
    straight = load_checkpoint(train_stage(cfg_(4), tmp_path / "straight", progress=False, data=data))
    train_stage(cfg_(2), tmp_path / "run", progress=False, data=data)
    capsys.readouterr()
    resumed = load_checkpoint(train_stage(cfg_(4), tmp_path / "run", progress=False, data=data, init=InitFrom(source)))
    err = capsys.readouterr().err
    assert "resumed from step 2" in err and f"--init {source} is not applied" in err
    assert_equal(resumed.model, straight.model)  # the run went on from its own checkpoint, exactly
    assert not (tmp_path / "run" / "init.json").exists() and "init" not in resumed.extra

    src = load_checkpoint(source)
    ft = load_checkpoint(train_stage(cfg_(4), tmp_path / "run", fresh=True, progress=False, data=data,
                                     init=InitFrom(source)))
    assert ft.step == 4 and ft.extra["init"]["step"] == src.step
    assert json.loads((tmp_path / "run" / "init.json").read_text())["weights"] == "ema"
    # resuming a fine-tuned run keeps its provenance
    again = load_checkpoint(train_stage(cfg_(5), tmp_path / "run", progress=False, data=data))
    assert again.extra["init"] == ft.extra["init"] and (tmp_path / "run" / "init.json").exists()


def test_a_resume_refuses_changes_by_name_and_applies_and_logs_the_others(tmp_path, capsys):
    data = toy_images(16, 16)
    run = tmp_path / "run"
    train_stage(cfg_(2), run, progress=False, data=data)
    bad = cfg_(4, batch_size=4, seed=3)
    with pytest.raises(CheckpointError) as e:
        train_stage(bad, run, progress=False, data=data)
    msg = str(e.value)
    assert "train.batch_size: 8 -> 4; train.seed: 0 -> 3" in msg and "--fresh" in msg and "--out" in msg
    assert "different stage" not in msg and "\n" not in msg
    capsys.readouterr()
    ok = cfg_(4, log_every=2, sample_steps=2)
    ok.name = "renamed"
    train_stage(ok, run, progress=False, data=data)
    err = capsys.readouterr().err
    for line in ("changed on resume: train.steps: 2 -> 4", "changed on resume: train.log_every: 1 -> 2",
                 "changed on resume: name: 'tiny0to8' -> 'renamed'", "resumed from step 2"):
        assert line in err, err
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    changes = [r for r in log if "config_change" in r]
    assert changes == [{"step": 2, "config_change": {"name": ["tiny0to8", "renamed"], "train.log_every": [1, 2],
                                                     "train.sample_steps": [3, 2], "train.steps": [2, 4]}}]
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 4


def test_the_resume_rule_directly():
    a = cfg_(100)
    b = cfg_(200, ckpt_every=7, device="cpu")
    b.unet.dropout = 0.2
    b.data.limit = 5
    with pytest.raises(CheckpointError, match=r"holds a run of a different stage \(data.limit: 0 -> 5; "
                                              r"unet.dropout: 0.0 -> 0.2\)"):
        check_resume(a, b, "RUN")
    b.unet.dropout, b.data.limit = 0.0, 0
    assert check_resume(a, b, "RUN") == {"train.ckpt_every": [2, 7], "train.device": ["auto", "cpu"],
                                         "train.steps": [100, 200]}
    assert all(k.split(".")[0] in ("name", "train") or k in ("unet.checkpoint", "data.workers") for k in RESUMABLE)
    # a decaying learning rate: the summary line says how the lengthened schedule moves it
    a.train.lr_schedule = b.train.lr_schedule = "cosine"
    (line,) = change_lines({"train.steps": [100, 200]}, 50, a, b)
    assert line.startswith("train.steps: 100 -> 200 (the cosine learning-rate schedule now ends at step 200")


def test_the_start_up_summary(tmp_path, capsys):
    train_stage(cfg_(1), tmp_path / "run", progress=False, data=toy_images(16, 16))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"cdm train tiny0to8 -> {tmp_path / 'run'}"
    assert "data: npz unused.npz, split train: 16 images at 16px, 3 classes (c0, c1, c2)" in lines[1]
    assert "8px base stage" in lines[2] and "parameters; training to step 1, batch 8, on cpu in fp32" in lines[2]
    assert lines[3] == "  starting fresh"
    train_stage(cfg_(1), tmp_path / "run", progress=False, data=toy_images(16, 16))
    last = capsys.readouterr().err.splitlines()[-1]
    assert "resumed from step 1 (" in last and last.endswith("; the run is already done")


def test_the_command_line_fine_tunes(tmp_path, toy_npz, capsys):
    from cdm.cli import main
    from test_cli import write_tiny

    cfg = write_tiny(tmp_path, toy_npz, "base", 8, 0, "none")
    assert main(["train", str(cfg), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    argv = ["train", str(cfg), "--out", str(tmp_path / "b"), "--no-progress", "--init", str(tmp_path / "a"),
            "--set", "train.steps=1"]
    assert main(argv + ["--init-weights", "raw"]) == 0
    record = json.loads((tmp_path / "b" / "init.json").read_text())
    assert record["weights"] == "raw" and record["step"] == 3 and load_checkpoint(tmp_path / "b").step == 1
    assert f"initialised from {tmp_path / 'a'} (raw weights of step 3)" in capsys.readouterr().err
