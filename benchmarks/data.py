"""Data bigger than memory, measured: prepared sets (cdm prepare) against what training needs.

Four parts, each a subcommand; every part writes a JSON with the machine, the load and the exact
command (``--json``), and prints a summary. Run each alone: the figures are times and memory.

``memory``  synthetic prepared sets of ``--sizes`` images at 64 px (``cdm prepare synthetic:N``), and
            on each a real training process (``cdm train folder-sr16to64`` on the set, ``--steps``
            steps) whose private (anonymous) memory is sampled from /proc every 20 ms, not its page
            cache; the time from launching the process to its first step's log line.
``loader``  on one prepared set: images/s the :class:`cdm.step.Batcher` makes (rows read, flipped,
            downsampled to the SR input) with no prefetching, and how long a step waits for its
            batch with prefetching (``data.workers`` 1 and 2) when the step itself takes as long as
            the ``memory`` run's measured step; with the page cache dropped first where the kernel
            lets us (said in the JSON), else warm.
``prepare`` ``--photos`` synthetic photographs (640x480 JPEG and PNG: smooth colour fields, shapes,
            noise), prepared at 64 and 256 px (fit resize, both cores): images/s and bytes per image
            on disk, beside the same 256 px images as PNG files (EDM2's zip-of-PNGs format) and what
            decoding those costs per image.
``paper``   the paper's 64->256 stage (configs/paper/imagenet-sr64to256.toml, ``unet.checkpoint``,
            a batch of ``--batch``) trains ``--steps`` steps on a prepared synthetic set of ``--n``
            256 px images of 1000 classes: the measured peak memory (VmHWM, and private memory)
            beside the plan's estimate (``cdm train --dry-run``), at the full width, or at
            ``--width`` base channels if given.

    .venv/bin/python benchmarks/data.py memory --work /tmp/cdm-data --json docs/bench/data/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_model, load_average  # noqa: E402

CDM = [sys.executable, "-m", "cdm.cli"]


def status(pid: int) -> dict[str, int]:
    """Memory figures of a process in bytes (RssAnon, RssFile, VmHWM, VmRSS) from /proc/PID/status."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
                out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def run_watched(cmd: list[str], env: dict | None = None, timeout: float = 3600) -> dict:
    """Run ``cmd``, sampling its memory every 20 ms: peak private memory (RssAnon), peak RSS (VmHWM)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = {"RssAnon": 0, "VmHWM": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            s = status(p.pid)
            for k in peak:
                peak[k] = max(peak[k], s.get(k, 0))
            time.sleep(0.02)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out, err = p.communicate(timeout=timeout)
    done.set()
    th.join()
    if p.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({p.returncode}):\n{err[-3000:]}")
    return {"t_launch": t0, "wall_s": round(time.time() - t0, 2), "peak_private_bytes": peak["RssAnon"],
            "peak_rss_bytes": peak["VmHWM"], "stdout": out, "stderr": err}


def machine() -> dict:
    import torch

    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)}


def drop_caches() -> bool:
    """Empty the page cache (root, and a kernel that allows it): True if it did."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def prepare(source: str, out: Path, resolution: int, *extra: str) -> dict:
    r = run_watched([*CDM, "prepare", source, "--out", str(out), "--resolution", str(resolution), "--no-progress",
                     *extra])
    from cdm.prepared import open_prepared

    ps = open_prepared(out)
    return {"source": source, "path": str(out), "count": ps.count, "wall_s": r["wall_s"],
            "disk_bytes": ps.disk_bytes, "fingerprint": ps.fingerprint, "peak_private_bytes": r["peak_private_bytes"]}


def first_step(run: Path, t_launch: float, batch: int) -> dict:
    """From a run's log (``train.log_every = 1``): when its first step started and ended after the
    launch (the first line's window is that step alone), and the median img/s of the later steps."""
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    first_s = batch / steps[0]["img_per_s"]
    return {"launch_to_first_step_s": round(steps[0]["time"] - first_s - t_launch, 2),
            "first_step_s": round(first_s, 2),
            "step_img_per_s": round(float(np.median([r["img_per_s"] for r in steps[1:]] or [steps[0]["img_per_s"]])), 1)}


