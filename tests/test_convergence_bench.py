"""benchmarks/convergence.py's reading of its own results, on hand-made rows (nothing trained)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from convergence import flops_needed, flops_table, ladder_table, reference_table  # noqa: E402


def test_flops_needed_interpolates_in_log_fid_between_the_checkpoints_around_the_crossing():
    pts = [(10.0, 8.0), (20.0, 2.0), (30.0, 1.0)]
    # log FID falls from log 8 to log 2 between 10 and 20: 4 is half way
    assert flops_needed(pts, 4.0) == pytest.approx(15.0)
    assert flops_needed(list(reversed(pts)), 1.0) == pytest.approx(30.0)  # order of the points is irrelevant
    assert flops_needed(pts, 9.0) == 10.0  # already below at the first checkpoint
    assert flops_needed(pts, 0.5) is None  # never reached
    assert flops_needed(pts, 2.0 * math.sqrt(0.5)) == pytest.approx(25.0)


def _row(recipe, seed, step, fid, condition="base", stage="base", **kw):
    return {"stage": stage, "recipe": recipe, "seed": seed, "step": step, "fid": fid, "fid_se": 0.1,
            "condition": condition, "train_flops": step * 1e12, "n": 1000, "floor": 0.04, "ema": "checkpoint",
            "sample_seed": 0, "total_steps": 1600, **kw}


def test_flops_table_targets_the_mean_of_the_old_recipes_final_fids():
    rows = [_row("old", s, st, f) for s, fin in ((0, 1.0), (1, 3.0)) for st, f in ((10, 9.0), (20, 5.0), (30, fin))]
    rows += [_row("new", 0, st, f) for st, f in ((1, 4.0), (2, 2.0), (4, 1.0))]
    table = flops_table(rows)
    assert "the old recipe's final FID, 2.00 (mean of 2 seeds, step 30, 30.0 TFLOP)" in table
    assert "| new | 0 | 4 | 1.00 ± 0.10 | 2.0 | 0.07 |" in table  # reaches 2.0 at 2 TFLOP of the old's 30
    # old seed 0 crosses 2.0 between (20, 5.0) and (30, 1.0): log-linearly at 20 + 10 ln 2.5 / ln 5
    assert f"| old | 0 | 30 | 1.00 ± 0.10 | {20 + 10 * math.log(2.5) / math.log(5):.1f} | 0.86 |" in table
    assert "| old | 1 | 30 | 3.00 ± 0.10 | not reached | — |" in table


def test_reference_table_sets_the_augmented_stage_beside_the_unaugmented_one_at_the_same_step():
    rows = [_row("new-noaug", 0, 1600, 1.0, "real", "sr", consistency_psnr=36.0),
            _row("new-noaug", 0, 1600, 9.0, "generated", "sr", level=0, consistency_psnr=20.0),
            _row("new", 0, 1600, 1.2, "real", "sr", consistency_psnr=33.0),
            _row("new", 0, 1600, 2.2, "generated", "sr", level=100, consistency_psnr=25.0),
            _row("new", 0, 800, 4.0, "generated", "sr", level=100, consistency_psnr=24.0)]
    table = reference_table(rows).splitlines()
    assert table[-2] == "| new | 0 | 1600 | 1.20 ± 0.10 | 33.0 dB | 2.20 ± 0.10 (s = 100) |"
    assert table[-1] == "| new-noaug | 0 | 1600 | 1.00 ± 0.10 | 36.0 dB | 9.00 ± 0.10 (s = 0) |"
    assert reference_table(rows[2:]) == ""


def test_ladder_table_gives_each_seeds_flops_to_each_target_and_the_ratio_of_the_means():
    rows = [_row("old", s, st, f) for s in (0, 1) for st, f in ((10, 0.8), (20, 0.4), (30, 0.2))]
    rows += [_row("new", s, st, f) for s in (0, 1) for st, f in ((2, 0.8), (4, 0.4), (6, 0.3))]
    table = ladder_table(rows)
    assert "| old | 20.0 / 20.0 | 30.0 / 30.0 | — / — |" in table
    assert "| new | 4.0 / 4.0 | — / — | — / — |" in table
    assert "| new / old (means) | 0.20 | — | — |" in table
    rows = [r for r in rows if not (r["recipe"] == "new" and r["step"] == 2)]  # new first scored at 0.4
    assert "| new | ≤4.0 / ≤4.0 | — / — | — / — |" in ladder_table(rows)


def test_reference_table_keeps_guided_rows_apart_from_the_unguided_ones_of_the_same_checkpoint():
    rows = [_row("new-puncond0.1", 0, 1600, 1.3, "real", "sr", consistency_psnr=33.0),
            _row("new-puncond0.1", 0, 1600, 2.3, "generated", "sr", level=100, consistency_psnr=25.0),
            _row("new-puncond0.1", 0, 1600, 0.9, "real", "sr", consistency_psnr=34.0, guidance=1.0),
            _row("new-puncond0.1", 0, 1600, 0.8, "generated", "sr", level=100, consistency_psnr=25.5, guidance=1.0)]
    table = reference_table(rows).splitlines()
    assert table[-2] == "| new-puncond0.1 | 0 | 1600 | 1.30 ± 0.10 | 33.0 dB | 2.30 ± 0.10 (s = 100) |"
    assert table[-1] == "| new-puncond0.1 (w = 1) | 0 | 1600 | 0.90 ± 0.10 | 34.0 dB | 0.80 ± 0.10 (s = 100) |"
