"""The equal-compute headline study (experiments/headline.py): the budget is split as planned, the
verdicts follow the seeds' spread, and the smoke profile runs end to end and resumes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

from cdmrepro.headline import HEADLINES, Headline, aggregate, chosen_split, claims, plan_headline  # noqa: E402
from cdmrepro.profiles import get_profile  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_data = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist (make data)")


@needs_data
@pytest.mark.slow
def test_every_cascade_spends_the_single_stages_budget_split_as_planned():
    h = HEADLINES["smoke"]
    plans = plan_headline(get_profile("smoke"), h, "cpu")
    rows_per_split = sum(1 + len(h.rows(b)) for b in h.budgets)  # base + SR rows (blur at 1 x B)
    assert len(plans) == len(h.seeds) * (len(h.budgets) + len(h.splits) * rows_per_split) + 3 * len(h.seeds)
    assert "b1/seed0/f0.3/sr-blur" in plans and "b0.5/seed0/f0.3/sr-blur" not in plans
    for b in h.budgets:
        single = plans[f"b{b:g}/seed0/single"].train_flops
        for f in h.splits:
            base, sr = plans[f"b{b:g}/seed0/f{f:g}/base"].train_flops, plans[f"b{b:g}/seed0/f{f:g}/sr-gaussian"].train_flops
            # whole steps: within one step of each stage of the planned share
            assert base + sr == pytest.approx(single, rel=0.25) and base / (base + sr) == pytest.approx(f, abs=0.15)
    assert plans["b1/seed1/single"].config.train.seed == 1 and plans["b1/seed0/f0.3/base"].config.train.seed == 0
    three = [plans[f"b1/seed0/3-stage/{n}"] for n in ("base", "sr8to16", "sr16to32")]
    assert [(p.config.lowres_resolution, p.config.resolution) for p in three] == [(0, 8), (8, 16), (16, 32)]
    assert sum(p.train_flops for p in three) == pytest.approx(plans["b1/seed0/single"].train_flops, rel=0.25)


def rows_for(fids: dict) -> tuple[list[dict], list[dict]]:
    """Report cells and seed 0's split cells: ``{(row, split, select_fid): report FIDs per seed}``
    (a split's report cells are used only if it is the chosen one)."""
    rows, selected = [], []
    for (row, split, sel), per_seed in fids.items():
        for k, fid in enumerate(per_seed):
            e = {"budget": 1.0, "seed": k, "split": split, "row": row, "level": 0, "select_fid": sel}
            if row != "single" and k == 0:
                selected.append({**e, "kind": "select", "fid": None})
            rows.append({**e, "kind": "report", "fid": fid, "fid_se": 0.1, "inception_fid": None})
    return rows, selected


def test_the_split_is_chosen_on_selection_fids_and_claims_need_the_seed_spread():
    h = Headline(seeds=(0, 1, 2), budgets=(1.0,), splits=(0.1, 0.2))
    rows, selected = rows_for({("single", None, None): [5.0, 5.2, 4.8],
                               ("sr-none", 0.1, 9.0): [3.0, 3.1, 2.9], ("sr-none", 0.2, 8.0): [9.0, 9.5, 8.5],
                               ("sr-gaussian", 0.1, 2.0): [2.0, 2.1, 1.9], ("sr-gaussian", 0.2, 3.0): [1.0, 1.0, 1.0],
                               ("sr-blur", 0.1, 4.0): [4.0, 4.1, 3.9]})
    assert chosen_split(selected, 1.0, "sr-none") == 0.2
    table = {e["row"]: e for e in aggregate(rows, selected, h)}
    # chosen by selection FID (8.0 < 9.0), not by the reported FIDs it is then reported with
    assert table["sr-none"]["split"] == 0.2 and table["sr-none"]["fid_mean"] == pytest.approx(9.0)
    assert table["sr-none"]["select_fid_by_split"] == {0.1: 9.0, 0.2: 8.0}
    assert table["sr-gaussian"]["split"] == 0.1 and table["sr-gaussian"]["fid_sd"] == pytest.approx(0.1)
    got = {c["claim"]: c for c in claims(list(table.values()))}
    assert got["a"]["verdict"] == "holds" and got["a"]["difference"] == pytest.approx(7.0)
    assert got["b"]["verdict"] == "holds"
    assert got["d"]["verdict"] == "holds" and got["d"]["difference"] == pytest.approx(2.0)
    se = math.sqrt(0.2 ** 2 / 3 + 0.1 ** 2 / 3)
    assert got["b"]["se"] == pytest.approx(se)
    # a gap inside twice the standard error over seeds is not resolved
    close = rows_for({("single", None, None): [2.0, 2.6, 1.4], ("sr-gaussian", 0.1, 1.0): [1.9, 1.5, 2.3]})
    verdict = claims(aggregate(*close, Headline(seeds=(0, 1, 2), budgets=(1.0,), splits=(0.1,))))
    assert [c["verdict"] for c in verdict if c["claim"] == "b"] == ["not resolved"]


@needs_data
@pytest.mark.slow
def test_the_smoke_study_runs_end_to_end_resumes_and_a_fresh_clone_trains_only_missing_cells(tmp_path):
    from headline import main

    out, record = tmp_path / "hl", tmp_path / "record"
    assert main(["--out", str(out), "--profile", "smoke", "--record", str(record), "--seeds", "0"]) == 0
    assert main(["--out", str(out), "--profile", "smoke", "--record", str(record),
                 "--publish", str(tmp_path / "docs")]) == 0
    s = json.loads((out / "headline.json").read_text())
    h = HEADLINES["smoke"]
    # the select seed's cascades selected at every split; every seed's rows reported at the chosen one
    assert h.select_seeds == (0,) and {e["seed"] for e in s["selected"]} == {0}
    assert len(s["selected"]) == len(h.splits) * sum(len(h.rows(b)) for b in h.budgets)
    cells = [json.loads(line) for line in (record / "cells.jsonl").read_text().splitlines()]
    assert len(cells) == s["cells_recorded"] == s["cells_planned"] == len(s["rows"]) + len(s["selected"]) == (
        len(h.seeds) * (sum(1 + len(h.rows(b)) for b in h.budgets) + 1)  # + 3-stage
        + len(h.splits) * sum(len(h.rows(b)) for b in h.budgets))
    assert all(math.isfinite(r["fid"]) and r["seconds"] > 0 and r["train_flops"] > 0 for r in s["rows"])
    assert all(r["fid"] is None and r["select_fid"] is not None for r in s["selected"])
    # seed 1 trained only the chosen split of each row
    chosen = {(e["budget"], e["row"]): e["split"] for e in s["table"] if e["split"] is not None}
    seed1 = {p.name for p in (out / "stages").glob("b*__seed1__f*")}
    assert seed1 == {f"b{b:g}__seed1__f{f:g}__{n}" for (b, row), f in chosen.items() for n in ("base", row)}
    assert {(e["budget"], e["row"]) for e in s["table"]} == {(b, r) for b in h.budgets
                                                             for r in ("single", "sr-none", "sr-gaussian")} | {
        (1.0, "3-stage"), (1.0, "sr-blur")}
    for e in s["table"]:
        if e["split"] is not None:  # the chosen split's report FIDs, over the seeds
            at = [r["fid"] for r in s["rows"] if (r["budget"], r["row"], r["split"]) == (e["budget"], e["row"], e["split"])]
            assert e["fid_mean"] == pytest.approx(sum(at) / len(at)) and len(at) == len(h.seeds)
    three = [r for r in s["rows"] if r["row"] == "3-stage"]
    assert all(len(r["level"]) == 2 and set(r["level"]) <= set(h.levels) for r in three)
    assert (tmp_path / "docs" / "HEADLINE.md").read_text().count("| (a)") == len(h.budgets)
    before = {p: p.stat().st_mtime_ns for p in out.glob("stages/*/checkpoints/*.safetensors")}
    assert main(["--out", str(out), "--profile", "smoke", "--record", str(record)]) == 0  # resumes: nothing retrained
    assert {p: p.stat().st_mtime_ns for p in out.glob("stages/*/checkpoints/*.safetensors")} == before
    # a fresh clone with the committed record: nothing trained, the same table
    fresh = tmp_path / "fresh"
    assert main(["--out", str(fresh), "--profile", "smoke", "--record", str(record)]) == 0
    assert not (fresh / "stages").exists() and (record / "classifier" / "classifier.safetensors").exists()
    assert json.loads((fresh / "headline.json").read_text())["table"] == s["table"]
    # the report alone, from the record (e.g. cells copied back from another machine)
    (tmp_path / "docs" / "HEADLINE.md").unlink()
    assert main(["--out", str(tmp_path / "other"), "--profile", "smoke", "--record", str(record), "--report-only",
                 "--publish", str(tmp_path / "docs")]) == 0
    assert (tmp_path / "docs" / "HEADLINE.md").read_text().count("| (a)") == len(h.budgets)
    assert not (tmp_path / "other" / "stages").exists()


def test_a_recorded_cell_counts_only_under_the_same_settings_and_stage_configs(tmp_path):
    from cdmrepro.headline import Record, study_settings

    p = get_profile("smoke")
    settings = study_settings(p, HEADLINES["smoke"])
    rec = Record(tmp_path, settings, print)
    rec.add({"cell": "b1/seed0/single", "stages": {"b1/seed0/single": "abc"}, "classifier": "c1", "fid": 1.0})
    again = Record(tmp_path, settings, print)
    assert again.get("b1/seed0/single", {"b1/seed0/single": "abc"}, "c1")["fid"] == 1.0
    assert again.get("b1/seed0/single", {"b1/seed0/single": "changed preset"}, "c1") is None
    assert again.get("b1/seed0/single", {"b1/seed0/single": "abc"}, "another classifier") is None
    logged = []
    other = Record(tmp_path, {**settings, "n_report": 17}, logged.append)
    assert other.get("b1/seed0/single", {"b1/seed0/single": "abc"}, "c1") is None and "1 cells" in logged[0]


def test_bad_seeds_are_a_one_line_error(capsys, tmp_path):
    from headline import main

    assert main(["--out", "unused", "--profile", "smoke", "--seeds", "7"]) == 2
    assert "seeds are [0, 1]" in capsys.readouterr().err
    assert main(["--out", "unused", "--profile", "smoke", "--seeds", "x"]) == 2
    capsys.readouterr()
    # seed 1 reports at the split seed 0 chose: without seed 0's cells it cannot start
    assert main(["--out", str(tmp_path / "hl"), "--profile", "smoke", "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "run those first (--seeds 0)" in err and "\n" not in err
    assert main(["--out", str(tmp_path / "hl"), "--profile", "smoke", "--seeds", "1,0"]) == 2
    assert "list the select seed(s) [0] first" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "hl"), "--profile", "smoke", "--report-only"]) == 2
    assert "no cells recorded there yet" in capsys.readouterr().err