# ----------------------------------------------------------------------------- parts
def part_memory(a) -> dict:
    work = Path(a.work)
    rows = []
    for n in a.sizes:
        ds = work / f"syn-{n}-64"
        prep = prepare(f"synthetic:{n}", ds, 64, "--channels", "3")
        run = work / f"run-{n}"
        cmd = [*CDM, "train", "folder-sr16to64", "--out", str(run), "--fresh", "--no-progress",
               "--set", "data.source=prepared", "--set", f"data.path={ds}", "--set", f"train.steps={a.steps}",
               "--set", "train.log_every=1", "--set", "train.sample_every=0", "--set", "train.ckpt_every=100000"]
        r = run_watched(cmd)
        row = {"images": n, "prepare": prep, "train_command": shlex.join(cmd), "steps": a.steps,
               "train_wall_s": r["wall_s"], "peak_private_bytes": r["peak_private_bytes"],
               "peak_rss_bytes": r["peak_rss_bytes"], **first_step(run, r["t_launch"], 32),
               "in_memory_uint8_bytes": n * 3 * 64 * 64}
        print(f"{n:>9,} images: prepared in {prep['wall_s']} s ({prep['disk_bytes'] / 2 ** 30:.2f} GiB); training "
              f"process peak private memory {row['peak_private_bytes'] / 2 ** 20:.0f} MiB (peak RSS "
              f"{row['peak_rss_bytes'] / 2 ** 20:.0f} MiB), launch to first step {row['launch_to_first_step_s']} s "
              f"(the step itself {row['first_step_s']} s), "
              f"{row['step_img_per_s']} img/s; in memory the images alone would take "
              f"{row['in_memory_uint8_bytes'] / 2 ** 30:.2f} GiB", flush=True)
        if n == a.sizes[-1]:  # the same run reading each batch in its step: what prefetching buys
            r0 = run_watched([*cmd, "--set", "data.workers=0"])
            row["no_prefetch"] = {"peak_private_bytes": r0["peak_private_bytes"], **first_step(run, r0["t_launch"], 32)}
            print(f"{'':>9} the same without prefetching (data.workers = 0): {row['no_prefetch']['step_img_per_s']} "
                  f"img/s", flush=True)
        rows.append(row)
    lo, hi = rows[0]["peak_private_bytes"], rows[-1]["peak_private_bytes"]
    return {"rows": rows, "private_growth_first_to_last": round(hi / lo - 1, 4)}


def part_loader(a) -> dict:
    import torch

    from cdm.config import load_stage_config
    from cdm.data import load_dataset
    from cdm.step import Batcher
    from cdm.config import resolve_config

    torch.set_num_threads(a.threads)
    out: dict = {"set": a.set, "batch": a.batch, "step_s": a.step_s, "threads": a.threads}
    for workers in (0, 1, 2):
        cfg = load_stage_config("folder-sr16to64", [f"data.path={a.set}", "data.source=prepared",
                                                    f"data.workers={workers}", f"train.batch_size={a.batch}"])
        data = load_dataset(cfg.data)
        resolve_config(cfg, data)
        out["images"] = len(data)
        cold = drop_caches()
        b = Batcher(data, cfg, torch.Generator().manual_seed(workers))
        waits, t_all = [], time.perf_counter()
        for _ in range(a.batches):
            t = time.perf_counter()
            b(a.batch)
            waits.append(time.perf_counter() - t)
            b.prefetch(a.batch)
            if workers:
                time.sleep(a.step_s)  # the step's compute (torch releases the GIL as sleep does)
        b.close()
        key = "no_prefetch" if workers == 0 else f"prefetch_workers_{workers}"
        wait = float(np.median(waits))
        out[key] = {"cache_dropped": cold, "median_wait_ms": round(1000 * wait, 2),
                    "max_wait_ms": round(1000 * max(waits), 2),
                    "img_per_s_delivered": round(a.batch / wait, 0) if wait > 0 else None,
                    "wall_s": round(time.perf_counter() - t_all, 2)}
        print(f"{key}: median wait for a batch of {a.batch} {1000 * wait:.2f} ms (max {1000 * max(waits):.1f} ms) "
              f"-> {a.batch / wait:,.0f} img/s delivered; page cache dropped first: {cold}", flush=True)
    return out


