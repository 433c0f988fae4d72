"""The README's Python example runs as written, on two tiny stages instead of the demo's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cdm.cli import main
from test_cli import write_tiny
from test_features import HAVE_INCEPTION

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python() -> str:
    text = README.read_text()
    section = text[text.index("#### From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_INCEPTION, reason="FID Inception weights not installed (make install)")
def test_the_readme_python_example_runs(tmp_path, toy_npz, capsys, monkeypatch):
    runs = []
    for name, res, lowres, aug in (("base", 8, 0, "none"), ("sr", 16, 8, "gaussian")):
        cfg = write_tiny(tmp_path, toy_npz, name, res, lowres, aug)
        assert main(["train", str(cfg), "--out", str(tmp_path / name), "--no-progress",
                     "--set", "data.held_out=0.3"]) == 0  # 24 toy images: hold out a few to compare with
        runs.append(str(tmp_path / name))
    code = readme_python()
    small = (code.replace('"runs/demo/fmnist-base8", "runs/demo/fmnist-sr8to32"', f'"{runs[0]}", "{runs[1]}"')
             .replace("n=2000", "n=0").replace("steps=25", "steps=2").replace("levels=[0, 100]", "levels=[0, 10]")
             .replace("200", "6").replace("resolution=32", "resolution=16"))
    assert small.count(runs[0]) == 1 and "steps=2," in small and "n=0" in small  # the example is what ran
    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "cache"))
    exec(compile(small, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "'fid':" in out and "'n_fake': 6" in out
