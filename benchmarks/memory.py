"""Peak memory of training and sampling each preset, every measurement in a fresh process.

- training: ``--train-steps`` training steps (the step of ``benchmarks/train_precision.py``:
  loss, backward, AdamW) at the preset batch size, in fp32 and bf16 autocast. The default of 2
  steps includes the first, which allocates AdamW's moments, and a steady-state step;
- sampling: one stage's sampling through :func:`cdm.cascade.sample_stage` (ancestral,
  ``--sample-steps`` steps, a batch of ``--sample-batch``; an SR stage conditioned on random
  low-resolution inputs), in fp32 and bf16 autocast.

Networks are untrained (random init); inputs are synthetic. Each measurement runs in a new
process (this script with ``--one``), so that no earlier allocation hides a peak.

On the CPU: the baseline is the resident set size (VmRSS) after building the network, optimiser
and inputs; the kernel's peak-RSS counter is then reset (``/proc/self/clear_refs``, Linux) and
the peak is ``getrusage(RUSAGE_SELF).ru_maxrss`` after the run. Reported: the peak minus the
baseline (what the step or the sampling itself needs) and the absolute peak. Where the counter
cannot be reset, the peak is the process's whole-life peak, so the difference may understate
the run's own need (the JSON says which). Memory the allocator kept from building the model can
be reused by the run, which also makes the difference a slight underestimate.

On CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` minus ``memory_allocated``
after building; this path has not been run yet (the development machine has no GPU).

    .venv/bin/python benchmarks/memory.py --out docs/bench/memory.json

``--plan``: the training plan's estimate against the measured peak (:mod:`cdm.plan`). For each
config (a preset or a .toml file) and precision, a fresh process measures its RSS after importing
torch and resolving the config, then builds what training holds (the network, its EMA copies, AdamW)
and runs ``--train-steps`` full training steps (loss, backward, gradient clipping, AdamW, EMA
update); the measured peak is the peak RSS minus that baseline, the same quantity the plan estimates
(:attr:`cdm.plan.MemoryEstimate.total`). The comparison is merged into the ``--out`` JSON as
``plan`` (the other rows are kept):

    .venv/bin/python benchmarks/memory.py --plan --out docs/bench/memory.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import (PRESETS, SyntheticBatch, facts_line, fmt, load_average, machine_facts, print_table,
                     resolved_config, summary, write_json)
from cdm.cascade import StagePlan, sample_stage
from cdm.config import StageConfig, load_stage_config
from cdm.ema import ema_update
from cdm.stage import Stage
from cdm.step import training_step_loss

MIB = 2 ** 20
MARK = "MEMORY-RESULT "


# ----------------------------------------------------------------------------- one measurement (child)
def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_one(spec: dict) -> dict:
    """Build, then measure one task: ``spec`` has preset, task (train/sample), precision, device,
    train_steps, sample_steps, sample_batch."""
    dev = torch.device(spec["device"])
    cfg = resolved_config(spec["preset"], [f"train.precision={spec['precision']}"])
    torch.manual_seed(0)
    stage = Stage(cfg).to(dev)
    if spec["task"] == "train":
        batch = SyntheticBatch.for_config(cfg)
        x0, z0, labels = (None if t is None else t.to(dev) for t in (batch.x0, batch.z0, batch.labels))
        opt = torch.optim.AdamW(stage.net.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)

        def run() -> None:
            for _ in range(spec["train_steps"]):
                loss = training_step_loss(stage, x0, z0, labels, g)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        n = cfg.train.batch_size
    else:
        n = spec["sample_batch"]
        labels = torch.arange(n) % max(stage.num_classes, 1)
        lowres = SyntheticBatch.for_config(cfg, n).z0
        plan = StagePlan(steps=spec["sample_steps"], level=cfg.train.sample_level)  # ancestral, uniform grid

        def run() -> None:
            sample_stage(stage, 0, labels, list(range(n)), plan, lowres=lowres)
    gc.collect()
    out = {"batch": n, "params": sum(p.numel() for p in stage.net.parameters())}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize(dev)
        out.update(seconds=time.perf_counter() - t0, baseline_mib=base / MIB,
                   peak_mib=torch.cuda.max_memory_allocated(dev) / MIB,
                   peak_reserved_mib=torch.cuda.max_memory_reserved(dev) / MIB, method="cuda max_memory_allocated")
    else:
        base = _status_kib("VmRSS")
        lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reset = _reset_peak_rss()
        t0 = time.perf_counter()
        run()
        out.update(seconds=time.perf_counter() - t0, baseline_mib=base / 1024,
                   peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   peak_before_run_mib=lifetime_peak / 1024, peak_reset=reset,
                   method="ru_maxrss after resetting the peak" if reset else "ru_maxrss (process lifetime)")
    out["delta_mib"] = out["peak_mib"] - out["baseline_mib"]
    return out


def plan_config(name: str, precision: str) -> StageConfig:
    """A preset or config file, resolved as its plan is without data: its own ``data.channels`` and
    ``data.classes`` where it states them, else Fashion-MNIST's (1 channel, 10 classes)."""
    cfg = load_stage_config(name, [f"train.precision={precision}"])
    return cfg.resolve(channels=cfg.data.channels or 1, num_classes=cfg.data.classes or 10)


