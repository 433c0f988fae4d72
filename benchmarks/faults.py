"""Crash safety measured: a training run SIGKILLed at random moments, re-run after each kill.

Trains a tiny stage (a TOML config like tests/test_cli.py's TINY, on a toy .npz of structured
16x16 images made here in a temporary directory; fp32) twice with the same command::

    python -m cdm.cli train CONFIG --out RUN --no-progress

once uninterrupted (the reference), and once killed with SIGKILL ``--kills`` times, each time at a
random moment (seeded RNG): uniformly ``--delay-min``..``--delay-max`` seconds after that
attempt's log first shows a step it ran (``--kill-from progress``, the default, so that kills land
in training rather than in Python's start-up) or after the process started (``--kill-from
start``). By default ``--delay-max`` is two checkpoint intervals as timed in the reference run, so
kills fall uniformly over every phase of the checkpoint cycle on a slow or a fast machine alike.
After each kill the same command is re-run, until one finishes (if it finishes before ``--kills``
kills, fewer are reported). Measured:

* after every kill, every checkpoint in RUN/checkpoints is loaded with ``cdm.checkpoint.
  load_checkpoint`` (which verifies its SHA-256 checksum): corrupt ones are counted (expect 0);
  half-written temporaries a kill left (a kill during a checkpoint write) are counted too;
* steps lost per kill: the last step in log.jsonl before the kill, minus the step of the newest
  checkpoint that loads (what the re-run resumes from); at most ``train.ckpt_every``;
* at the end, whether the final checkpoint's tensors (model, EMA, optimiser moments) are
  bit-identical (``torch.equal``) to the reference run's, and whether log.jsonl has each step
  exactly once.

Subprocesses run with OMP_NUM_THREADS/MKL_NUM_THREADS=``--threads`` (default 1). The default run
(20 kills, 200 steps) took 128-154 s on 2 shared cores, most of it Python start-ups. Prints a
summary and the JSON; ``--json PATH`` also writes it; exits 1 if any check fails::

    .venv/bin/python benchmarks/faults.py --json /tmp/faults.json

``--nproc 2`` trains under torchrun (gloo on loopback) and each kill takes the launcher and its
workers at once (every process below the launcher, found in /proc, as when a machine dies); the final weights are then also
compared with one process training the same global batch in memory (``vs_one_process_in_memory``:
equal up to float rounding, the gradient sums running in another order). ``--prepared`` trains on
a prepared set of the toy images (cdm prepare)::

    .venv/bin/python benchmarks/faults.py --nproc 2 --prepared --kills 10 --steps 100 --json /tmp/faults2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_model, load_average  # noqa: E402

TINY = """\
name = "base"
resolution = 8
lowres_resolution = 0
[data]
source = "npz"
path = "{npz}"
resolution = 16
[unet]
base_channels = 8
channel_mult = [1, 2]
num_res_blocks = 1
attention_resolutions = []
[diffusion]
steps = 50
[augment]
kind = "none"
steps = 50
s_max = 25
[train]
steps = {steps}
batch_size = 4
precision = "fp32"
ckpt_every = {ckpt_every}
log_every = 1
sample_every = 0
sample_steps = 2
seed = {seed}
"""


# ----------------------------------------------------------------------------- the toy run
def write_toy_npz(path: Path, n: int = 24, resolution: int = 16, classes: int = 3, seed: int = 0) -> None:
    """Structured toy images: class c is a bright square in quadrant c, on dark noise."""
    g = np.random.default_rng(seed)
    x = g.integers(0, 40, size=(n, 1, resolution, resolution)).astype(np.uint8)
    labels = np.arange(n) % classes
    h = resolution // 2
    for i, c in enumerate(labels):
        r, col = divmod(int(c) % 4, 2)
        x[i, :, r * h:(r + 1) * h, col * h:(col + 1) * h] = 220
    np.savez(path, images=x, labels=labels.astype(np.int64))


def log_records(run: Path) -> list[dict]:
    """The step records of a run's log.jsonl, in order (a line cut short by a kill is skipped)."""
    try:
        text = (run / "log.jsonl").read_text()
    except FileNotFoundError:
        return []
    recs = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec and "loss" in rec:
            recs.append(rec)
    return recs