def photo(args: tuple) -> int:
    """A synthetic 640x480 photograph: a smooth colour field, a few shapes, sensor noise; JPEG or PNG."""
    from PIL import Image, ImageDraw

    path, seed, png = args
    g = np.random.default_rng(seed)
    field = Image.fromarray(g.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
    d = ImageDraw.Draw(field)
    for _ in range(int(g.integers(3, 9))):
        x0, y0 = int(g.integers(0, 600)), int(g.integers(0, 440))
        box = [x0, y0, x0 + int(g.integers(20, 300)), y0 + int(g.integers(20, 240))]
        colour = tuple(int(c) for c in g.integers(0, 256, 3))
        (d.ellipse if g.random() < 0.5 else d.rectangle)(box, fill=colour)
    a = np.asarray(field).astype(np.int16) + g.normal(0, 6, (480, 640, 3)).astype(np.int16)
    im = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    im.save(path, **({"format": "PNG"} if png else {"format": "JPEG", "quality": 90}))
    return Path(path).stat().st_size


def part_prepare(a) -> dict:
    import multiprocessing as mp

    work = Path(a.work)
    src = work / f"photos-{a.photos}"
    if not (src / "done").exists():
        jobs = []
        for i in range(a.photos):
            d = src / f"class{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            png = i % 5 == 4  # one in five a PNG
            jobs.append((str(d / f"photo{i:06d}.{'png' if png else 'jpg'}"), i, png))
        t = time.perf_counter()
        with mp.get_context("spawn").Pool(len(os.sched_getaffinity(0))) as pool:
            sizes = pool.map(photo, jobs, chunksize=64)
        (src / "done").write_text(json.dumps({"bytes": sum(sizes), "seconds": time.perf_counter() - t}))
    made = json.loads((src / "done").read_text())
    out: dict = {"photos": a.photos, "photo_bytes_per_image": round(made["bytes"] / a.photos),
                 "photos_made_in_s": round(made["seconds"], 1), "sizes": {}}
    for r in (64, 256):
        ds = work / f"photos-{a.photos}-{r}"
        if ds.exists():
            import shutil

            shutil.rmtree(ds)
        cold = drop_caches()
        p = prepare(str(src), ds, r, "--fit", "resize", "--channels", "3")
        p.update(img_per_s=round(p["count"] / p["wall_s"], 1), bytes_per_image=round(p["disk_bytes"] / p["count"]),
                 cache_dropped=cold)
        out["sizes"][r] = p
        print(f"prepare {a.photos:,} photos at {r}px: {p['wall_s']} s, {p['img_per_s']} img/s (both cores, whole "
              f"process incl. start-up), {p['bytes_per_image']:,} bytes/image on disk", flush=True)
    # the same 256 px images as PNG files (EDM2's dataset_tool stores a zip of PNGs)
    import io

    import torch
    from PIL import Image

    from cdm.prepared import open_prepared

    torch.set_num_threads(1)
    ps = open_prepared(work / f"photos-{a.photos}-256")
    imgs = ps.images()[: a.png_sample].numpy()
    blobs, t = [], time.perf_counter()
    for im in imgs:
        buf = io.BytesIO()
        Image.fromarray(im.transpose(1, 2, 0)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    enc = time.perf_counter() - t
    t = time.perf_counter()
    for b in blobs:
        np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
    dec = time.perf_counter() - t
    t = time.perf_counter()
    idx = np.random.default_rng(0).permutation(ps.count)[: a.png_sample]
    ps.images().read(np.sort(idx))
    raw = time.perf_counter() - t
    out["png_256"] = {"sample": len(blobs), "bytes_per_image": round(sum(map(len, blobs)) / len(blobs)),
                      "encode_ms_per_image": round(1000 * enc / len(blobs), 2),
                      "decode_ms_per_image_one_core": round(1000 * dec / len(blobs), 2),
                      "raw_read_ms_per_image_warm": round(1000 * raw / len(blobs), 4)}
    print(f"the same 256px images as PNG: {out['png_256']['bytes_per_image']:,} bytes/image, decoding "
          f"{out['png_256']['decode_ms_per_image_one_core']} ms/image on one core; the raw rows: "
          f"{out['png_256']['raw_read_ms_per_image_warm']} ms/image", flush=True)
    return out


def part_paper(a) -> dict:
    work = Path(a.work)
    ds = work / f"syn-{a.n}-256"
    prep = prepare(f"synthetic:{a.n}:1000", ds, 256, "--channels", "3")
    sets = ["data.source=prepared", f"data.path={ds}", f"train.batch_size={a.batch}", "unet.checkpoint=true",
            f"train.steps={a.steps}", "train.log_every=1", "train.sample_every=0", "train.ckpt_every=100000",
            f"train.precision={a.precision}", "train.warmup_steps=1"]
    if a.width:
        sets.append(f"unet.base_channels={a.width}")
    args = [x for kv in sets for x in ("--set", kv)]
    config = "configs/paper/imagenet-sr64to256.toml"
    plan = subprocess.run([*CDM, "train", config, "--out", str(work / "paper-plan"), "--dry-run", *args],
                          capture_output=True, text=True, check=True).stderr
    est = re.search(r"CPU\s+([\d.]+) GiB", plan)
    run = work / "paper-run"
    cmd = [*CDM, "train", config, "--out", str(run), "--fresh", "--no-progress", *args]
    r = run_watched(cmd, timeout=7200)
    out = {"prepare": prep, "plan": plan.strip().splitlines(), "plan_cpu_gib": float(est.group(1)) if est else None,
           "train_command": shlex.join(cmd), "train_wall_s": r["wall_s"],
           "peak_rss_gib": round(r["peak_rss_bytes"] / 2 ** 30, 2),
           "peak_private_gib": round(r["peak_private_bytes"] / 2 ** 30, 2), **first_step(run, r["t_launch"], a.batch),
           "startup": r["stderr"].strip().splitlines()[:5]}
    print("\n".join(out["plan"]))
    print(f"trained {a.steps} steps at batch {a.batch}: peak RSS {out['peak_rss_gib']} GiB (private "
          f"{out['peak_private_gib']} GiB) against the plan's {out['plan_cpu_gib']} GiB; {out['step_img_per_s']} img/s",
          flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--sizes", type=lambda t: [int(v) for v in t.split(",")], default=[10_000, 100_000, 1_000_000])
    m.add_argument("--steps", type=int, default=5)
    lo = sub.add_parser("loader")
    lo.add_argument("--set", required=True, help="a prepared set at 64 px (from the memory part)")
    lo.add_argument("--batch", type=int, default=32)
    lo.add_argument("--batches", type=int, default=100)
    lo.add_argument("--step-s", type=float, required=True, help="the step's time to overlap (seconds)")
    lo.add_argument("--threads", type=int, default=2)
    pr = sub.add_parser("prepare")
    pr.add_argument("--photos", type=int, default=20_000)
    pr.add_argument("--png-sample", type=int, default=500)
    pa = sub.add_parser("paper")
    pa.add_argument("--n", type=int, default=20_000)
    pa.add_argument("--batch", type=int, default=1)
    pa.add_argument("--steps", type=int, default=3)
    pa.add_argument("--width", type=int, default=0, help="unet.base_channels (0: the config's)")
    pa.add_argument("--precision", default="auto")
    for q in (m, lo, pr, pa):
        q.add_argument("--work", default="/tmp/cdm-data", help="where the data sets and runs go (not in git)")
        q.add_argument("--json", default="")
    a = p.parse_args()
    Path(a.work).mkdir(parents=True, exist_ok=True)
    head = {"command": shlex.join([sys.executable, *sys.argv]), "machine": machine(),
            "load_average_before": load_average(), "date": time.strftime("%Y-%m-%d %H:%M")}
    result = {**head, **{"memory": part_memory, "loader": part_loader, "prepare": part_prepare,
                         "paper": part_paper}[a.part](a), "load_average_after": load_average()}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