def measure_full_step(spec: dict) -> dict:
    """``--plan``'s measurement: RSS before building anything, then the network, its EMA copies and
    AdamW, and ``train_steps`` training steps as :mod:`cdm.train` runs them (synthetic inputs)."""
    cfg = plan_config(spec["preset"], spec["precision"])
    tc = cfg.train
    batch = SyntheticBatch.for_config(cfg)
    g = torch.Generator().manual_seed(0)
    gc.collect()
    base = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    stage = Stage(cfg)
    emas = [copy.deepcopy(stage.net).requires_grad_(False) for _ in range(1 + len(tc.ema_profiles))]
    opt = torch.optim.AdamW(stage.net.parameters(), lr=1e-4)
    for _ in range(spec["train_steps"]):
        loss = training_step_loss(stage, batch.x0, batch.z0, batch.labels, g, tc.p_uncond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.net.parameters(), tc.grad_clip or math.inf)
        opt.step()
        for ema in emas:
            ema_update(ema, stage.net, 0.999)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"batch": tc.batch_size, "params": sum(p.numel() for p in stage.net.parameters()),
            "seconds": time.perf_counter() - t0, "baseline_mib": base / 1024, "peak_mib": peak / 1024,
            "delta_mib": (peak - base) / 1024, "peak_reset": reset,
            "method": "ru_maxrss after resetting the peak" if reset else "ru_maxrss (process lifetime)"}


def plan_main(a: argparse.Namespace) -> None:
    """``--plan``: the plan's CPU estimate against the measured peak, per config and precision."""
    from cdm.plan import CPU_RUNTIME_BYTES, WORKSPACE_FRACTION, training_plan

    facts = machine_facts()
    print(facts_line(facts), flush=True)
    rows = []
    for name in a.configs.split(","):
        for prec in a.precisions.split(","):
            plan = training_plan(plan_config(name, prec))
            got = [run_child({"preset": name, "precision": prec, "task": "train-full",
                              "train_steps": a.train_steps}) for _ in range(a.repeats)]
            measured = statistics.median(r["delta_mib"] for r in got)
            m = plan.cpu
            est = {k: getattr(m, k) / MIB for k in ("weights", "gradients", "optimizer", "ema", "activations",
                                                     "workspace", "runtime", "state", "total")}
            rows.append({"config": name, "precision": prec, "batch": plan.batch_size, "params": plan.params,
                         "estimate_mib": est, "measured_mib": summary([r["delta_mib"] for r in got]),
                         "ratio": est["total"] / measured, "runs": got})
            print(f"{name} {prec}: estimate {est['total']:.0f} MiB, measured {measured:.0f} MiB "
                  f"(ratio {est['total'] / measured:.2f}), {got[0]['seconds']:.1f} s", flush=True)
    print(f"\nEstimated and measured peak of a training step ({a.train_steps} steps; RSS above the process "
          f"baseline, MiB; median over {a.repeats} fresh processes):\n")
    print_table(["config (batch)", "precision", "params", "state + runtime", "activations + workspace",
                 "estimate", "measured", "estimate / measured"],
                [[f"{r['config']} ({r['batch']})", r["precision"], f"{r['params'] / 1e6:.1f} M",
                  f"{r['estimate_mib']['state'] + r['estimate_mib']['runtime']:.0f}",
                  f"{r['estimate_mib']['activations']:.0f} + {r['estimate_mib']['workspace']:.0f}",
                  f"{r['estimate_mib']['total']:.0f}", fmt(r["measured_mib"]), f"{r['ratio']:.2f}"] for r in rows])
    meta = {**facts, "load_average_at_end": load_average(), "train_steps": a.train_steps, "repeats": a.repeats,
            "workspace_fraction": WORKSPACE_FRACTION, "cpu_runtime_mib": CPU_RUNTIME_BYTES / MIB, "unit": "MiB",
            "command": "benchmarks/memory.py " + " ".join(sys.argv[1:])}
    if a.out:
        path = Path(a.out)
        payload = json.loads(path.read_text()) if path.exists() else {}
        payload["plan"] = {"meta": meta, "rows": rows}
        write_json(a.out, payload)


