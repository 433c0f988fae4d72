"""Training images/s of the shipped stage presets in fp32, bf16 autocast, and bf16 + channels_last.

Measures the full training step (forward, loss, backward, AdamW step) of each preset's network
at its preset batch size, on synthetic inputs, after warm-up. Prints a table and writes JSON.

    .venv/bin/python benchmarks/train_precision.py --out docs/bench/train_precision.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from cdm.config import load_stage_config
from cdm.stage import Stage
from cdm.train import training_step_loss

MODES = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16+channels_last": ("bf16", True)}


def measure(preset: str, precision: str, channels_last: bool, steps: int, repeats: int) -> list[float]:
    cfg = load_stage_config(preset, [f"train.precision={precision}", f"train.channels_last={channels_last}"])
    cfg.resolve(channels=1, num_classes=10)
    torch.manual_seed(0)
    stage = Stage(cfg)
    if channels_last:
        stage.net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(stage.net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    b = cfg.train.batch_size
    x0 = torch.rand(b, 1, cfg.resolution, cfg.resolution) * 2 - 1
    z0 = torch.rand(b, 1, cfg.lowres_resolution, cfg.lowres_resolution) * 2 - 1 if cfg.is_super_resolution else None
    labels = torch.randint(0, 10, (b,))

    def step():
        loss = training_step_loss(stage, x0, z0, labels, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * b / (time.perf_counter() - t))
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--presets", default="fmnist-base8,fmnist-sr8to32,fmnist-single32")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="")
    a = p.parse_args()
    rows = []
    for preset in a.presets.split(","):
        for mode, (prec, cl) in MODES.items():
            r = measure(preset, prec, cl, a.steps, a.repeats)
            rows.append({"preset": preset, "mode": mode, "img_per_s_median": statistics.median(r),
                         "img_per_s_min": min(r), "img_per_s_max": max(r)})
            print(f"{preset:18s} {mode:20s} {statistics.median(r):8.1f} img/s  (min {min(r):.1f}, max {max(r):.1f})",
                  flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor(), "steps": a.steps, "repeats": a.repeats}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
