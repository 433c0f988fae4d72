"""Sharded sampling: shards in any order, re-run or spread over torchrun ranks merge into what
one unsharded run writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cdm.cli import main
from cdm.shards import shard_range

from test_distributed import one_thread  # noqa: F401 (fixture)
from test_faults import save_tiny


@pytest.fixture
def cascade_args(tmp_path) -> list[str]:
    base = save_tiny(tmp_path / "base.safetensors", resolution=8, name="base")
    sr = save_tiny(tmp_path / "sr.safetensors", resolution=16, lowres=8, aug="gaussian", name="sr")
    return ["sample", "--stage", str(base), "--stage", str(sr), "--n", "7", "--steps", "2", "--levels", "0,10",
            "--batch-size", "3"]


def test_shard_ranges_cover_the_run():
    for n, k in ((7, 3), (50000, 64), (5, 5)):
        ranges = [shard_range(n, k, i) for i in range(k)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:]))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_a_sharded_run_merges_into_the_unsharded_result(tmp_path, cascade_args, monkeypatch, capsys, one_thread):
    assert main([*cascade_args, "--out", str(tmp_path / "one")]) == 0
    ref = np.load(tmp_path / "one" / "samples.npz")

    out = tmp_path / "sharded"
    sharded = [*cascade_args, "--out", str(out), "--num-shards", "3"]
    assert main([*sharded, "--shard", "2"]) == 0  # out of order
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 2), (2, 4), (4, 7)]
    assert manifest["labels"] == [0, 1, 2, 0, 1, 2, 0] and all(s["id"].startswith("sha256:") for s in manifest["stages"])
    assert main(["merge", str(out)]) == 2
    assert "2 of 3 shards are not finished (0, 1)" in capsys.readouterr().err

    assert main([*sharded, "--shard", "0"]) == 0
    first = dict(np.load(out / "shard-0000.npz"))
    (out / "shard-0000.npz").unlink()  # any shard can be re-run, with the same result
    assert main([*sharded, "--shard", "0"]) == 0
    again = np.load(out / "shard-0000.npz")
    assert all(np.array_equal(first[k], again[k]) for k in first) and again["seeds"].tolist() == [0, 1]
    capsys.readouterr()
    assert main([*sharded, "--seed", "5"]) == 2  # another run in the same directory is refused
    assert "other seed" in capsys.readouterr().err

    # Under torchrun with 2 processes, rank 1 takes shards 1, 3, ...: here the last one, so it merges.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(sharded) == 0
    assert str(out / "samples.npz") in capsys.readouterr().out
    merged = np.load(out / "samples.npz")
    assert sorted(merged.files) == sorted(ref.files)
    for k in ref.files:
        np.testing.assert_array_equal(merged[k], ref[k])
    assert (out / "stage1-16px.png").exists()