def run_child(spec: dict) -> dict:
    """:func:`measure_one` in a fresh interpreter running this script."""
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"measurement {spec} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len(MARK):])


# ----------------------------------------------------------------------------- driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=PRESETS)
    p.add_argument("--tasks", default="train,sample")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--sample-batch", type=int, default=250)
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement")
    p.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N (peak allocated; untested)")
    p.add_argument("--out", default="")
    p.add_argument("--plan", action="store_true", help="compare the training plan's estimate with the measured peak")
    p.add_argument("--configs", default=PRESETS + ",folder-sr32to64", help="--plan: presets or .toml files")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
    a = p.parse_args()
    if a.one:
        spec = json.loads(a.one)
        print(MARK + json.dumps(measure_full_step(spec) if spec["task"] == "train-full" else measure_one(spec)),
              flush=True)
        return
    if a.plan:
        plan_main(a)
        return
    facts = machine_facts()
    print(facts_line(facts), flush=True)
    specs = [{"preset": pr, "task": task, "precision": prec, "device": a.device, "train_steps": a.train_steps,
              "sample_steps": a.sample_steps, "sample_batch": a.sample_batch}
             for pr in a.presets.split(",") for task in a.tasks.split(",") for prec in a.precisions.split(",")]
    runs: list[list[dict]] = [[] for _ in specs]
    for _ in range(a.repeats):  # repeats interleaved over all measurements
        for spec, got in zip(specs, runs):
            got.append(run_child(spec))
            r = got[-1]
            print(f"{spec['preset']} {spec['task']} {spec['precision']}: peak {r['peak_mib']:.0f} MiB, "
                  f"baseline {r['baseline_mib']:.0f} MiB, {r['seconds']:.1f} s", flush=True)
    rows = []
    for spec, got in zip(specs, runs):
        rows.append({**{k: spec[k] for k in ("preset", "task", "precision", "device")},
                     "batch": got[0]["batch"], "params": got[0]["params"], "method": got[0]["method"],
                     **{k: summary([r[k] for r in got]) for k in ("delta_mib", "peak_mib", "baseline_mib", "seconds")},
                     "runs": got})
    what = {task: f"{task}, {n} step{'s' * (n != 1)}" for task, n in (("train", a.train_steps),
                                                                      ("sample", a.sample_steps))}
    print(f"\nPeak memory ({'RSS' if a.device == 'cpu' else 'CUDA allocated'}, MiB), median (min–max) over "
          f"{a.repeats} fresh processes:\n")
    print_table(["preset", "task (batch)", "precision", "peak − baseline", "peak", "baseline", "seconds"],
                [[r["preset"], f"{what[r['task']]} ({r['batch']})", r["precision"], fmt(r["delta_mib"]),
                  fmt(r["peak_mib"]), fmt(r["baseline_mib"]), fmt(r["seconds"], 1)] for r in rows])
    meta = {**facts, "load_average_at_end": load_average(), "device": a.device, "repeats": a.repeats,
            "train_steps": a.train_steps, "sample_steps": a.sample_steps, "sample_batch": a.sample_batch,
            "sampler": "ancestral", "unit": "MiB"}
    write_json(a.out, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