def test_other_seeds_run_the_budgets_whose_split_is_chosen_and_skip_the_rest(tmp_path):
    # `--seeds 1` beside a `--seeds 0` still training its last budget: seed 1 runs the budgets whose
    # selection cells are all recorded and waits for the others
    from cdmrepro.headline import SELECT, Record, _check_select_seeds, study_settings

    h = HEADLINES["smoke"]
    rec = Record(tmp_path, study_settings(get_profile("smoke"), h), print)
    for row in h.rows(0.5):
        for f in h.splits:
            rec.add({"cell": f"b0.5/seed0/f{f:g}/{row}", "kind": SELECT, "seed": 0, "budget": 0.5, "row": row,
                     "split": f})
    assert _check_select_seeds(rec, h, (1,)) == [1.0]
    assert _check_select_seeds(rec, h, (0, 1)) == []  # seed 0 trains them first in the same call
    empty = Record(tmp_path / "none", study_settings(get_profile("smoke"), h), print)
    with pytest.raises(ValueError, match="not recorded for any budget"):
        _check_select_seeds(empty, h, (1,))


def _append_rows(path: str, who: int, n: int) -> None:
    from cdm.eval.ledger import append_row

    for i in range(n):
        append_row(path, {"who": who, "i": i})


def test_two_processes_appending_to_one_record_lose_no_row(tmp_path):
    import multiprocessing

    from cdm.eval.ledger import read_rows

    path = str(tmp_path / "cells.jsonl")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_rows, args=(path, who, 40)) for who in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = read_rows(path)
    assert sorted((r["who"], r["i"]) for r in rows) == [(w, i) for w in (0, 1) for i in range(40)]


