"""A bad stage config is refused when it is loaded, in one line: every case below ends `cdm`
with exit status 2 and a single ``cdm: error: ...`` line that says what was wrong (no
traceback). Config cases run with ``--dry-run``, so what --dry-run accepts is what training
accepts; the last tests train configs that --dry-run accepts at their edges."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cdm.cli import main

from conftest import tiny_config
from test_cli import TINY


def dry(*args: str) -> list[str]:
    """``cdm train ARGS --out {tmp}/run --dry-run``."""
    return ["train", *args, "--out", "{tmp}/run", "--dry-run"]


def base(*sets: str) -> list[str]:
    """The tiny base stage (8px from 16px data, 50 steps) with ``--set`` overrides, dry run."""
    return dry("{base}", *[a for kv in sets for a in ("--set", kv)])


def sr(*sets: str) -> list[str]:
    """The tiny 8 -> 16 SR stage (Gaussian augmentation, 50 steps) with overrides, dry run."""
    return dry("{sr}", *[a for kv in sets for a in ("--set", kv)])


def tiny_toml(npz, name: str = "base", res: int = 8, lowres: int = 0, aug: str = "none") -> str:
    return TINY.format(name=name, res=res, lowres=lowres, npz=npz, aug=aug)


# Files a case may name as {file:NAME}: bytes, or a function of the toy .npz's path giving text.
FILES = {
    "garbage.toml": bytes(range(256)) * 4,
    "garbage.json": b"\xff\xfe\x00{" + bytes(range(128, 256)),
    "list.json": "[1, 2, 3]",
    "null.json": "null",
    "number.json": "3",
    "syntax.toml": "resolution = = 3\n",
    "config.yaml": "resolution: 8\n",
    "steps-bool.toml": lambda npz: tiny_toml(npz).replace("steps = 3", "steps = true"),
    "steps-list.toml": lambda npz: tiny_toml(npz).replace("steps = 3", "steps = [1, 2]"),
    "steps-float.toml": lambda npz: tiny_toml(npz).replace("steps = 3", "steps = 2.5"),
    "steps-inf.toml": lambda npz: tiny_toml(npz).replace("steps = 3", "steps = inf"),
    "lr-bool.toml": lambda npz: tiny_toml(npz).replace("[train]\n", "[train]\nlr = true\n"),
    "name-list.toml": lambda npz: tiny_toml(npz).replace('name = "base"', "name = [1]"),
    "path-number.toml": lambda npz: tiny_toml(npz).replace(f'path = "{npz}"', "path = 5"),
    "train-number.toml": lambda npz: "train = 5\n" + tiny_toml(npz).split("[train]")[0],
    "unet-string.toml": lambda npz: 'unet = "big"\n' + tiny_toml(npz).split("[unet]")[0],
    "data-list.json": lambda npz: json.dumps({"resolution": 8, "data": [1, 2]}),
    "mult-nested.json": lambda npz: json.dumps({"resolution": 8, "data": {"source": "npz", "path": str(npz),
                                                                          "resolution": 16},
                                                "unet": {"channel_mult": [[1], 2]}}),
}

W = "cdm: error: "  # every message starts so

CASES = [
    # --- the config file itself
    (dry("{file:garbage.toml}"), 2, "garbage.toml: it is not UTF-8 text"),
    (dry("{file:garbage.json}"), 2, "it is not UTF-8 text"),
    (dry("{file:list.json}"), 2, "must hold a JSON object of settings"),
    (dry("{file:null.json}"), 2, "must hold a JSON object of settings"),
    (dry("{file:number.json}"), 2, "got int"),
    (dry("{tmp}/a-directory.toml"), 2, "is a directory without config.json: name a run directory"),
    (dry("{tmp}/missing.toml"), 2, "missing.toml does not exist"),
    (dry("{file:syntax.toml}"), 2, "cannot parse"),
    (dry("{file:config.yaml}"), 2, "must end in .toml or .json"),
    (dry("fmnist-base"), 2, "did you mean fmnist-base8"),
    # --- types: a wrong type names its key
    (base("unet.num_res_blocks=1000"), 2, "unet.num_res_blocks must be at most 16"),  # a plan of it never returned
    (base("unet.channel_mult=1,1,1,1,1,1,1,1,1,1,1"), 2, "unet.channel_mult may have at most 10 levels"),
    (base("train.steps=abc"), 2, "train.steps must be an integer, got 'abc'"),
    (base("train.steps=1.5"), 2, "train.steps must be an integer"),
    (base("train.lr=fast"), 2, "train.lr must be a number"),
    (base("train.lr=nan"), 2, "train.lr must be a finite number"),
    (base("train.grad_clip=inf"), 2, "train.grad_clip must be a finite number"),
    (base("data.flip=maybe"), 2, "data.flip must be true or false"),
    (base("unet.channel_mult=1,two"), 2, "unet.channel_mult must be an integer, got 'two'"),
    (base("train.adam_betas=0.9"), 2, "train.adam_betas must be two numbers"),
    (base("train.steps.deep=1"), 2, "train.steps must be an integer"),
    (base("train=5"), 2, "train must be a table of settings"),
    (dry("{file:steps-bool.toml}"), 2, "train.steps must be an integer, got True"),
    (dry("{file:steps-list.toml}"), 2, "train.steps must be an integer, got [1, 2]"),
    (dry("{file:steps-float.toml}"), 2, "train.steps must be an integer, got 2.5"),
    (dry("{file:steps-inf.toml}"), 2, "train.steps must be a finite number"),
    (dry("{file:lr-bool.toml}"), 2, "train.lr must be a number, got True"),
    (dry("{file:name-list.toml}"), 2, "name must be a string"),
    (dry("{file:path-number.toml}"), 2, "data.path must be a string"),
    (dry("{file:train-number.toml}"), 2, "train must be a table of settings"),
    (dry("{file:unet-string.toml}"), 2, "unet must be a table of settings"),
    (dry("{file:data-list.json}"), 2, "data must be a table of settings"),
    (dry("{file:mult-nested.json}"), 2, "unet.channel_mult must be an integer, got [1]"),
    # --- train ranges
    (base("train.steps=0"), 2, "train.steps must be >= 1"),
    (base("train.batch_size=0"), 2, "train.batch_size must be >= 1"),
    (base("train.ckpt_every=0"), 2, "train.ckpt_every must be >= 1, got 0"),
    (base("train.log_every=0"), 2, "train.log_every must be >= 1, got 0"),
    (base("train.sample_every=-1"), 2, "train.sample_every must be >= 0"),
    (base("train.keep_checkpoints=0"), 2, "train.keep_checkpoints must be >= 1"),
    (base("train.lr=-1"), 2, "train.lr must be > 0, got -1"),
    (base("train.lr=0"), 2, "train.lr must be > 0"),
    (base("train.warmup_steps=-1"), 2, "train.warmup_steps must be >= 0"),
    (base("train.grad_clip=-1"), 2, "train.grad_clip must be >= 0"),
    (base("train.weight_decay=-0.1"), 2, "train.weight_decay must be >= 0"),
    (base("train.ema_decay=2"), 2, "train.ema_decay must lie in [0, 1), got 2"),
    (base("train.ema_decay=-1"), 2, "train.ema_decay must lie in [0, 1)"),
    (base("train.ema_decay=1"), 2, "train.ema_decay must lie in [0, 1)"),
    (base("train.p_uncond=1"), 2, "train.p_uncond must lie in [0, 1)"),
    (base("train.p_uncond=-0.1"), 2, "train.p_uncond must lie in [0, 1)"),
    (base("train.sample_steps=0"), 2, "train.sample_steps must be >= 1"),
    (base("train.ema_snapshot_every=-1"), 2, "train.ema_snapshot_every must be >= 0"),
    (base("train.ema_sigma_rel=0.5"), 2, "EMA lengths"),
    (base("train.min_snr_gamma=0"), 2, "train.min_snr_gamma must be > 0"),
    (base("train.seed=-1"), 2, "train.seed must be an integer in [0, 2^63)"),
    (base("train.device=gpu"), 2, "train.device must be auto, cpu, cuda or cuda:N"),
    (base("train.precision=fp16"), 2, "train.precision must be one of auto, bf16, fp32"),
    (base("train.lr_schedule=step"), 2, "train.lr_schedule must be one of constant, cosine, linear"),
    (base("train.sample_level=3"), 2, "train.sample_level (3) applies to super-resolution stages only"),
    (sr("train.sample_level=51"), 2, "train.sample_level: augmentation level s must be an integer in [0, 50]"),
    # --- memory levers: micro-batches, activation checkpointing, crops (the tiny SR stage is 8 -> 16)
    (base("train.grad_accum=0"), 2, "train.grad_accum must be >= 1, got 0"),
    (base("train.grad_accum=3"), 2, "train.batch_size (4) must be divisible by train.grad_accum (3)"),
    (base("unet.checkpoint=sometimes"), 2, "unet.checkpoint must be true or false"),
    (base("train.crop=-4"), 2, "train.crop must be >= 0, got -4 (0 = off)"),
    (base("train.crop=4"), 2, "train.crop (4) applies to super-resolution stages only; set it to 0"),
    (sr("train.crop=16", "unet.mid_attention=false"), 2, "train.crop (16) must be below the stage's resolution (16)"),
    (sr("train.crop=8", "lowres_resolution=6"), 2,
     "train.crop needs resolution (16) to be a multiple of lowres_resolution (6)"),
    (sr("train.crop=3", "unet.mid_attention=false"), 2,
     "train.crop (3) must be a multiple of resolution / lowres_resolution = 2"),
    (sr("train.crop=6", "unet.channel_mult=1,2,2", "unet.mid_attention=false"), 2,
     "train.crop (6) is not divisible by 2^2 = 4"),
    (sr("train.crop=8", "unet.attention_resolutions=8,16", "unet.mid_attention=false"), 2,
     "unet.attention_resolutions includes 16, which train.crop = 8 changes (to 8px); attention-free levels are "
     "needed for crop training: set unet.attention_resolutions = []"),
    (sr("train.crop=2", "unet.mid_attention=false", "augment.kind=blur"), 2,
     "train.crop (2) must be at least 4 with augment.kind = 'blur'"),
    (sr("train.crop=8"), 2, "the U-Net's middle block attends over its whole 8px feature map, which train.crop = 8 "
                            "changes (to 4px); set unet.mid_attention = false"),
    # --- the stage
    (base("resolution=0"), 2, "resolution must be >= 1, got 0"),
    (base("resolution=-8"), 2, "resolution must be >= 1, got -8"),
    (base("resolution=7"), 2, "resolution 7 is not divisible by 2^1 = 2"),
    (base("resolution=12", "unet.channel_mult=1,2,2,2"), 2, "resolution 12 is not divisible by 2^3 = 8"),
    (base("resolution=32"), 2, "stage resolution 32 exceeds data.resolution 16"),
    (sr("lowres_resolution=-1"), 2, "lowres_resolution must be >= 0"),
    (sr("lowres_resolution=16"), 2, "lowres_resolution (16) must be below the stage's resolution (16)"),
    (sr("lowres_resolution=20"), 2, "must be below the stage's resolution"),
    (base("augment.kind=gaussian"), 2, "conditioning augmentation needs a super-resolution stage"),
    # --- data
    (base("data.limit=-5"), 2, "data.limit must be >= 0 (0 = all images), got -5"),
    (base("data.resolution=0"), 2, "data.resolution must be >= 1"),
    (base("data.held_out=1"), 2, "data.held_out must lie in (0, 1)"),
    (base("data.source=web"), 2, "data.source must be"),
    (base("data.path={empty_npz}"), 2, "holds no images"),
    (base("data.path={float_labels_npz}"), 2, "'labels' must be a 1-d array of integer class indices"),
    (base("data.source=folder", "data.path={npz}"), 2, "is a file, not a folder"),
    # --- diffusion and augmentation
    (base("diffusion.steps=0"), 2, "diffusion.steps must be >= 1"),
    (base("diffusion.schedule=quadratic"), 2, "diffusion.schedule must be one of cosine, linear, got 'quadratic'"),
    (base("diffusion.prediction=x0"), 2, "diffusion.prediction must be one of eps, v"),
    (base("diffusion.hybrid_lambda=-1"), 2, "diffusion.hybrid_lambda must be >= 0"),
    (sr("augment.steps=0", "augment.s_max=0"), 2, "augment.steps must be >= 1"),
    (sr("augment.s_max=-1"), 2, "augment.s_max must lie in [0, augment.steps=50]"),
    (sr("augment.s_max=51"), 2, "augment.s_max must lie in [0, augment.steps=50]"),
    (sr("augment.p_zero=2"), 2, "augment.p_zero must lie in [0, 1]"),
    (sr("augment.kind=noise"), 2, "augment.kind must be one of none, gaussian, blur"),
    (sr("augment.schedule=quad"), 2, "augment.schedule must be one of cosine, linear"),
    (sr("augment.kind=blur", "augment.sigma_min=0.7"), 2, "augment needs 0 <= sigma_min <= sigma_max"),
    # --- the network
    (base("unet.base_channels=0"), 2, "unet.base_channels must be >= 1"),
    (base("unet.base_channels=-8"), 2, "unet.base_channels must be >= 1, got -8"),
    (base("unet.head_channels=0"), 2, "unet.head_channels must be >= 1"),
    (base("unet.num_res_blocks=-1"), 2, "unet.num_res_blocks must be >= 0"),
    (base("unet.channel_mult=1,0"), 2, "unet.channel_mult must be one or more multipliers >= 1"),
    (base("unet.channel_mult="), 2, "unet.channel_mult must be one or more multipliers >= 1"),
    (base("unet.dropout=1"), 2, "unet.dropout must lie in [0, 1)"),
    (base("unet.attention_resolutions=16"), 2, "unet.attention_resolutions [16] match no level"),
    (base("unet.attention_resolutions=0"), 2, "unet.attention_resolutions must be feature-map sizes >= 1"),
    (base("unet.base_channels=50", "unet.head_channels=16"), 2, "into equal heads"),
    (base("unet.lowres_upsample=nearest"), 2, "unet.lowres_upsample must be 'bilinear' or 'bicubic'"),
    (base("unet.resolution=8"), 2, "unet.resolution is derived"),
    # --- files cdm writes: OS errors in one line
    (["train", "{base}", "--out", "{tmp}/a-file", "--no-progress"], 2, "File exists ({tmp}/a-file)"),
    (["train", "{base}", "--out", "{tmp}/a-file/run", "--no-progress"], 2, "Not a directory ({tmp}/a-file/run)"),
    (["sample", "--stage", "{ckpt}", "--out", "{tmp}/a-file/s", "--n", "2", "--steps", "1"], 2,
     "sample: cannot use the path: Not a directory ({tmp}/a-file/s)"),
    (["sample", "--stage", "{ckpt}", "--out", "{tmp}/a-file", "--n", "2", "--steps", "1"], 2,
     "sample: cannot create a directory: File exists ({tmp}/a-file)"),
    (["train", "{base}", "--out", "{tmp}/full/run", "--no-progress", "#ENOSPC"], 2,
     "train: cannot write: No space left on device ({tmp}/full/run); free some disk space"),
    (["train", "{base}", "--out", "{tmp}/ro/run", "--no-progress", "#EACCES"], 2,
     "train: cannot read or write: Permission denied ({tmp}/ro/run); check its permissions"),
    (["train", "{base}", "--out", "{tmp}/ro/run", "--no-progress", "#EROFS"], 2,
     "the file system is read-only"),
]


@pytest.fixture
def files(tmp_path, toy_npz):
    """The placeholders of CASES, made in ``tmp_path``."""
    base = tmp_path / "base.toml"
    base.write_text(tiny_toml(toy_npz))
    srf = tmp_path / "sr.toml"
    srf.write_text(tiny_toml(toy_npz, name="sr", res=16, lowres=8, aug="gaussian"))
    (tmp_path / "a-directory.toml").mkdir()
    (tmp_path / "a-file").write_text("a regular file")
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 16, 16), np.uint8), labels=np.zeros(0, np.int64))
    np.savez(tmp_path / "float-labels.npz", images=np.zeros((4, 16, 16), np.uint8), labels=np.full(4, 0.5))
    subs = {"{tmp}": str(tmp_path), "{base}": str(base), "{sr}": str(srf), "{npz}": str(toy_npz),
            "{empty_npz}": str(tmp_path / "empty.npz"), "{float_labels_npz}": str(tmp_path / "float-labels.npz")}
    for name, content in FILES.items():
        f = tmp_path / "files" / name
        f.parent.mkdir(exist_ok=True)
        content = content(toy_npz) if callable(content) else content
        f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
        subs[f"{{file:{name}}}"] = str(f)
    return subs


def tiny_checkpoint(path: Path) -> Path:
    """An untrained tiny base stage's checkpoint (no training needed to sample from it)."""
    from cdm.checkpoint import Checkpoint, save_checkpoint
    from cdm.stage import Stage

    cfg = tiny_config(steps=50)
    torch.manual_seed(0)
    sd = Stage(cfg).net.state_dict()
    return save_checkpoint(path, Checkpoint(config=cfg, step=0, model=sd, ema={k: v.clone() for k, v in sd.items()}))


