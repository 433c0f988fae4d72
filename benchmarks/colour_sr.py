"""Does a Gaussian SR stage reproduce its input's colours? Old recipe against new, on real photographs.

The data: a folder of 10 classes x 300 RGB crops, 32x32, of ten colour photographs that Debian ships
in ``plasma-workspace-wallpapers`` (``sudo apt-get install plasma-workspace-wallpapers``; one class
per photograph, crops of random position and size, resized with Lanczos), built once by this script,
plus 50 more crops per class (other random crops) held out for measuring.

Both recipes train the ``fmnist-sr8to32`` preset's Gaussian SR stage 8 -> 32 on that folder
(``data.source=folder``, ``data.channels=3``, ``data.fit=resize``) for the same wall-clock budget:
each recipe's steps are its measured training speed (a short calibration run) times ``--seconds``;
recipes with the same network and batch (old and new here) get the same steps, from their pooled speed.
Then, conditioned on the held-out crops' real 8x8 inputs at level s = 0 (SDE-DPM-Solver++(2M),
25 steps), it reports per channel the correlation between the input and the output downsampled
to 8x8, the colour saturation ratio (mean chroma, max(RGB) - min(RGB), of the downsampled output over
the input's) and the consistency PSNR.

    .venv/bin/python benchmarks/colour_sr.py --out runs/colour --seconds 300 --json docs/bench/colour_sr.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from cdm.cascade import StagePlan, sample_stage
from cdm.checkpoint import list_checkpoints, load_stage
from cdm.config import load_stage_config
from cdm.data import DataConfig, downsample, load_dataset, stage_input
from cdm.flops import train_flops_per_image
from cdm.metrics import consistency_psnr
from cdm.train import train_stage

sys.path.insert(0, str(Path(__file__).parent))
from _common import facts_line, machine_facts  # noqa: E402
from convergence import RECIPES  # noqa: E402

WALLPAPERS = Path("/usr/share/wallpapers")
# The photographs among Debian's plasma-workspace-wallpapers (the others are paintings or renders).
PHOTOS = ["BytheWater", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Kite", "OneStandsOut", "Path",
          "summer_1am", "Volna"]


def make_photo_folder(out: Path, per_class: int, seed: int, src: Path = WALLPAPERS) -> Path:
    """``out/<photo>/<i>.png``: ``per_class`` random square crops (side 1/10 to 1/3 of the short
    side) of each photograph, resized to 32x32. Skipped when ``out`` is complete."""
    if out.is_dir() and all(len(list((out / p).glob("*.png"))) == per_class for p in PHOTOS):
        return out
    missing = [p for p in PHOTOS if not (src / p / "contents" / "images").is_dir()]
    if missing:
        sys.exit(f"colour_sr: the photographs are not in {src} ({', '.join(missing)}); install them with "
                 f"'sudo apt-get install plasma-workspace-wallpapers'")
    rng = random.Random(seed)
    for name in PHOTOS:
        biggest = max((src / name / "contents" / "images").iterdir(), key=lambda f: f.stat().st_size)
        im = Image.open(biggest).convert("RGB")
        w, h = im.size
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = rng.randint(min(w, h) // 10, min(w, h) // 3)
            x, y = rng.randint(0, w - side), rng.randint(0, h - side)
            im.crop((x, y, x + side, y + side)).resize((32, 32), Image.LANCZOS).save(out / name / f"{i:04d}.png")
    return out


def colour_follow(x: torch.Tensor, z0: torch.Tensor) -> dict:
    """How an SR stage's outputs ``x`` ``[N, 3, 32, 32]`` follow their inputs ``z0`` ``[N, 3, 8, 8]``."""
    d = downsample(x.clamp(-1, 1), z0.shape[-1])
    corr = []
    for c in range(3):
        a, b = d[:, c].flatten(), z0[:, c].flatten()
        corr.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))

    def chroma(y: torch.Tensor) -> float:
        return float((y.amax(1) - y.amin(1)).mean())

    return {"channel_correlation": corr, "saturation_ratio": chroma(d) / chroma(z0),
            "consistency_psnr": consistency_psnr(x, z0)}


def config(recipe: str, folder: Path, steps: int):
    over = RECIPES["sr"][recipe] + ["data.source=folder", f"data.path={folder}", "data.channels=3",
                                    "data.fit=resize", "data.resolution=32", "data.split=all", "train.device=cpu",
                                    "train.sample_every=0", f"train.steps={steps}", f"train.ckpt_every={steps}"]
    return load_stage_config("fmnist-sr8to32", over)


def images_per_second(run: Path) -> float:
    rates = [r["img_per_s"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    return sorted(rates)[len(rates) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--recipes", type=lambda t: t.split(","), default=["old", "new"])
    p.add_argument("--seconds", type=float, default=300, help="training wall time per recipe")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    out = Path(a.out)
    facts = machine_facts()
    print(facts_line(facts), flush=True)
    train_dir = make_photo_folder(out / "photos-train", 300, seed=0)
    test_dir = make_photo_folder(out / "photos-heldout", 50, seed=1)
    # Every image of each folder (split "all"): the held-out crops are a folder of their own, so the
    # data module's hashed held-out split of a folder is not wanted here.
    data = load_dataset(DataConfig(source="folder", path=str(train_dir), channels=3, fit="resize", resolution=32,
                                   split="all"))
    test = load_dataset(DataConfig(source="folder", path=str(test_dir), channels=3, fit="resize", resolution=32,
                                   split="all"))
    z0 = stage_input(test.images, 8)
    results = {"machine": facts, "seconds": a.seconds, "photos": PHOTOS, "train_images": len(data),
               "heldout_images": len(test), "recipes": {}}
    rates = {}
    for recipe in a.recipes:  # a short calibration run of each recipe: its training speed
        calib = out / recipe / "calibration"
        if not list_checkpoints(calib):
            train_stage(config(recipe, train_dir, 60), calib, progress=False, data=data)
        rates[recipe] = images_per_second(calib)
    # Recipes that train the same network on the same batch cost the same per step: the same wall time
    # is then the same step count, from their pooled speed (a 60-step calibration is too noisy to tell
    # them apart, and the first one run also pays the process's warm-up).
    cost = {r: (train_flops_per_image(config(r, train_dir, 1).resolve(channels=3, num_classes=len(PHOTOS))),
                config(r, train_dir, 1).train.batch_size) for r in a.recipes}
    if len(set(cost.values())) == 1:
        rates = dict.fromkeys(rates, statistics.median(rates.values()))
    for recipe in a.recipes:
        rate = rates[recipe]
        steps = int(a.seconds * rate / cost[recipe][1])
        run = out / recipe / f"steps{steps}"
        t0 = time.time()
        train_stage(config(recipe, train_dir, steps), run, progress=False, data=data)
        train_s = round(time.time() - t0, 1)
        stage = load_stage(run)
        x, _ = sample_stage(stage, 1, test.labels, list(range(len(test))),
                            StagePlan(steps=25, level=0, sampler="dpmpp-2m-sde"), lowres=z0)
        r = {"steps": steps, "calibrated_img_per_s": rate, "train_s": train_s,
             **colour_follow(x.cpu(), z0)}
        results["recipes"][recipe] = r
        print(f"{recipe}: {steps} steps ({rate:.0f} img/s); correlation R/G/B "
              + " / ".join(f"{c:.3f}" for c in r["channel_correlation"])
              + f"; saturation ratio {r['saturation_ratio']:.2f}; consistency PSNR {r['consistency_psnr']:.1f} dB",
              flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
