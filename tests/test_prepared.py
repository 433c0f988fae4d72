"""Prepared data sets (cdm prepare): the same images as the in-memory loaders, the same batches and
weights in training (in memory vs prepared, with and without prefetching, 1 vs 2 processes, after a
resume), a resumable preparation, a resume that checks the data by its fingerprint, and one-line
errors for bad input that lose nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdm.checkpoint import load_checkpoint
from cdm.cli import main
from cdm.data import DataConfig, load_dataset
from cdm.eval.classifier import Classifier, ClassifierConfig, predict
from cdm.eval.reference import ReferenceSpec, load_reference, training_overlap
from cdm.prepare import PrepareConfig, prepare
from cdm.prepared import IMAGES, MANIFEST, PreparedError, open_prepared
from cdm.runlock import run_lock

from conftest import write_idx
from test_cli import write_tiny
from test_distributed import free_port, one_thread  # noqa: F401 (a fixture)


def photo_folder(root: Path, n: int = 30, seed: int = 0) -> Path:
    """Class folders of images of several sizes and modes (grey, RGB, RGBA, palette, 16-bit), one corrupt file."""
    g = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = int(g.integers(12, 40)), int(g.integers(12, 40))
        a = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray(a)
        im = [im, im.convert("L"), im.convert("RGBA"), im.convert("P"), im][i % 5]
        im.save(d / f"img{i:03d}.{'png' if i % 2 else 'bmp'}")
    Image.fromarray((g.integers(0, 65535, (20, 20))).astype(np.uint16)).save(root / "class0" / "deep.png")
    (root / "class1" / "broken.png").write_bytes(b"not an image")
    return root


def same_sets(a, b) -> None:
    assert len(a) == len(b) and a.class_names == b.class_names
    assert torch.equal(a.images[torch.arange(len(a))], b.images[torch.arange(len(b))])
    assert torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("fit", ["pad", "resize-up"])
def test_a_prepared_folder_holds_what_the_folder_loads(tmp_path, fit):
    src = photo_folder(tmp_path / "photos")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ps = prepare(PrepareConfig(str(src), str(tmp_path / "p"), 24, fit=fit, workers=1, chunk=7, progress=False))
    assert ps.manifest["skipped"] == 1 and ps.image_shape == (3, 24, 24)  # any colour image makes the set RGB
    for split in ("train", "test", "all"):
        with pytest.warns(UserWarning):
            mem = load_dataset(DataConfig(source="folder", path=str(src), resolution=24, fit=fit, split=split,
                                          held_out=0.3))
        for cfg in (DataConfig(source="prepared", path=str(tmp_path / "p"), resolution=24, split=split, held_out=0.3),
                    DataConfig(source="folder", path=str(tmp_path / "p"), resolution=24, split=split, held_out=0.3)):
            lazy = load_dataset(cfg)
            assert lazy.prepared is not None and lazy.memory_bytes == 8 * len(lazy)
            same_sets(mem, lazy)
    # row access: an int, a slice, a mask, repeated and unordered indices
    lazy = load_dataset(DataConfig(source="prepared", path=str(tmp_path / "p"), resolution=24, split="all"))
    full = lazy.images[:]
    assert torch.equal(lazy.images[3], full[3]) and torch.equal(lazy.images[2:9:3], full[2:9:3])
    idx = torch.tensor([5, 1, 5, len(full) - 1, 0])
    assert torch.equal(lazy.images[idx], full[idx])
    mask = torch.arange(len(full)) % 2 == 0
    assert torch.equal(lazy.images[mask], full[mask])


def test_prepared_npz_and_idx_and_the_same_preparation_twice(tmp_path, toy_npz, capsys):
    ps = prepare(PrepareConfig(str(toy_npz), str(tmp_path / "n"), 16, workers=1, progress=False))
    for split in ("train", "test"):
        same_sets(load_dataset(DataConfig(source="npz", path=str(toy_npz), resolution=16, split=split, held_out=0.4)),
                  load_dataset(DataConfig(source="prepared", path=ps.path, resolution=16, split=split, held_out=0.4)))
    # Fashion-MNIST's IDX files keep their own split
    root = tmp_path / "fm"
    root.mkdir()
    g = np.random.default_rng(1)
    for prefix, n in (("train", 20), ("t10k", 8)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", g.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", g.integers(0, 10, n))
    fm = prepare(PrepareConfig(str(root), str(tmp_path / "f"), 32, workers=1, progress=False))
    assert fm.manifest["split"]["rule"] == "source"
    for split in ("train", "test", "all"):
        same_sets(load_dataset(DataConfig(path=str(root), split=split)),
                  load_dataset(DataConfig(source="prepared", path=fm.path, split=split)))
    # the same command again: nothing to do, nothing rewritten
    before = (tmp_path / "f" / IMAGES).stat().st_mtime_ns
    assert main(["prepare", str(root), "--out", str(tmp_path / "f"), "--resolution", "32", "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (tmp_path / "f" / IMAGES).stat().st_mtime_ns == before


KILL_AT = """
import os, signal, sys
import cdm.prepare as p
calls = [0]
real = p.atomic_write
def dying(path, write):
    if path.name == p.PROGRESS:
        calls[0] += 1
        if calls[0] == int(sys.argv[3]):  # chunk k's rows are written, its progress record not yet
            os.kill(os.getpid(), signal.SIGKILL)
    real(path, write)