def fill(argv: list[str], subs: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        out.append(a)
    return out


@pytest.mark.parametrize("argv,code,message", CASES, ids=[" ".join(c[0][1:-3] if c[0][-1] == "--dry-run"
                                                                     else c[0]) for c in CASES])
def test_a_bad_config_or_path_is_one_clear_line(argv, code, message, files, tmp_path, capsys, monkeypatch):
    if any("{ckpt}" in a for a in argv):
        files = {**files, "{ckpt}": str(tiny_checkpoint(tmp_path / "base.safetensors"))}
    fault = [a for a in argv if a.startswith("#")]
    if fault:  # the run directory cannot be made: a full disk, a read-only directory, ...
        argv = [a for a in argv if not a.startswith("#")]
        code_ = getattr(errno, fault[0][1:])
        mkdir = Path.mkdir

        def failing_mkdir(self, *a, **kw):
            if self.is_relative_to(tmp_path / "full") or self.is_relative_to(tmp_path / "ro"):
                raise OSError(code_, os.strerror(code_), str(self))
            return mkdir(self, *a, **kw)

        monkeypatch.setattr(Path, "mkdir", failing_mkdir)
    message = fill([message], files)[0]
    assert main(fill(argv, files)) == code
    out = capsys.readouterr()
    err = out.err
    assert err.startswith(W) and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not (tmp_path / "run").exists()  # a refused config writes nothing


def test_the_table_reaches_every_section_of_a_config():
    """Not only a count: every section of a stage config has a refusal in the table (by key or by the
    file that sets it), and no case repeats another."""
    import dataclasses
    import typing

    from cdm.config import StageConfig

    sections = [n for n, tp in typing.get_type_hints(StageConfig).items() if dataclasses.is_dataclass(tp)]
    said = [" ".join(argv) + " " + message for argv, _, message in CASES]
    assert [s for s in sections if not any(f"{s}." in t for t in said)] == []
    assert len({(tuple(argv), message) for argv, _, message in CASES}) == len(CASES) >= 35


def test_numbers_in_configs_are_typed_strictly():
    """Direct checks of the coercion: a bool is no number, a whole float is an integer."""
    from cdm.config import ConfigError, TrainConfig, from_dict

    assert from_dict(TrainConfig, {"steps": 4.0, "lr": 1, "seed": "7"}).steps == 4
    assert from_dict(TrainConfig, {"lr": "1e-3"}).lr == 1e-3
    for bad, msg in [({"steps": False}, "train.steps must be an integer"), ({"lr": None}, "train.lr must be a number"),
                     ({"precision": 16}, "train.precision must be a string"),
                     ({"adam_betas": "0.9,x"}, "train.adam_betas must be a number")]:
        with pytest.raises(ConfigError, match=msg):
            from_dict(TrainConfig, bad, prefix="train.")


@pytest.mark.parametrize("argv,message", [
    (["demo", "--scale", "nan"], "expected a finite number > 0, got 'nan'"),
    (["demo", "--scale", "-1"], "expected a finite number > 0, got '-1'"),
    (["sample", "--stage", "x", "--out", "y", "--n", "many"], "expected an integer >= 1, got 'many'"),
    (["sample", "--stage", "x", "--out", "y", "--n", "0"], "expected an integer >= 1, got '0'"),
    (["sample", "--stage", "x", "--out", "y", "--seed", "-1"], "expected an integer seed in [0, 2^63), got '-1'"),
    (["sample", "--stage", "x", "--out", "y", "--stepz", "3"], "unrecognized arguments: --stepz 3"),
])
def test_bad_arguments_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert err.startswith("cdm: error: ") and err.count("\n") == 1, err  # one line, no usage block


@pytest.mark.slow
def test_what_dry_run_accepts_trains(files, tmp_path, capsys):
    """Settings at the edges of their ranges pass --dry-run, and then train (one step)."""
    edges = ["train.steps=2", "train.ema_decay=0", "train.grad_clip=0", "train.warmup_steps=50",
             "train.log_every=1000", "train.ckpt_every=1000", "train.keep_checkpoints=1",
             "train.sample_every=1", "train.sample_steps=1000", "train.p_uncond=0.5", "train.weight_decay=0",
             "unet.num_res_blocks=0", "unet.channel_mult=1,1,1,1", "unet.attention_resolutions=1",
             "unet.base_channels=6", "unet.head_channels=4", "data.limit=5", "diffusion.steps=1", "resolution=8"]
    sr_edges = ["train.steps=1", "lowres_resolution=1", "resolution=14", "data.resolution=14",
                "unet.channel_mult=1,2", "unet.attention_resolutions=7", "augment.steps=1", "augment.s_max=1",
                "augment.p_zero=1", "train.sample_level=1"]
    levers = ["train.steps=1", "train.crop=2", "unet.mid_attention=false", "train.grad_accum=4", "unet.checkpoint=true"]
    for i, (cfg, sets) in enumerate(((files["{base}"], edges), (files["{sr}"], sr_edges), (files["{sr}"], levers))):
        argv = ["train", cfg, "--out", str(tmp_path / f"run{i}"), "--no-progress",
                *[a for kv in sets for a in ("--set", kv)]]
        assert main(argv + ["--dry-run"]) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert main(argv) == 0, capsys.readouterr().err
        assert "checkpoint: " in capsys.readouterr().out
