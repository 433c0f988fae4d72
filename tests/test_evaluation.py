"""Evaluation: CAS on a separable toy set, the resumable level sweep, per-stage checks, reports, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cdm.cascade import Cascade, SamplingPlan, StagePlan
from cdm.config import ConfigError
from cdm.eval.classifier import ClassifierConfig, classification_accuracy_score, load_classifier, save_classifier, \
    train_classifier
from cdm.metrics import psnr
from cdm.eval.ledger import Judge
from cdm.eval.report import Report, line_plot_svg
from cdm.stage import Stage
from cdm.eval.sweep import SweepConfig, best_level, run_sweep

from conftest import tiny_config, toy_images

TINY_CLF = ClassifierConfig(resolution=16, width=8, feature_dim=16, epochs=6, batch_size=32, lr=5e-3, max_shift=0,
                            min_steps=0)


def test_cas_on_a_separable_toy_set():
    gen, test = toy_images(240, 16, seed=1), toy_images(90, 16, seed=2)
    good = classification_accuracy_score(gen.images, gen.labels, test.images, test.labels, TINY_CLF,
                                         real_images=gen.images, real_labels=gen.labels)
    assert good["generated"]["top1"] > 95 and good["real"]["top1"] > 95
    assert len(good["generated"]["per_class_top1"]) == 10  # default num_classes of the config
    # Samples that show the wrong class for their label (a generator ignoring its conditioning)
    # teach the wrong mapping: CAS collapses although the images themselves are perfect.
    wrong = (gen.labels + 1) % 3
    bad = classification_accuracy_score(gen.images, wrong, test.images, test.labels, TINY_CLF)
    assert bad["generated"]["top1"] < 10


def test_classifier_round_trip(tmp_path):
    data = toy_images(64, 16)
    net = train_classifier(data.images, data.labels, ClassifierConfig(**{**TINY_CLF.__dict__, "epochs": 1}))
    save_classifier(net, tmp_path / "c.safetensors", extra={"note": "x"})
    back, extra = load_classifier(tmp_path / "c.safetensors")
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(back(x), net(x))
    assert extra == {"note": "x"}


def test_psnr_closed_form():
    a = torch.zeros(2, 1, 4, 4)
    assert psnr(a, a + 0.1) == pytest.approx(10 * np.log10(4 / 0.01), rel=1e-5)


def two_stage() -> Cascade:
    torch.manual_seed(0)
    stages = [Stage(tiny_config(resolution=4, name="base")), Stage(tiny_config(resolution=8, lowres=4, aug="gaussian"))]
    for s in stages:
        s.net.eval()
    return Cascade(stages)


def test_sweep_scores_every_level_in_both_modes_and_resumes(tmp_path):
    cascade = two_stage()
    sampling = SamplingPlan.uniform(2, steps=3)
    calls = []

    class Interrupted(Exception):
        pass

    def scorer(x, labels):
        calls.append(1)
        if len(calls) == 4 and interrupt:
            raise Interrupted  # killed in the middle of the sweep
        return float(x.abs().mean())

    cfg = SweepConfig(levels=[0, 10, 40], n=6, batch_size=4)
    interrupt = True
    with pytest.raises(Interrupted):
        run_sweep(cascade, sampling, cfg, Judge(scorer, "m"), tmp_path, progress=lambda s: None)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
    calls.clear()
    interrupt = False
    rows = run_sweep(cascade, sampling, cfg, Judge(scorer, "m"), tmp_path, progress=lambda s: None)
    assert len(calls) == 3  # only the three missing candidates were scored
    assert sorted((r["mode"], r["level"]) for r in rows) == sorted(
        (m, s) for m in ("non-truncated", "truncated") for s in (0, 10, 40))
    # non-truncated re-noises one stored z0; truncated stores one z_s per level
    assert (tmp_path / "lower-z0.npy").exists()
    assert all((tmp_path / f"lower-zs-{s}.npy").exists() for s in (0, 10, 40))
    # at s = 0 both modes see the same clean input, hence the same score
    by = {(r["mode"], r["level"]): r["value"] for r in rows}
    assert by[("truncated", 0)] == pytest.approx(by[("non-truncated", 0)], rel=1e-6)
    assert best_level(rows)["value"] == min(r["value"] for r in rows)


def test_ground_truth_sweep_conditions_on_the_real_inputs_and_keeps_its_own_rows(tmp_path):
    cascade = two_stage()
    sampling = SamplingPlan.uniform(2, steps=3)
    n = 6
    z_gt = torch.rand(n, 1, 4, 4) * 2 - 1
    gt_labels = torch.tensor([2, 0, 1, 1, 0, 2])
    seen = []

    def scorer(x, labels):
        seen.append(labels.clone())
        return float(x.mean())

    gen = run_sweep(cascade, sampling, SweepConfig(levels=[0, 10], n=n), Judge(scorer, "m"), tmp_path, progress=lambda s: None)
    cfg = SweepConfig(levels=[0, 10], n=n, conditioning="ground-truth")
    gt = run_sweep(cascade, sampling, cfg, Judge(scorer, "m"), tmp_path, progress=lambda s: None,
                   ground_truth=(z_gt, gt_labels))
    assert [(r["conditioning"], r["mode"]) for r in gt] == [("ground-truth", "non-truncated")] * 2
    assert len(gen) == 4 and {r["conditioning"] for r in gen} == {"generated"}  # one file, rows kept apart
    assert torch.equal(seen[-1], gt_labels)  # scored with the real images' labels
    # the SR stage saw the real inputs: the same call by hand gives the same images
    x, _ = cascade.sample_stage(1, gt_labels, list(range(n)), StagePlan(steps=3, level=10), lowres=z_gt)
    assert gt[1]["value"] == pytest.approx(float(x.clamp(-1, 1).mean()), rel=1e-5)
    # a re-run is a no-op; other real inputs are other points
    calls = len(seen)
    run_sweep(cascade, sampling, cfg, Judge(scorer, "m"), tmp_path, progress=lambda s: None, ground_truth=(z_gt, gt_labels))
    assert len(seen) == calls
    run_sweep(cascade, sampling, cfg, Judge(scorer, "m"), tmp_path, progress=lambda s: None, ground_truth=(-z_gt, gt_labels))
    assert len(seen) == calls + 2
    with pytest.raises(ConfigError, match="non-truncated"):
        run_sweep(cascade, sampling, SweepConfig(n=n, conditioning="ground-truth", modes=["truncated"]),
                  Judge(scorer, "m"), tmp_path, ground_truth=(z_gt, gt_labels))
    with pytest.raises(ConfigError, match="unknown conditioning"):
        run_sweep(cascade, sampling, SweepConfig(n=n, conditioning="real"), Judge(scorer, "m"), tmp_path)


def test_ground_truth_inputs_are_a_seeded_subset_downsampled_as_in_training(toy_npz):
    from cdm.data import DataConfig, downsample, load_dataset, to_float
    from cdm.eval.sweep import ground_truth_inputs

    data = DataConfig(source="npz", path=str(toy_npz), resolution=16)
    z, labels = ground_truth_inputs(data, "train", 10, 4, seed=3)
    ds = load_dataset(data)  # the train split the stage trains on
    # every input is one of the training images, made exactly as training makes it (float, not re-quantised)
    made = downsample(to_float(ds.images), 4)
    hits = [int(((made - zi).abs().flatten(1).amax(1) == 0).nonzero()[0]) for zi in z]
    assert len(set(hits)) == 10 and torch.equal(labels, ds.labels[hits])
    assert z.shape == (10, 1, 4, 4)
    z2, _ = ground_truth_inputs(data, "train", 10, 4, seed=4)
    assert not torch.equal(z, z2)


def test_multi_metric_scorer_ranks_by_its_primary_metric(tmp_path):
    cascade = two_stage()
    sampling = SamplingPlan.uniform(2, steps=2)

    def scorer(x, labels):
        m = float(x.abs().mean())
        return {"a": m, "b": -m, "note": "text"}

    cfg = SweepConfig(levels=[0, 20, 40], n=4, modes=["non-truncated"])
    rows = run_sweep(cascade, sampling, cfg, Judge(scorer, "m", "b"), tmp_path, progress=lambda s: None)
    assert all(r["value"] == r["metrics"]["b"] and r["metrics"]["note"] == "text" for r in rows)
    assert best_level(rows) is best_level(rows, "b")
    assert best_level(rows, "a")["metrics"]["a"] == min(r["metrics"]["a"] for r in rows)
    with pytest.raises(ValueError, match="primary"):
        run_sweep(cascade, sampling, cfg, Judge(scorer, "m"), tmp_path / "x", progress=lambda s: None)


def test_kept_samples_are_scored_again_without_sampling_and_changes_are_rescored(tmp_path, monkeypatch):
    cascade = two_stage()
    sampling = SamplingPlan.uniform(2, steps=2)
    cfg = SweepConfig(levels=[0, 10], n=4, keep_samples=True)
    got = []

    def scorer(x, labels):
        if fail:
            raise RuntimeError("killed while scoring")
        got.append(x.clone())
        return float(x.mean())

    fail = True
    with pytest.raises(RuntimeError):
        run_sweep(cascade, sampling, cfg, Judge(scorer, "m"), tmp_path, progress=lambda s: None)
    kept = list((tmp_path / "samples").glob("*.npz"))
    assert len(kept) == 1
    fail = False
    sampled = []
    real = Cascade.sample_stage
    monkeypatch.setattr(Cascade, "sample_stage", lambda self, *a, **k: sampled.append(a[0]) or real(self, *a, **k))
    rows = run_sweep(cascade, sampling, cfg, Judge(scorer, "m"), tmp_path, progress=lambda s: None)
    assert len(rows) == 4 and all((tmp_path / r["samples"]).exists() for r in rows)
    assert sampled.count(1) == 3  # the SR stage sampled the three points that were not kept yet
    z = np.load(kept[0])
    assert z["images"].dtype == np.uint8 and z["images"].shape == (4, 1, 8, 8) and z["lowres"].shape == (4, 1, 4, 4)
    # other weights, or another sampler setting, are other points; the lower caches are rebuilt
    sampled.clear()
    with torch.no_grad():
        next(cascade.stages[0].net.parameters()).add_(0.1)
    rows2 = run_sweep(cascade, sampling, cfg, Judge(scorer, "m"), tmp_path, progress=lambda s: None)
    assert len(rows2) == 4 and {r["lower_fingerprints"][0] for r in rows2} != {r["lower_fingerprints"][0] for r in rows}
    assert sampled.count(0) == 3  # z0 once, z_s for s = 0 and 10
    sampling.stages[1].steps = 3
    assert len(run_sweep(cascade, sampling, cfg, Judge(scorer, "m"), tmp_path, progress=lambda s: None)) == 4
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 12


def test_report_is_self_contained(tmp_path):
    from cdm.images import save_grid

    save_grid(torch.zeros(4, 1, 8, 8), tmp_path / "g.png", nrow=2)
    rep = Report("t")
    rep.table([{"a": 1.23456, "b": "x"}])
    rep.image(tmp_path / "g.png", "grid.png", "a grid")
    rep.svg(line_plot_svg({"m": [(0, 1.0), (10, 0.5)]}, "s", "fid"), "plot.svg", "a plot")
    html = rep.write(tmp_path / "r").read_text()
    assert "data:image/png;base64," in html and "<svg" in html and "1.235" in html
    md = (tmp_path / "r" / "report.md").read_text()
    assert "![a grid](grid.png)" in md and (tmp_path / "r" / "plot.svg").exists()


def test_line_plot_reference_lines_widen_the_y_range_and_join_the_legend():
    svg = line_plot_svg({"m": [(0, 1.0), (10, 2.0)]}, "s", "fid", hlines={"baseline": 5.0, "bad": float("nan")})
    assert "stroke-dasharray" in svg and "baseline" in svg and "bad" not in svg
    assert ">5.32<" in svg  # the top tick lies above the reference line: 5 + 8% of the range 1..5


class PixelFeatures:
    """A stand-in feature space for tests: the images' pixels (the FID Inception costs minutes on a CPU)."""
    name = "pixels"

    def __init__(self, device=None):
        pass

    def __call__(self, images):
        return {"features": images.flatten(1).float().numpy() / 255, "probs": None}