@needs_data
@pytest.mark.slow
def test_a_machine_without_inception_defers_it_and_another_fills_it_in_from_the_kept_samples(tmp_path):
    # a lent GPU cannot carry the Inception weights: its row cells wait for them, and the samples it
    # kept give, scored elsewhere, the Inception FID the run would have recorded itself
    from dataclasses import replace

    from cdm.config import ConfigError
    from cdmrepro.headline import fill_inception, markdown, RunOptions, run_headline

    p = get_profile("smoke")
    h = replace(HEADLINES["smoke"], seeds=(0,), budgets=(0.5,), splits=(0.3,), inception=True)
    args = (p, h, "cpu", "", "test", print)
    deferred = run_headline(tmp_path / "gpu", *args, RunOptions(record=tmp_path / "rec", defer_inception=True))
    rows = deferred["rows"]
    assert len(rows) == 3 and all(r["inception_fid"] is None and r["inception_pending"] for r in rows)
    assert deferred["inception_pending"] == sorted(r["cell"] for r in rows)
    assert "Inception FID pending for 3 cells" in markdown(deferred)
    with pytest.raises(ConfigError, match="has its report samples"):  # the samples are elsewhere
        fill_inception(tmp_path / "elsewhere", *args, record=tmp_path / "rec")
    filled = fill_inception(tmp_path / "gpu", *args, record=tmp_path / "rec")
    assert filled["inception_pending"] == [] and "pending" not in markdown(filled)
    direct = run_headline(tmp_path / "cpu", *args, RunOptions(record=tmp_path / "rec2"))  # the same cells, at once
    got = {r["cell"]: r["inception_fid"] for r in filled["rows"]}
    assert got == pytest.approx({r["cell"]: r["inception_fid"] for r in direct["rows"]}, rel=1e-6)
    assert all(math.isfinite(v) for v in got.values())
    assert fill_inception(tmp_path / "gpu", *args, record=tmp_path / "rec")["rows"] == filled["rows"]  # nothing left


