"""Wall time per task, accumulated over every invocation of a run (a resumed run adds to it),
the machine each invocation ran on and its exact command, kept in ``timings.json`` (atomic)."""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from cdm.files import atomic_write


def machine_info(device: torch.device) -> dict:
    """CPU model, cores, torch version and threads (and the GPU, if one is used)."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"), "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class Ledger:
    """``with ledger.task("train base"): ...`` adds the block's wall time to that task."""

    def __init__(self, path: Path, command: str, machine: dict, profile: str):
        self.path = path
        try:
            self.data = json.loads(path.read_text()) if path.exists() else {}
        except json.JSONDecodeError:
            self.data = {}
        self.data.setdefault("tasks", {})
        self.data.setdefault("invocations", [])
        self.t0 = time.time()
        self.this = {"command": command, "profile": profile, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "seconds": 0.0, "machine": machine, "finished": False}
        self.data["invocations"].append(self.this)
        self.save()

    def save(self) -> None:
        self.this["seconds"] = round(time.time() - self.t0, 1)
        text = json.dumps(self.data, indent=1)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    @contextmanager
    def task(self, name: str) -> Iterator[None]:
        t = time.time()
        try:
            yield
        finally:
            self.data["tasks"][name] = round(self.data["tasks"].get(name, 0.0) + time.time() - t, 1)
            self.save()

    def finish(self) -> None:
        self.this["finished"] = True
        self.save()

    @property
    def total_seconds(self) -> float:
        return round(sum(inv["seconds"] for inv in self.data["invocations"]), 1)