p.atomic_write = dying
p.prepare(p.PrepareConfig(sys.argv[1], sys.argv[2], 20, workers=1, chunk=4, progress=False))
"""


def test_a_killed_preparation_resumes_to_the_uninterrupted_result(tmp_path):
    src = photo_folder(tmp_path / "photos", n=40)
    with pytest.warns(UserWarning):
        whole = prepare(PrepareConfig(str(src), str(tmp_path / "whole"), 20, workers=1, chunk=4, progress=False))
    out = tmp_path / "killed"
    r = subprocess.run([sys.executable, "-c", KILL_AT, str(src), str(out), "5"], capture_output=True, text=True)
    assert r.returncode == -9  # SIGKILLed mid-way: five chunks' rows on disk, four recorded
    assert json.loads((out / MANIFEST).read_text())["complete"] is False
    assert json.loads((out / ".progress.json").read_text())["items_done"] == 16
    with pytest.raises(PreparedError, match="did not finish.*run the same cdm prepare command again"):
        open_prepared(out)
    with pytest.warns(UserWarning):
        done = prepare(PrepareConfig(str(src), str(out), 20, workers=1, chunk=4, progress=False))
    assert done.fingerprint == whole.fingerprint and done.count == whole.count
    for f in (IMAGES, "labels.i64", "split.bin"):
        assert (out / f).read_bytes() == (tmp_path / "whole" / f).read_bytes()
    assert not (out / ".progress.json").exists()


@pytest.mark.slow
def test_prepare_uses_worker_processes(tmp_path):
    src = photo_folder(tmp_path / "photos", n=24)
    with pytest.warns(UserWarning):
        one = prepare(PrepareConfig(str(src), str(tmp_path / "one"), 16, workers=1, chunk=5, progress=False))
        two = prepare(PrepareConfig(str(src), str(tmp_path / "two"), 16, workers=2, chunk=5, progress=False))
    assert one.fingerprint == two.fingerprint


def err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cdm: error: "), err
    return err[0]


def test_bad_input_to_prepare_is_one_line_and_loses_nothing(tmp_path, toy_npz, capsys):
    out = tmp_path / "p"
    assert main(["prepare", str(tmp_path / "nope"), "--out", str(out), "--resolution", "16"]) == 2
    assert "does not exist" in err_line(capsys) and not out.exists()
    assert main(["prepare", str(toy_npz), "--out", str(out), "--resolution", "16", "--no-progress"]) == 0
    capsys.readouterr()
    files = {f.name: f.read_bytes() for f in out.iterdir()}
    # a different data set at --out: refused, the one there untouched
    assert main(["prepare", str(toy_npz), "--out", str(out), "--resolution", "8", "--no-progress"]) == 2
    assert "holds a different prepared set (resolution 16 there, 8 now)" in err_line(capsys)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == files
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["prepare", str(toy_npz), "--out", str(other), "--resolution", "16", "--no-progress"]) == 2
    assert "not a prepared set" in err_line(capsys) and (other / "notes.txt").read_text() == "mine"
    assert main(["prepare", str(out), "--out", str(tmp_path / "q"), "--resolution", "16"]) == 2
    assert "already a prepared set" in err_line(capsys)
    busy = tmp_path / "busy"  # another cdm prepare is writing there: refused at once, then it may go on
    with run_lock(busy, "preparing"):
        assert main(["prepare", str(toy_npz), "--out", str(busy), "--resolution", "16", "--no-progress"]) == 2
        assert "preparing" in err_line(capsys)
    assert main(["prepare", str(toy_npz), "--out", str(busy), "--resolution", "16", "--no-progress"]) == 0
    capsys.readouterr()
    # a truncated image file, a manifest from a newer cdm, a set at another resolution: training refuses
    cfg = write_tiny(tmp_path, toy_npz, "base", 8, 0, "none")
    train = ["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", "--set", "data.source=prepared"]
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    with open(bad / IMAGES, "r+b") as f:
        f.truncate(100)
    assert main([*train, "--set", f"data.path={bad}"]) == 2
    assert "images.u8 is 100 bytes" in err_line(capsys)
    m = json.loads((out / MANIFEST).read_text())
    (bad / MANIFEST).write_text(json.dumps({**m, "version": 99}))
    assert main([*train, "--set", f"data.path={bad}"]) == 2
    assert "newer cdm (format version 99" in err_line(capsys)
    assert main([*train, "--set", f"data.path={out}", "--set", "data.resolution=32"]) == 2
    assert "prepared at 16px, but data.resolution is 32" in err_line(capsys)
    assert main([*train, "--set", f"data.path={tmp_path / 'missing'}"]) == 2
    assert "does not exist; make it with 'cdm prepare" in err_line(capsys)
    assert not (tmp_path / "run").exists()


SETS = ["train.steps=4", "train.ckpt_every=2", "train.p_uncond=0.25", "data.flip=true", "train.batch_size=4",
        "train.crop=8", "train.lr=3e-3", "unet.mid_attention=false"]


def train(cfg, out, *sets) -> dict:
    args = ["train", str(cfg), "--out", str(out), "--no-progress"]
    for kv in [*SETS, *sets]:
        args += ["--set", kv]
    assert main(args) == 0
    return load_checkpoint(out).model


@pytest.mark.slow
def test_training_on_a_prepared_set_is_bit_identical(tmp_path, toy_npz, one_thread):
    """The same batches (flips, crops, label dropout) in memory and from a prepared set, with or
    without prefetching threads, with gradient accumulation, and after a resume: the same weights,
    bit for bit."""
    cfg = write_tiny(tmp_path, toy_npz, "sr", 16, 8, "gaussian")
    prep = prepare(PrepareConfig(str(toy_npz), str(tmp_path / "prep"), 16, workers=1, progress=False)).path
    mem = train(cfg, tmp_path / "mem")
    lazy = ["data.source=prepared", f"data.path={prep}"]
    for workers in (0, 1, 3):
        w = train(cfg, tmp_path / f"w{workers}", *lazy, f"data.workers={workers}")
        assert all(torch.equal(w[k], mem[k]) for k in mem), workers
    acc = train(cfg, tmp_path / "mem-accum", "train.grad_accum=2")  # micro-batches: their own rounding, alike
    assert all(torch.equal(acc[k], train(cfg, tmp_path / "accum", *lazy, "train.grad_accum=2")[k]) for k in acc)
    half = train(cfg, tmp_path / "resumed", *lazy, "train.steps=2")
    assert any(not torch.equal(half[k], mem[k]) for k in mem)
    resumed = train(cfg, tmp_path / "resumed", *lazy, "data.workers=2")  # a resume may change data.workers
    assert all(torch.equal(resumed[k], mem[k]) for k in mem)
    rec = json.loads((tmp_path / "w1" / "config.json").read_text())["data"]
    assert rec["fingerprint"] == open_prepared(prep).fingerprint


def test_a_resume_checks_the_data_by_its_fingerprint(tmp_path, toy_npz, one_thread, capsys):
    cfg = write_tiny(tmp_path, toy_npz, "base", 8, 0, "none")
    prep = prepare(PrepareConfig(str(toy_npz), str(tmp_path / "prep"), 16, workers=1, progress=False))
    run = tmp_path / "run"
    train(cfg, run, "data.source=prepared", f"data.path={prep.path}", "train.steps=2", "train.crop=0")
    assert f"fingerprint {prep.fingerprint}" in capsys.readouterr().err  # the start-up summary names the set
    moved = tmp_path / "elsewhere"
    shutil.move(prep.path, moved)
    train(cfg, run, "data.source=folder", f"data.path={moved}", "train.crop=0")  # found at another path: resumes
    assert load_checkpoint(run).step == 4
    z = np.load(toy_npz)
    np.savez(tmp_path / "other.npz", images=255 - z["images"], labels=z["labels"])
    other = prepare(PrepareConfig(str(tmp_path / "other.npz"), str(tmp_path / "other"), 16, workers=1, progress=False))
    capsys.readouterr()
    args = ["train", str(cfg), "--out", str(run), "--no-progress", "--set", "data.source=prepared", "--set",
            f"data.path={other.path}", "--set", "train.steps=6"]
    assert main(args) == 2
    line = err_line(capsys)
    assert f"data.fingerprint: '{prep.fingerprint}' -> '{other.fingerprint}'" in line and "--fresh" in line
    assert load_checkpoint(run).step == 4


def test_dry_run_reports_the_prepared_set(tmp_path, toy_npz, capsys):
    cfg = write_tiny(tmp_path, toy_npz, "base", 8, 0, "none")
    prep = prepare(PrepareConfig(str(toy_npz), str(tmp_path / "prep"), 16, workers=1, progress=False))
    assert main(["train", str(cfg), "--out", str(tmp_path / "x"), "--dry-run", "--set", "data.source=prepared",
                 "--set", f"data.path={prep.path}"]) == 0
    err = capsys.readouterr().err
    assert f"fingerprint {prep.fingerprint}" in err and "on disk, read by index" in err
    assert "0 MiB in memory per process" in err
    assert not (tmp_path / "x").exists()


def test_evaluation_reads_a_prepared_set_in_batches(tmp_path, toy_npz):
    prep = prepare(PrepareConfig(str(toy_npz), str(tmp_path / "prep"), 16, workers=1, progress=False)).path
    mem_cfg = DataConfig(source="npz", path=str(toy_npz), resolution=16, held_out=0.4)
    lazy_cfg = DataConfig(source="prepared", path=str(prep), resolution=16, held_out=0.4)
    for spec in (ReferenceSpec(split="train", n=6, seed=3), ReferenceSpec(split="test", n=0)):
        a, b = load_reference(mem_cfg, spec), load_reference(lazy_cfg, spec)
        assert torch.equal(a.at(8), b.at(8)) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.inputs(8), b.inputs(8))
        assert b.fingerprint == load_reference(lazy_cfg, spec).fingerprint
        assert training_overlap(lazy_cfg, b) == training_overlap(mem_cfg, a)
    ref = load_reference(lazy_cfg, ReferenceSpec(split="all", n=0))
    assert [len(x) for x, _ in ref.batches(16, size=10)] == [10, 10, 4]
    net = Classifier(ClassifierConfig(resolution=16, channels=1, num_classes=3))
    mem = load_reference(mem_cfg, ReferenceSpec(split="all", n=0))
    assert torch.equal(predict(net, ref.images, batch_size=5)["logits"], predict(net, mem.images, batch_size=5)["logits"])


@pytest.mark.slow
def test_two_processes_on_a_prepared_set_train_what_one_does(tmp_path, toy_npz, one_thread):
    cfg = write_tiny(tmp_path, toy_npz, "sr", 16, 8, "gaussian")
    prep = prepare(PrepareConfig(str(toy_npz), str(tmp_path / "prep"), 16, workers=1, progress=False)).path
    sets = [f"--set={kv}" for kv in [*SETS, "data.source=prepared", f"data.path={prep}", "train.steps=2",
                                     "train.warmup_steps=0"]]
    accum = ["--set=train.grad_accum=2"]  # the 2 processes also accumulate 2 micro-batches each
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "cdm.cli", "train", str(cfg),
                        "--out", str(tmp_path / "ddp"), "--no-progress", *sets, *accum],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(["train", str(cfg), "--out", str(tmp_path / "one"), "--no-progress",
                 *[s for s in sets if "data.source" not in s and "data.path" not in s]]) == 0  # one process, in memory
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "ddp")
    for k in a.model:  # the gradient sums run in another order: float rounding only
        torch.testing.assert_close(b.model[k], a.model[k], rtol=1e-4, atol=2e-5)
    assert torch.equal(a.rng["data"], b.rng["data"])


def test_images_smaller_than_the_data_resolution_are_reported(tmp_path, toy_npz):
    """Enlarging small images is never silent: loading a folder or an .npz in memory and preparing
    one each say how many were enlarged (data.fit = "resize-up"); padding them is not enlarging."""
    import warnings

    src = photo_folder(tmp_path / "photos", n=12)  # 12..40 px images, one 20 px 16-bit, one unreadable
    sides = [min(Image.open(f).size) for f in sorted(src.rglob("*")) if f.is_file() and f.name != "broken.png"]
    small, total = sum(m < 24 for m in sides), len(sides)
    assert 0 < small < total
    with pytest.warns(UserWarning, match=rf"{small} of {total} images in .* smaller than data.resolution = 24px"):
        load_dataset(DataConfig(source="folder", path=str(src), resolution=24, fit="resize-up", split="all"))
    with pytest.warns(UserWarning, match=rf"{small} of {total} images in .* smaller than data.resolution = 24px"):
        ps = prepare(PrepareConfig(str(src), str(tmp_path / "p"), 24, fit="resize-up", workers=1, progress=False))
    assert ps.manifest["upsampled"] == small
    with pytest.warns(UserWarning, match="24 of 24 images .* smaller than data.resolution = 32px"):
        load_dataset(DataConfig(source="npz", path=str(toy_npz), resolution=32, fit="resize-up", split="all"))
    with warnings.catch_warnings(record=True) as seen:  # padded, not enlarged: nothing to say
        warnings.simplefilter("always")
        load_dataset(DataConfig(source="npz", path=str(toy_npz), resolution=32, fit="pad", split="all"))
    assert not [w for w in seen if "smaller than" in str(w.message)]


def test_a_stage_that_cannot_be_guided_says_so(tmp_path, toy_npz, one_thread):
    cfg = write_tiny(tmp_path, toy_npz, "sr", 16, 8, "gaussian")
    with pytest.warns(UserWarning, match=r"class-conditional but trains without label dropout .* cannot be guided"):
        train(cfg, tmp_path / "r", "train.steps=1", "train.p_uncond=0")
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(cfg, tmp_path / "g", "train.steps=1", "train.p_uncond=0.1")
    assert not [w for w in seen if "label dropout" in str(w.message)]


def test_presets_say_what_they_are_for(capsys):
    from cdm.config import list_presets

    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_presets()
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)
    assert any(line.startswith("folder-sr8to32") and "32 px" in line and "guidable" in line for line in lines)