@needs_data
@pytest.mark.slow
def test_processes_can_split_one_seeds_cells_and_a_row_waits_for_all_its_splits(tmp_path):
    # --only lets several processes (on a GPU's spare capacity, say) share seed 0's cells; a row is
    # reported only once every split of it is selected, never at the best of a partial sweep
    from dataclasses import replace

    from cdmrepro.headline import RunOptions, run_headline

    p = get_profile("smoke")
    h = replace(HEADLINES["smoke"], seeds=(0,), budgets=(0.5,))
    logged: list[str] = []
    args = (p, h, "cpu", "", "test", logged.append)
    first = run_headline(tmp_path / "a", *args, RunOptions(record=tmp_path / "rec", only=("b0.5/seed0/f0.3/*",)))
    assert {r["cell"] for r in first["selected"]} == {"b0.5/seed0/f0.3/sr-none", "b0.5/seed0/f0.3/sr-gaussian"}
    assert first["rows"] == [] and not any("skipped" in m for m in logged)  # the reports were not its cells
    second = run_headline(tmp_path / "b", *args, RunOptions(record=tmp_path / "rec", only=("b0.5/seed0/sr-*",)))
    assert second["rows"] == [] and any("b0.5/seed0/sr-none skipped" in m and "f0.5/sr-none" in m for m in logged)
    third = run_headline(tmp_path / "c", *args, RunOptions(record=tmp_path / "rec"))  # the rest
    assert len(third["selected"]) == 4 and {r["row"] for r in third["rows"]} == {"single", "sr-none", "sr-gaussian"}
    assert {r["cell"]: r["select_fid"] for r in third["selected"] if "f0.3" in r["cell"]} == {
        r["cell"]: r["select_fid"] for r in first["selected"]}  # f0.3's selections were kept, not redone