def log_steps(run: Path) -> list[int]:
    return [int(r["step"]) for r in log_records(run)]


def check_checkpoints(run: Path) -> dict:
    """Load every checkpoint in run/checkpoints (checksum verified); the newest that loads."""
    from cdm.checkpoint import CheckpointError, list_checkpoints, load_checkpoint

    found, corrupt, newest = list_checkpoints(run), [], 0
    for step, p in found:
        try:
            load_checkpoint(p)
            newest = max(newest, step)
        except CheckpointError as e:
            corrupt.append({"file": p.name, "error": str(e)})
    d = run / "checkpoints"
    temporaries = sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp")) if d.is_dir() else []
    return {"checked": len(found), "corrupt": corrupt, "newest_intact": newest, "temporaries": temporaries}


def flat_tensors(ckpt) -> dict:
    """Every tensor of a checkpoint, by a flat name: model, EMA, optimiser moments."""
    import torch

    out = {f"model.{k}": v for k, v in ckpt.model.items()}
    out.update({f"ema.{k}": v for k, v in ckpt.ema.items()})
    for idx, st in (ckpt.optimizer or {}).get("state", {}).items():
        out.update({f"optim.{idx}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


def compare(a_path: Path, b_path: Path) -> dict:
    import torch

    from cdm.checkpoint import load_checkpoint

    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    ta, tb = flat_tensors(a), flat_tensors(b)
    differ = sorted(k for k in ta.keys() | tb.keys() if k not in ta or k not in tb or not torch.equal(ta[k], tb[k]))
    weights = [k for k in differ if k.startswith(("model.", "ema."))]
    return {"reference_step": a.step, "final_step": b.step, "tensors_compared": len(ta.keys() | tb.keys()),
            "model_and_ema_identical": a.step == b.step and not weights,
            "optimizer_identical": not [k for k in differ if k.startswith("optim.")],
            "differing_tensors": differ[:20]}


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc): torchrun starts its workers in sessions of
    their own, so a process-group kill would miss them."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it at once, as when a machine dies."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_difference(a_path: Path, b_path: Path) -> dict:
    """The largest absolute and relative differences between two checkpoints' model and EMA weights."""
    from cdm.checkpoint import load_checkpoint

    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    diff = max((a.model[k] - b.model[k]).abs().max().item() for k in a.model)
    diff_ema = max((a.ema[k] - b.ema[k]).abs().max().item() for k in a.ema)
    scale = max(a.model[k].abs().max().item() for k in a.model)
    return {"max_abs_diff_model": diff, "max_abs_diff_ema": diff_ema, "max_abs_weight": scale,
            "max_rel_diff_model": diff / scale}


def git_state() -> dict | None:
    """The commit of the checkout measured, and the files under src/ it changes (uncommitted)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        st = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True,
                            check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": head.stdout.strip(), "uncommitted_in_src": [ln[3:] for ln in st.stdout.splitlines()]}


class Failed(RuntimeError):
    pass


def run_attempt(cmd: list[str], env: dict, run: Path, err_path: Path, rng: random.Random, a, kill: bool) -> dict:
    """Start ``cmd``; if ``kill``, SIGKILL it at a random moment. What happened, as a dict."""
    delay = rng.uniform(a.delay_min, a.delay_max) if kill else 0.0
    with open(err_path, "w") as err:
        t0, wall0 = time.monotonic(), time.time()
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            t_from = t0 if a.kill_from == "start" else None
            while kill:
                if child.poll() is not None:
                    break
                now = time.monotonic()
                if now - t0 > a.attempt_timeout:
                    raise Failed(f"attempt made no progress within {a.attempt_timeout} s")
                if t_from is None:  # progress: the log's last line was written by this attempt
                    recs = log_records(run)
                    if recs and recs[-1].get("time", 0) >= wall0:
                        t_from = now
                if t_from is not None and now - t_from >= delay:
                    kill_tree(child.pid)
                    break
                time.sleep(0.005)
            child.wait(timeout=a.attempt_timeout)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            kill_tree(child.pid)  # no worker outlives its attempt
    return {"returncode": child.returncode, "killed": child.returncode == -signal.SIGKILL,
            "delay_s": round(delay, 3) if kill else None, "wall_start": wall0,
            "wall_s": round(time.monotonic() - t0, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (and of training)")
    p.add_argument("--steps", type=int, default=200, help="train.steps (enough that --kills kills fit)")
    p.add_argument("--ckpt-every", type=int, default=5, help="train.ckpt_every")
    p.add_argument("--kill-from", choices=["progress", "start"], default="progress",
                   help="count the kill delay from the attempt's first logged step, or from its start")
    p.add_argument("--delay-min", type=float, default=0.0, help="seconds (default 0.0)")
    p.add_argument("--delay-max", type=float, default=None,
                   help="seconds (default: --delay-intervals checkpoint intervals, timed in the reference run)")
    p.add_argument("--delay-intervals", type=float, default=2.0,
                   help="the default --delay-max in checkpoint intervals (default 2)")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL/torch threads of every process")
    p.add_argument("--attempt-timeout", type=float, default=300.0)
    p.add_argument("--keep", default="", help="keep the run directories here instead of deleting them")
    p.add_argument("--json", default="", help="also write the JSON here")
    p.add_argument("--nproc", type=int, default=1,
                   help="train under torchrun with this many processes (gloo, loopback); a kill takes them all")
    p.add_argument("--prepared", action="store_true",
                   help="train on a prepared set of the toy images (cdm prepare) instead of the .npz")
    a = p.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)
    t_start = time.monotonic()
    result: dict = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "machine": {"cpu": cpu_model(), "arch": platform.machine(), "logical_cores": os.cpu_count(),
                    "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "threads_per_process": a.threads},
        "git": git_state(),
        "load_average_before": load_average(),
    }
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="cdm-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        npz, cfg = work / "toy.npz", work / "tiny.toml"
        write_toy_npz(npz)
        cfg.write_text(TINY.format(npz=npz, steps=a.steps, ckpt_every=a.ckpt_every, seed=a.seed))
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}

        data_sets: list[str] = []
        if a.prepared:
            from cdm.prepare import PrepareConfig, prepare

            prep = prepare(PrepareConfig(str(npz), str(work / "prepared"), 16, workers=1, progress=False))
            data_sets = ["--set", "data.source=prepared", "--set", f"data.path={prep.path}"]
            result["prepared_fingerprint"] = prep.fingerprint

        def train_cmd(run: Path, nproc: int = a.nproc, data: list[str] = data_sets) -> list[str]:
            launch = [sys.executable, "-m", "cdm.cli"] if nproc == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "cdm.cli"]
            return [*launch, "train", str(cfg), "--out", str(run), "--no-progress", *data]

        if a.nproc > 1:
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")

        ref, run = work / "reference", work / "killed"
        result["train_command"] = shlex.join(train_cmd(Path("RUN")))
        result["config_toml"] = cfg.read_text()
        print(f"# {result['machine']['cpu']}, {result['machine']['usable_cores']} usable cores, torch "
              f"{torch.__version__}, {a.threads} thread(s) per process, load {result['load_average_before']}",
              flush=True)
        rng = random.Random(a.seed)
        r = run_attempt(train_cmd(ref), env, ref, work / "reference.stderr", rng, a, kill=False)
        if r["returncode"] != 0:
            raise Failed(f"the reference run failed:\n{(work / 'reference.stderr').read_text()[-3000:]}")
        times = [rec["time"] for rec in log_records(ref)]
        step_s = (times[-1] - times[0]) / max(1, len(times) - 1)
        result["reference_wall_s"] = r["wall_s"]
        result["reference_s_per_step"] = round(step_s, 4)
        if a.delay_max is None:
            a.delay_max = round(a.delay_intervals * a.ckpt_every * step_s, 3)
        result["kill_rule"] = (f"SIGKILL at uniform({a.delay_min}, {a.delay_max}) s after the attempt's "
                               f"{'first logged step' if a.kill_from == 'progress' else 'start'}, seed {a.seed}")
        print(f"reference run: {a.steps} steps in {r['wall_s']:.1f} s ({step_s * 1000:.0f} ms/step); "
              f"kill rule: {result['kill_rule']}", flush=True)

        kills, attempts, refused = [], 0, 0
        while True:
            attempts += 1
            want_kill = len(kills) < a.kills
            r = run_attempt(train_cmd(run), env, run, work / "killed.stderr", rng, a, kill=want_kill)
            if r["killed"]:
                c = check_checkpoints(run)
                # the last step this attempt logged (none: killed in start-up, nothing new was lost)
                reached = max((int(x["step"]) for x in log_records(run) if x.get("time", 0) >= r["wall_start"]),
                              default=c["newest_intact"])
                k = {"kill": len(kills) + 1, "delay_s": r["delay_s"], "attempt_wall_s": r["wall_s"],
                     "reached_step": reached,
                     "resumes_from_step": c["newest_intact"], "steps_lost": max(0, reached - c["newest_intact"]),
                     "checkpoints_checked": c["checked"], "corrupt": c["corrupt"],
                     "temporaries_left": len(c["temporaries"])}
                kills.append(k)
                print(f"kill {k['kill']:2d}: after {r['wall_s']:5.2f} s at step {reached:4d}; resumes from "
                      f"{k['resumes_from_step']:4d} (lost {k['steps_lost']}); {c['checked']} checkpoint(s) "
                      f"checked, {len(c['corrupt'])} corrupt, {len(c['temporaries'])} temporary file(s) left",
                      flush=True)
                continue
            err = (work / "killed.stderr").read_text()
            if r["returncode"] == 0:
                break
            if "in use" in err and refused < 5:  # a lock still held after a kill: counted, then retried
                refused += 1
                time.sleep(0.5)
                continue
            raise Failed(f"attempt {attempts} exited with {r['returncode']}:\n{err[-3000:]}")

        from cdm.checkpoint import list_checkpoints

        if a.nproc > 1:  # the same global batch on one process, in memory: equal up to float rounding
            single = work / "single"
            r = run_attempt(train_cmd(single, 1, []), env, single, work / "single.stderr", rng, a, kill=False)
            if r["returncode"] != 0:
                raise Failed(f"the one-process run failed:\n{(work / 'single.stderr').read_text()[-3000:]}")
            result["vs_one_process_in_memory"] = max_difference(list_checkpoints(single)[-1][1],
                                                                list_checkpoints(run)[-1][1])
        steps = log_steps(run)
        counts = Counter(steps)
        lost = [k["steps_lost"] for k in kills]
        final = compare(list_checkpoints(ref)[-1][1], list_checkpoints(run)[-1][1])
        result.update({
            "kills_requested": a.kills,
            "kills": len(kills),
            "attempts": attempts,
            "reruns_refused_by_lock": refused,
            "checkpoint_loads_checked": sum(k["checkpoints_checked"] for k in kills),
            "corrupt_checkpoints": sum(len(k["corrupt"]) for k in kills),
            "kills_during_a_checkpoint_write": sum(k["temporaries_left"] > 0 for k in kills),
            "steps_lost_max": max(lost, default=0),
            "steps_lost_mean": round(sum(lost) / len(lost), 2) if lost else 0.0,
            "steps_lost_bound": a.ckpt_every,
            "final_weights_identical": final["model_and_ema_identical"],
            "final_optimizer_identical": final["optimizer_identical"],
            "final": final,
            "log_duplicate_steps": sorted(s for s, n in counts.items() if n > 1),
            "log_missing_steps": sorted(set(range(1, a.steps + 1)) - set(counts)),
            "log_in_order": steps == sorted(steps),
            "per_kill": kills,
        })
    finally:
        result["load_average_after"] = load_average()
        result["wall_s"] = round(time.monotonic() - t_start, 1)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        text = json.dumps(result, indent=2)
        if a.json:
            Path(a.json).write_text(text + "\n")
    print(text)
    if "kills" in result:
        print(f"\n{result['kills']} kills, {result['corrupt_checkpoints']} corrupt checkpoints in "
              f"{result['checkpoint_loads_checked']} loads ({result['kills_during_a_checkpoint_write']} kills during "
              f"a checkpoint write), steps lost per kill max {result['steps_lost_max']} mean "
              f"{result['steps_lost_mean']} (bound {a.ckpt_every}), final weights identical: "
              f"{result['final_weights_identical']}, log duplicates {len(result['log_duplicate_steps'])} missing "
              f"{len(result['log_missing_steps'])}; {result['wall_s']} s")
    ok = (result.get("corrupt_checkpoints") == 0 and result.get("final_weights_identical")
          and not result.get("log_duplicate_steps") and not result.get("log_missing_steps"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
