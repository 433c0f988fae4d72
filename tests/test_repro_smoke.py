"""The Fashion-MNIST reproduction harness (experiments/fmnist_repro.py) end to end at smoke size:
every row, condition and level scored with finite metrics; a re-run retrains and resamples
nothing; re-publishing keeps the hand-written reading; bad input gives a one-line error."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from cdm.eval.ledger import read_rows

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

from cdmrepro.report import READING_PLACEHOLDER  # noqa: E402
from fmnist_repro import main  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist (make data)")

EXPECTED = {("single", "single-stage", 0), ("sr-none", "non-truncated", 0), ("sr-none", "ground-truth", 0),
            ("sr-blur", "non-truncated", 0), ("sr-blur", "ground-truth", 0),
            *(("sr-gaussian", c, s) for c in ("truncated", "non-truncated", "ground-truth") for s in (0, 100)),
            # --diagnostics: the smoke profile's variants
            ("sr-gaussian-p50", "non-truncated", 0), ("sr-gaussian-p50", "ground-truth", 0),
            ("single-p50", "single-stage", 0)}


def _condition(r: dict) -> str:
    return "ground-truth" if r["conditioning"] == "ground-truth" else r["mode"]


def _written(out: Path) -> dict[Path, int]:
    """mtimes of everything that training and sampling write."""
    files = [*out.glob("stages/*/checkpoints/*.safetensors"), *out.glob("points/samples/*.npz"),
             *out.glob("points/*.npy"), out / "classifier" / "classifier.safetensors", *out.glob("cache/*.npz")]
    return {p: p.stat().st_mtime_ns for p in files}


@pytest.mark.slow
def test_smoke_profile_end_to_end_resumes_and_keeps_the_reading(tmp_path, capsys):
    out, docs = tmp_path / "run", tmp_path / "docs"
    argv = ["--out", str(out), "--profile", "smoke", "--publish", str(docs), "--diagnostics"]
    assert main(argv) == 0
    rows = read_rows(out / "points" / "results.jsonl")
    assert {(r["row"], _condition(r), r["level"]) for r in rows} == EXPECTED and len(rows) == len(EXPECTED)
    for r in rows:
        m = r["metrics"]
        assert all(math.isfinite(m[k]) for k in ("fid", "fid_se", "kid")) and m["fid_se"] >= 0
        assert (out / "points" / r["samples"]).exists()
        assert ("inception_fid" in m) == (r["row"] == "single")  # the smoke profile's Inception rows (not variants)
    assert math.isfinite(next(r for r in rows if r["row"] == "single")["metrics"]["inception_fid"])
    by = {(r["row"], _condition(r), r["level"]): r["value"] for r in rows}
    assert by[("sr-gaussian", "truncated", 0)] == pytest.approx(by[("sr-gaussian", "non-truncated", 0)])
    cas = read_rows(out / "cas.jsonl")
    assert [c["row"] for c in cas] == ["single", "sr-none", "sr-gaussian", "sr-gaussian", "sr-blur", "real"]
    assert all(0 <= c["top1"] <= 100 for c in cas)
    summary = json.loads((out / "summary.json").read_text())
    plan = summary["plan"]
    step = plan["single"]["batch_size"] * plan["single"]["flops_per_image"]  # the single stage's FLOPs per step
    assert abs(plan["single"]["train_flops"] - plan["sr-gaussian"]["row_flops"]) <= step / 2
    assert plan["sr-gaussian"]["row_flops"] == plan["base"]["train_flops"] + plan["sr-gaussian"]["train_flops"]
    assert plan["sr-gaussian-p50"]["steps"] == max(1, round(plan["sr-gaussian"]["steps"] * 0.5))  # steps_factor
    cfg = json.loads((out / "plan.json").read_text())["sr-gaussian-p50"]["config"]
    assert cfg["augment"]["kind"] == "gaussian" and cfg["augment"]["p_zero"] == 0.5
    step = plan["single-p50"]["batch_size"] * plan["single-p50"]["flops_per_image"]  # FLOP-matched to its row
    assert abs(plan["single-p50"]["train_flops"] - plan["sr-gaussian-p50"]["row_flops"]) <= step / 2
    md = (docs / "RESULTS.md").read_text()
    assert READING_PLACEHOLDER in md and "| single-stage 32×32 |" in md and "## The paper's claims" in md
    assert "## Diagnostics" in md and "| sr-gaussian-p50 |" in md and "background noise" in md
    for name in ("fid-vs-s.svg", "inception-fid-vs-s.svg", "samples-real.png", "samples-single-single-stage-s0.png",
                 "samples-sr-gaussian-p50-non-truncated-s0.png", "samples-single-p50-single-stage-s0.png"):
        assert (docs / "results" / name).exists() and f"results/{name}" in md
    assert (out / "report.md").exists() and (out / "report" / "fid-vs-s.svg").exists()

    # A re-run is a no-op: nothing retrained, resampled or rescored; the reading survives publishing.
    before, n_cas = _written(out), len(cas)
    assert len(before) > 20
    (docs / "RESULTS.md").write_text(md.replace(READING_PLACEHOLDER, "My reading of the numbers."))
    capsys.readouterr()
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "train " not in log and "sampling" not in log and "CAS " not in log
    assert _written(out) == before
    assert len(read_rows(out / "points" / "results.jsonl")) == len(EXPECTED)
    assert len(read_rows(out / "cas.jsonl")) == n_cas
    md2 = (docs / "RESULTS.md").read_text()
    assert "My reading of the numbers." in md2 and READING_PLACEHOLDER not in md2
    timings = json.loads((out / "timings.json").read_text())
    assert [i["finished"] for i in timings["invocations"]] == [True, True]
    assert timings["invocations"][1]["command"].startswith("python experiments/fmnist_repro.py --out ")


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--profile", "huge"])
    assert e.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "r"), "--profile", "smoke", "--data-path", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmnist_repro: error: Fashion-MNIST file") and "dataset-fashion-mnist" in err
    assert main(["--out", str(tmp_path / "r"), "--profile", "smoke", "--n", "1"]) == 2
    assert "--n must be >= 2" in capsys.readouterr().err