@needs_data
@pytest.mark.slow
def test_a_budget_waiting_for_its_splits_still_trains_the_other_seeds_single_stage(tmp_path):
    from dataclasses import replace

    from cdmrepro.headline import SELECT, Record, RunOptions, run_headline, study_settings

    p, h = get_profile("smoke"), HEADLINES["smoke"]
    rec = Record(tmp_path / "rec", study_settings(p, h), print)
    for row in h.rows(0.5):  # budget 0.5 is ready, budget 1 waits for seed 0's selections
        for f in h.splits:
            rec.add({"cell": f"b0.5/seed0/f{f:g}/{row}", "kind": SELECT, "seed": 0, "budget": 0.5, "row": row,
                     "split": f, "select_fid": 1.0, "level": 0, "metric": "fid", "seconds": 1.0})
    logged: list[str] = []
    s = run_headline(tmp_path / "out", p, replace(h, seeds=(1,)), "cpu", "", "test", logged.append,
                     RunOptions(record=tmp_path / "rec", seeds=(1,), only=("b1/*",)))
    # the rows that need no split: the single stage and the three-stage cascade
    assert [r["cell"] for r in s["rows"]] == ["b1/seed1/single", "b1/seed1/3-stage"]
    assert any("cascade rows at budget(s) 1B skipped" in m for m in logged)


def test_a_cell_recorded_again_supersedes_the_first_and_is_not_taken_for_another_study(tmp_path):
    from cdmrepro.headline import Record, study_settings

    settings = study_settings(get_profile("smoke"), HEADLINES["smoke"])
    rec = Record(tmp_path, settings, print)
    rec.add({"cell": "b1/seed0/single", "fid": 1.0, "inception_fid": None, "inception_pending": True})
    rec.add({"cell": "b1/seed0/single", "fid": 1.0, "inception_fid": 30.0})  # as --fill-inception does
    logged: list[str] = []
    again = Record(tmp_path, settings, logged.append)
    assert again.cells["b1/seed0/single"]["inception_fid"] == 30.0 and logged == []


@needs_data
@pytest.mark.slow
def test_the_gpu_profile_plans_the_same_study_at_16_to_64_px():
    # the GPU profile runs the study at 16 -> 64 px (Fashion-MNIST upsampled, said so in its
    # description), every stage at its resolution, the budget split as at 8 -> 32
    from dataclasses import replace

    p = get_profile("gpu")
    assert (p.base_resolution, p.resolution, p.fit) == (16, 64, "resize-up") and "upsampled" in p.about
    h = replace(HEADLINES["gpu"], seeds=(0,), budgets=(1.0,), splits=(0.2,))
    plans = plan_headline(p, h, "cpu")
    res = {k: (v.config.lowres_resolution, v.config.resolution) for k, v in plans.items()}
    assert res == {"b1/seed0/single": (0, 64), "b1/seed0/f0.2/base": (0, 16), "b1/seed0/f0.2/sr-none": (16, 64),
                   "b1/seed0/f0.2/sr-gaussian": (16, 64), "b1/seed0/f0.2/sr-blur": (16, 64),
                   "b1/seed0/3-stage/base": (0, 16), "b1/seed0/3-stage/sr16to32": (16, 32),
                   "b1/seed0/3-stage/sr32to64": (32, 64)}
    assert all((v.config.data.resolution, v.config.data.fit) == (64, "resize-up") for v in plans.values())
    assert plans["b1/seed0/f0.2/sr-gaussian"].config.unet.channel_mult == [1, 2, 2, 4]
    single, base = plans["b1/seed0/single"].train_flops, plans["b1/seed0/f0.2/base"].train_flops
    assert base + plans["b1/seed0/f0.2/sr-gaussian"].train_flops == pytest.approx(single, rel=0.01)
    assert base / single == pytest.approx(0.2, rel=0.01)


def _fmnist_subset(folder: Path, n_train: int, n_test: int) -> Path:
    """The first images of Debian's Fashion-MNIST, as IDX files in ``folder`` (a study's data, small)."""
    from cdm.data import FASHION_MNIST_DIR, read_idx
    from conftest import write_idx

    folder.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte.gz"
            write_idx(folder / name, read_idx(Path(FASHION_MNIST_DIR) / name)[:n])
    return folder