@pytest.mark.slow
def test_eval_and_sweep_from_the_cli(tmp_path, toy_npz, capsys, monkeypatch):
    from cdm.cli import main

    monkeypatch.setattr("cdm.eval.features.InceptionFID", PixelFeatures)
    from test_cli import write_tiny

    base = write_tiny(tmp_path, toy_npz, "base", 8, 0, "none")
    sr = write_tiny(tmp_path, toy_npz, "sr", 16, 8, "gaussian")
    assert main(["train", str(base), "--out", str(tmp_path / "base"), "--no-progress"]) == 0
    assert main(["train", str(sr), "--out", str(tmp_path / "sr"), "--no-progress"]) == 0
    assert main(["train-classifier", "--out", str(tmp_path / "clf"), "--data-from", str(sr), "--no-progress",
                 "--set", "epochs=1", "--set", "width=8", "--set", "batch_size=8", "--set", "min_steps=0",
                 "--data", "held_out=0.3"]) == 0  # 24 toy images: hold out enough to test on
    casc = tmp_path / "cascade.json"
    casc.write_text(json.dumps({"stages": ["base", "sr"], "sampling": {
        "mode": "non-truncated", "stages": [{"steps": 2, "level": 0}, {"steps": 2, "level": 0}]}}))
    env = {"CDM_CACHE": str(tmp_path / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert main(["eval", "--cascade", str(casc), "--out", str(tmp_path / "ev"), "--n", "12", "--n-ref", "24",
                     "--classifier", str(tmp_path / "clf"), "--cas", "--cas-epochs", "1", "--split", "train"]) == 0
        res = json.loads((tmp_path / "ev" / "results.json").read_text())
        assert [r["stage"] for r in res["scores"]] == [0, 1]
        assert all(np.isfinite(r["fid"]) and r["n_fake"] == 12 and r["n_real"] == 24 for r in res["scores"])
        assert res["scores"][0]["feature_space"].startswith("cdm-classifier-")
        assert "consistency_psnr" in res["per_stage"][0]["ground_truth"]
        assert 0 <= res["cas"]["generated"]["top1"] <= 100
        assert (tmp_path / "ev" / "report.html").exists()
        assert "guidance w" in (tmp_path / "ev" / "report.md").read_text()  # the report says how it sampled
        # scoring against the training split is reported, not silent
        assert res["reference_overlap"]["sr"] == 24 and "trained on" in capsys.readouterr().out
        before = casc.read_text()
        assert main(["sweep", "--cascade", str(casc), "--out", str(tmp_path / "sw"), "--levels", "0,5", "--n", "6",
                     "--n-ref", "24", "--classifier", str(tmp_path / "clf"), "--split", "train",
                     "--sampler", "ddim", "--steps", "3"]) == 0
        summary = json.loads((tmp_path / "sw" / "summary.json").read_text())
        best = summary["best"]
        assert {r["sampler"] for r in summary["rows"]} == {"ddim"} and {r["steps"] for r in summary["rows"]} == {3}
        assert all(r["metrics"]["fid_se"] > 0 for r in summary["rows"])  # every point has an error bar
        saved = json.loads(casc.read_text())["sampling"]
        assert summary["written"] == (casc.read_text() != before) and summary["decision"] in capsys.readouterr().out
        if summary["written"]:
            assert saved["stages"][1]["level"] == best["level"] and saved["mode"] == best["mode"]
        # the sweep's sampler override is never written back
        assert saved["stages"][1].get("sampler", "ancestral") == "ancestral" and saved["stages"][1]["steps"] == 2
        assert (tmp_path / "sw" / "sweep.svg").exists()
        # --stage works as in cdm sample; a level found is written into OUT/cascade.json
        assert main(["sweep", "--stage", str(tmp_path / "base"), "--stage", str(tmp_path / "sr"), "--out",
                     str(tmp_path / "sw2"), "--levels", "0,5", "--n", "6", "--n-ref", "24", "--modes", "non-truncated",
                     "--classifier", str(tmp_path / "clf"), "--split", "train", "--steps", "2",
                     "--feature", "classifier,inception"]) == 0  # "inception": the stand-in above
        s2 = json.loads((tmp_path / "sw2" / "summary.json").read_text())
        assert s2["written"] == (tmp_path / "sw2" / "cascade.json").exists()
        # a second feature space is scored beside the one that ranks, on the same samples
        assert s2["metric"].startswith("fid[cdm-classifier")
        assert all(np.isfinite(r["metrics"]["fid[pixels]"]) and r["metrics"]["fid[pixels]_se"] > 0 for r in s2["rows"])
        assert "fid[pixels] ± se" in (tmp_path / "sw2" / "report.md").read_text()
        # ground-truth inputs: the same sweep on real low-res images; the cascade file is left alone
        before = casc.read_text()
        assert main(["sweep", "--cascade", str(casc), "--out", str(tmp_path / "sw"), "--levels", "0,5", "--n", "6",
                     "--n-ref", "24", "--classifier", str(tmp_path / "clf"), "--split", "train",
                     "--conditioning", "ground-truth", "--keep-samples"]) == 0
        summary = json.loads((tmp_path / "sw" / "summary.json").read_text())
        assert [(r["conditioning"], r["mode"], r["level"]) for r in summary["rows"]] == [
            ("ground-truth", "non-truncated", 0), ("ground-truth", "non-truncated", 5)]
        assert casc.read_text() == before and len(list((tmp_path / "sw" / "samples").glob("*.npz"))) == 2
        out = capsys.readouterr().out
        assert "lowest: ground-truth, s = " in out and "ablation" in out


def test_the_sweep_writes_a_level_only_when_it_wins_beyond_the_noise():
    from cdm.eval.search import decide as _decide

    def row(mode, level, value, se):
        return {"mode": mode, "level": level, "value": value, "metrics": {"fid": value, "fid_se": se}}

    rows = [row("non-truncated", 0, 5.0, 0.2), row("non-truncated", 100, 3.0, 0.2), row("truncated", 100, 4.0, 0.2)]
    best, cur, write, why = _decide(rows, "fid", "non-truncated", 0)
    assert best is rows[1] and cur is rows[0] and write and "beats" in why  # 2.0 > 2 * hypot(0.2, 0.2)
    best, cur, write, why = _decide([row("non-truncated", 0, 3.3, 0.2), rows[1]], "fid", "non-truncated", 0)
    assert not write and "within the noise" in why  # 0.3 < 0.57
    assert not _decide(rows, "fid", "non-truncated", 100)[2]  # already the best
    assert not _decide(rows, "fid", "non-truncated", 50)[2]  # the current setting was not swept
