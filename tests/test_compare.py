"""Scores that rank: bootstrap standard errors, the real-vs-real floor, the small-reference warning
and the paired comparison of two cascades (``cdm eval --compare``), on Gaussian features."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cdm.eval.compare import paired_verdicts
from cdm.eval.features import ReferenceFeatures
from cdm.eval.floor import floor_scores, small_reference_warning
from cdm.eval.quality import score_line, scores_with_se, standard_error
from cdm.eval.verdict import Verdict, beyond_noise, disagreement, verdict
from cdm.metrics import feature_stats, kid_bootstrap, polynomial_mmd2

D = 6


def gauss_ref(m: int, seed: int = 0) -> ReferenceFeatures:
    r = np.random.default_rng(seed).standard_normal((m, D))
    mu, sigma = feature_stats(r)
    return ReferenceFeatures(r, "gauss", f"N(0, I) m={m}", mu, sigma)


def test_kid_bootstrap_se_matches_the_spread_over_independent_sets():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((300, D))
    draws = [0.3 + rng.standard_normal((150, D)) for _ in range(60)]
    spread = np.std([polynomial_mmd2(x, ref) for x in draws])
    se = np.mean([np.std(kid_bootstrap([x], ref, 40, seed=1)[:, 0], ddof=1) for x in draws[:8]])
    assert se == pytest.approx(spread, rel=0.3)
    # the values are the MMD^2 less the reference's own (constant) term: differences are exact
    a, b = draws[0], draws[1]
    full = kid_bootstrap([a, b], ref, 2)
    assert np.isfinite(full).all() and full.shape == (2, 2)
    with pytest.raises(ValueError, match="one shape"):
        kid_bootstrap([a, b[:10]], ref)


def test_the_paired_bootstrap_cancels_what_the_two_sets_share():
    ref = gauss_ref(1000)
    a = np.random.default_rng(1).standard_normal((300, D))
    b = a.copy()
    b[:60] *= 1.5  # B: A's samples (the same seeds) with a fifth of them worse
    fid, kid = paired_verdicts(a, b, ref)
    assert fid["better"] == "A" and kid["diff"] < 0 and fid["diff"] < 0
    assert fid["line"].startswith("fid: A better than B by") and "(beyond 2 SE)" in fid["line"]
    # paired, the shared samples cancel: taken as independent, the same scores could not be told apart
    assert not beyond_noise(fid["diff"], np.hypot(fid["a_se"], fid["b_se"]))
    # the SE of one score is the one cdm eval reports for it
    assert fid["a_se"] == pytest.approx(standard_error("fid", a, ref))


def test_sets_from_one_distribution_cannot_be_told_apart():
    ref = gauss_ref(1000)
    rng = np.random.default_rng(2)
    a, c = rng.standard_normal((150, D)), rng.standard_normal((150, D))
    for v in paired_verdicts(a, c, ref) + paired_verdicts(a, a, ref):
        assert v["better"] is None and v["line"].startswith(f"{v['metric']}: cannot tell A and B apart")
        assert "within 2 SE" in v["line"]


def test_beyond_noise_is_the_one_rule_and_disagreement_is_worded():
    assert beyond_noise(0.5, 0.2) and not beyond_noise(0.4, 0.2) and not beyond_noise(float("nan"), 0.1)
    fid, kid = verdict("fid", 10.0, 12.0, 0.5), Verdict("kid", 3.0, 2.9, 0.2)
    assert fid.better == "A" and kid.better is None and kid.leaning == "B"
    text = disagreement([fid, kid])
    assert "fid favour(s) A" in text and "kid favour(s) B" in text and "only fid is beyond the noise" in text
    both_noisy = disagreement([verdict("fid", 10.0, 10.5, 1.0), kid])
    assert "neither is beyond the noise" in both_noisy
    assert disagreement([fid, verdict("kid", 1.0, 2.0, 5.0)]) is None  # same direction: no disagreement


def test_the_floor_is_a_real_sets_score_and_small_references_are_warned_about():
    rng = np.random.default_rng(3)
    real, fake = rng.standard_normal((200, D)), 0.25 + rng.standard_normal((200, D))
    small, large = gauss_ref(40, seed=4), gauss_ref(4000, seed=5)
    f_small, f_large = floor_scores(real, small), floor_scores(real, large)
    for f in (f_small, f_large):
        assert f["n"] == 200 and all(f[k] > 0 for k in ("fid_se", "kid_se", "fid_ref_se"))
    assert f_large["fid"] < scores_with_se(fake, large)["fid"]  # real images score below a shifted set
    assert f_small["fid_ref_se"] > 4 * f_large["fid_ref_se"]  # the reference's noise falls with its size
    fid_small = scores_with_se(fake, small)["fid"]
    msg = small_reference_warning(fid_small, f_small, 40)
    need = int(msg.split("about ")[1].split()[0])
    assert msg.startswith("the reference has 40 images: FID differences under ~") and need > 40
    assert "\n" not in msg
    assert small_reference_warning(scores_with_se(fake, large)["fid"], f_large, 4000) is None


def test_a_score_line_shows_the_error_bars_and_the_floor():
    row = {"stage": 1, "resolution": 32, "feature_space": "x", "n_fake": 1000, "n_real": 286, "fid": 12.3,
           "fid_se": 0.4, "kid": 0.01, "kid_se": 0.002, "precision": 0.5,
           "floor": {"n": 1000, "fid": 3.1, "fid_se": 0.2, "kid": 0.0, "kid_se": 0.001}}
    line = score_line(row)
    assert "fid=12.3 ± 0.4 (real-vs-real floor at n=1000: 3.1 ± 0.2)" in line and "precision=0.5," not in line
    assert "kid=0.01 ± 0.002 (real-vs-real floor at n=1000: 0 ± 0.001)" in line and line.endswith("precision=0.5")


def test_eval_compare_from_the_cli(tmp_path, toy_npz, capsys, monkeypatch):
    from cdm.cli import main
    from test_cli import write_tiny

    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "cache"))
    base = write_tiny(tmp_path, toy_npz, "base", 8, 0, "none")
    base.write_text(base.read_text().replace("[data]\n", "[data]\nheld_out = 0.4\n"))  # a test split to score against
    assert main(["train", str(base), "--out", str(tmp_path / "base"), "--no-progress"]) == 0
    assert main(["train-classifier", "--out", str(tmp_path / "clf"), "--data-from", str(base), "--no-progress",
                 "--set", "epochs=1", "--set", "width=8", "--set", "batch_size=8", "--set", "min_steps=0"]) == 0
    casc = tmp_path / "b.json"
    casc.write_text(json.dumps({"stages": [str(tmp_path / "base")], "sampling": {"stages": [{"steps": 1}]}}))
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "base"), str(casc), "--out", str(tmp_path / "cmp"), "--n", "8",
                 "--classifier", str(tmp_path / "clf"), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert res["sampling"]["A"]["stages"][0]["steps"] == 2 == res["sampling"]["B"]["stages"][0]["steps"]
    comp = res["comparisons"][0]
    assert comp["floor"]["n"] == 8 and comp["floor"]["source"].startswith("npz:train")  # real images in their place
    assert [v["metric"] for v in comp["verdicts"]] == ["fid", "kid"]
    for v in comp["verdicts"]:  # one line per metric, its verdict in the one rule's words
        assert v["line"] in out and np.isfinite(v["se"]) and v["better"] in ("A", "B", None)
        assert v["better"] is None or abs(v["diff"]) > 2 * v["se"]
    assert "report:" in out and (tmp_path / "cmp" / "report.md").read_text().count("cannot tell") + \
        (tmp_path / "cmp" / "report.md").read_text().count("better than") >= 2
    # the same cascade on both sides: identical samples, nothing to tell apart
    assert main(["eval", "--compare", str(tmp_path / "base"), str(tmp_path / "base"), "--out", str(tmp_path / "same"),
                 "--n", "8", "--classifier", str(tmp_path / "clf")]) == 0
    assert capsys.readouterr().out.count("cannot tell A and B apart (difference 0 ") == 2