@needs_data
@pytest.mark.slow
def test_a_study_at_another_scale_runs_end_to_end(tmp_path):
    # the gpu profile's scale (16 -> 64 px, resized data) with the smoke profile's tiny networks: every
    # stage trains at its resolution, and the domain classifier and the reference are at 64 px
    from dataclasses import replace

    from cdm.checkpoint import load_stage
    from cdm.config import ConfigError
    from cdmrepro.headline import markdown, report_name, RunOptions, run_headline

    quick = ("train.sample_every=0", "train.log_every=1")
    tiny = ("unet.base_channels=8", "unet.num_res_blocks=1", "unet.head_channels=8", "train.batch_size=8", *quick)
    p = replace(get_profile("smoke"), resolution=64, base_resolution=16, fit="resize-up", classifier_limit=640,
                classifier={"width": 4, "feature_dim": 8, "epochs": 1, "min_steps": 10, "batch_size": 64},
                overrides={"base": (*tiny, "unet.channel_mult=1,2", "unet.attention_resolutions=8"),
                           "sr": (*tiny, "unet.channel_mult=1,2", "unet.attention_resolutions=32"),
                           "single": quick})
    h = replace(HEADLINES["smoke"], seeds=(0,), budgets=(1.0,), splits=(0.1,), levels=(0,), n_select=8,
                n_report=8, blur_budgets=())
    s = run_headline(tmp_path / "hl", p, h, "cpu", str(_fmnist_subset(tmp_path / "fmnist", 1000, 300)), "test",
                     print, RunOptions(record=tmp_path / "rec"))
    assert {r["row"] for r in s["rows"]} == {"single", "sr-none", "sr-gaussian", "3-stage"}
    assert all(math.isfinite(r["fid"]) for r in s["rows"])
    stages = {d.name: load_stage(sorted((d / "checkpoints").glob("*.safetensors"))[-1], "cpu")
              for d in (tmp_path / "hl" / "stages").iterdir()}
    assert {k: (st.config.lowres_resolution, st.config.resolution) for k, st in stages.items()} == {
        "b1__seed0__single": (0, 64), "b1__seed0__f0.1__base": (0, 16), "b1__seed0__f0.1__sr-none": (16, 64),
        "b1__seed0__f0.1__sr-gaussian": (16, 64), "b1__seed0__3-stage__base": (0, 16),
        "b1__seed0__3-stage__sr16to32": (16, 32), "b1__seed0__3-stage__sr32to64": (32, 64)}
    assert json.loads((tmp_path / "rec" / "classifier" / "summary.json").read_text())["data"]["resolution"] == 64
    assert any("-64px-" in f.name for f in (tmp_path / "hl" / "cache").iterdir())
    assert "Fashion-MNIST, 16×16 → 64×64 (its 28-px images upsampled (bicubic) to 64 px)" in markdown(s)
    assert report_name(p) == "HEADLINE-16to64.md" and report_name(get_profile("cpu")) == "HEADLINE.md"
    # the 8 -> 32 study recorded into the same folder would score in the 64-px classifier's space: refused
    with pytest.raises(ConfigError, match="its own --record"):
        run_headline(tmp_path / "hl32", get_profile("smoke"), h, "cpu", "", "test", print,
                     RunOptions(record=tmp_path / "rec"))


@pytest.mark.slow
def test_the_studies_keep_the_clean_share_their_sr_stages_were_run_with_whatever_the_preset_says(monkeypatch):
    """The studies sample unguided and were run with augment.p_zero = 0.1, whatever the preset says (it
    said 0.7 for a while): every planned SR stage keeps 0.1 unless a variant sets its own."""
    import cdm.config
    from cdm.config import load_stage_config
    from cdmrepro.plan import plan_all

    read = cdm.config.read_preset

    def preset_of_another_time(name: str) -> dict:
        d = read(name)
        if "augment" in d and d["augment"].get("kind") == "gaussian":
            d["augment"]["p_zero"] = 0.7
        return d

    monkeypatch.setattr(cdm.config, "read_preset", preset_of_another_time)
    assert load_stage_config("fmnist-sr8to32").augment.p_zero == 0.7
    plans = plan_headline(get_profile("cpu"), HEADLINES["cpu"], "cpu")
    srs = {k: v.config.augment.p_zero for k, v in plans.items() if v.config.lowres_resolution}
    assert srs and set(srs.values()) == {0.1}
    repro = plan_all(get_profile("cpu"), "cpu", diagnostics=True)
    assert repro["sr-gaussian"].config.augment.p_zero == 0.1 and repro["sr-gaussian-p50"].config.augment.p_zero == 0.5
