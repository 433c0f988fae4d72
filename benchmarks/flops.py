"""Achieved FLOP/s of training each preset, against this machine's measured matmul peak.

(i) The peak: ``torch.mm`` of square n×n matrices (2·n³ FLOPs each) in fp32 and bf16 for a few
sizes, fp32 and bf16 interleaved; the peak of a precision is its best rate over sizes and repeats.

(ii) Per preset: the counted training FLOPs per image (:func:`cdm.flops.train_flops_per_image`:
forward and backward through the network), times the measured training images/s (the step of
``benchmarks/train_precision.py``: loss, backward, AdamW, preset batch size; fp32 and bf16
autocast interleaved), gives the achieved GFLOP/s and its fraction of the same precision's peak.

FlopCounterMode counts matmuls, convolutions and attention only; element-wise work
(normalisation, activations, the loss, q_sample) and the optimiser step are not counted but do
take time, so the fraction is a lower bound on how busy the matmul units are kept.

    .venv/bin/python benchmarks/flops.py --out docs/bench/flops.json
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from _common import (PRESETS, cdm_train_step, facts_line, fmt, interleaved_rates, load_average, machine_facts,
                     print_table, resolved_config, summary, write_json)
from cdm.flops import train_flops_per_image

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NOTE = ("FLOPs counted by torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions and attention "
        "(forward + backward, 2 FLOPs per multiply-add); element-wise ops and the AdamW step are excluded "
        "from the count but included in the measured time.")


def matmul_peak(sizes: list[int], repeats: int, seconds: float) -> dict[int, dict[str, dict]]:
    """GFLOP/s of ``torch.mm`` per size and precision; each timed repeat runs about ``seconds``."""
    out: dict[int, dict[str, dict]] = {}
    for n in sizes:
        mats = {name: (torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)) for name, dt in DTYPES.items()}
        a32, b32 = mats["fp32"]
        torch.mm(a32, b32)
        t0 = time.perf_counter()
        torch.mm(a32, b32)
        iters = max(1, math.ceil(seconds / max(time.perf_counter() - t0, 1e-6)))
        cases = {name: (lambda a=a, b=b: torch.mm(a, b), 2 * n ** 3) for name, (a, b) in mats.items()}
        rates = interleaved_rates(cases, iters, repeats, warmup=1)
        out[n] = {name: summary([r / 1e9 for r in rs]) for name, rs in rates.items()}
        print(f"mm {n}x{n}: " + ", ".join(f"{k} best {s['max']:.1f} GFLOP/s" for k, s in out[n].items()), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=PRESETS)
    p.add_argument("--sizes", default="512,1024,2048,4096", help="square matmul sizes for the peak")
    p.add_argument("--mm-seconds", type=float, default=0.5, help="about how long one timed matmul repeat runs")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="")
    a = p.parse_args()
    facts = machine_facts()
    print(facts_line(facts), flush=True)

    mm = matmul_peak([int(s) for s in a.sizes.split(",")], a.repeats, a.mm_seconds)
    peak = {name: max(mm[n][name]["max"] for n in mm) for name in DTYPES}
    print("\nMatmul GFLOP/s, best (median) over repeats:\n")
    print_table(["n", *DTYPES], [[n, *(f"{s['max']:.1f} ({s['median']:.1f})" for s in row.values())]
                                 for n, row in mm.items()])
    print("peak: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak.items()) + "\n", flush=True)

    rows = []
    for preset in a.presets.split(","):
        flops = train_flops_per_image(resolved_config(preset))
        steps = {prec: cdm_train_step(preset, prec) for prec in DTYPES}
        rates = interleaved_rates({k: (s.step, s.batch_size) for k, s in steps.items()}, a.steps, a.repeats, a.warmup)
        for prec, r in rates.items():
            img = summary(r)
            gflops = summary([x * flops / 1e9 for x in r])
            rows.append({"preset": preset, "batch_size": steps[prec].batch_size, "precision": prec,
                         "train_flops_per_image": flops, "img_per_s": img, "achieved_gflop_per_s": gflops,
                         "peak_gflop_per_s": peak[prec], "fraction_of_peak": gflops["median"] / peak[prec]})
        print(f"{preset}: " + ", ".join(f"{k} {fmt(summary(r), 1)} img/s" for k, r in rates.items()), flush=True)

    print("\nTraining, achieved against the matmul peak of the same precision (median (min–max) over repeats):\n")
    print_table(["preset (batch)", "precision", "train GFLOP/img", "img/s", "achieved GFLOP/s", "peak GFLOP/s",
                 "fraction of peak"],
                [[f"{r['preset']} ({r['batch_size']})", r["precision"], f"{r['train_flops_per_image'] / 1e9:.3f}",
                  fmt(r["img_per_s"], 1), fmt(r["achieved_gflop_per_s"], 1), f"{r['peak_gflop_per_s']:.1f}",
                  f"{100 * r['fraction_of_peak']:.1f}%"] for r in rows])
    print(NOTE)
    meta = {**facts, "load_average_at_end": load_average(), "steps": a.steps, "repeats": a.repeats,
            "warmup": a.warmup, "mm_seconds": a.mm_seconds, "note": NOTE}
    write_json(a.out, {"meta": meta,
                       "matmul_gflop_per_s": {str(n): row for n, row in mm.items()},
                       "peak_gflop_per_s": peak, "training": rows})


if __name__ == "__main__":
    main()
