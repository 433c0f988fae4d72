"""Training images/s of the shipped stage presets in fp32, bf16 autocast, and bf16 + channels_last.

Measures the full training step (forward, loss, backward, AdamW step) of each preset's network
at its preset batch size, on synthetic inputs, after warm-up; the three modes of a preset run
side by side with interleaved repeats. Prints a table and writes JSON.

    .venv/bin/python benchmarks/train_precision.py --out docs/bench/train_precision.json
"""

from __future__ import annotations

import argparse

from _common import (PRESETS, cdm_train_step, facts_line, fmt, interleaved_rates, load_average, machine_facts,
                     print_table, summary, write_json)

MODES = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16+channels_last": ("bf16", True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=PRESETS)
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="")
    a = p.parse_args()
    facts = machine_facts()
    print(facts_line(facts), flush=True)
    rows, table = [], []
    for preset in a.presets.split(","):
        steps = {mode: cdm_train_step(preset, prec, cl) for mode, (prec, cl) in MODES.items()}
        rates = interleaved_rates({m: (s.step, s.batch_size) for m, s in steps.items()}, a.steps, a.repeats, a.warmup)
        stats = {m: summary(r) for m, r in rates.items()}
        for mode, s in stats.items():
            rows.append({"preset": preset, "batch_size": steps[mode].batch_size, "mode": mode,
                         "img_per_s_median": s["median"], "img_per_s_min": s["min"], "img_per_s_max": s["max"],
                         "img_per_s_repeats": s["repeats"]})
        b = steps["fp32"].batch_size
        table.append([f"{preset} ({b})", *(fmt(stats[m]) for m in MODES),
                      f"{stats['bf16']['median'] / stats['fp32']['median']:.2f}×"])
        print(f"{preset}: " + ", ".join(f"{m} {fmt(s, 1)}" for m, s in stats.items()) + " img/s", flush=True)
    print()
    print_table(["preset (batch)", *MODES, "bf16 / fp32"], table)
    meta = {**facts, "load_average_at_end": load_average(), "steps": a.steps, "repeats": a.repeats,
            "warmup": a.warmup, "unit": "training images/s, median (min–max) over repeats"}
    write_json(a.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
