"""Processes under ``torchrun``: who am I, which device, and the few collectives training needs.

There is one code path. A run started without ``torchrun`` is world size 1, and every helper
here is then a no-op, so ``cdm train`` on a laptop and on 8 nodes x 8 GPUs run the same code.
Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment) the process
group's backend follows the device: NCCL for CUDA, gloo for the CPU, as PyTorch picks them
(:func:`torch.distributed.get_default_backend_for_device`); nothing here assumes a GPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import CdmError


class DistributedError(CdmError, RuntimeError):
    """The processes of a multi-process run cannot go on together; the message says why."""


def env_rank() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the environment ``torchrun`` sets; ``(0, 1, 0)``
    outside it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def is_device_name(name: str) -> bool:
    """Whether ``name`` names a device cdm can run on: auto, cpu, cuda, cuda:N, mps or xpu."""
    try:
        return name == "auto" or torch.device(name).type in ("cpu", "cuda", "mps", "xpu")
    except (RuntimeError, ValueError):
        return False


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """``"auto"``: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU. A bare ``"cuda"``
    also means this process's local GPU; ``"cpu"`` and ``"cuda:1"`` are taken as they are."""
    local = env_rank()[2] if local_rank is None else local_rank
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise DistributedError(f"unknown device {name!r} ({e}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError(f"device {name!r} asked for, but this torch build or machine has no CUDA: "
                                   f"use --device auto (or train.device = auto), which falls back to the CPU")
        if dev.index >= torch.cuda.device_count():
            raise DistributedError(f"device {dev} asked for, but this machine has {torch.cuda.device_count()} "
                                   f"GPU(s)")
    return dev


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` processes; ``rank`` 0 is the one that writes files."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's rows ``[rank * n / size, (rank + 1) * n / size)`` of a global batch of ``n``."""
        if n % self.size:
            raise DistributedError(f"the global batch ({n}) must divide evenly among the {self.size} "
                                   f"processes; set train.batch_size to a multiple of {self.size}")
        k = n // self.size
        return slice(self.rank * k, (self.rank + 1) * k)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def mean(self, x: Tensor) -> Tensor:
        """The mean of a tensor over all processes (``x`` itself at world size 1)."""
        if self.size == 1:
            return x
        y = x.detach().to(self.device, torch.float32).clone()
        dist.all_reduce(y)
        return (y / self.size).to(x.device)

    def all_true(self, flag: bool) -> bool:
        """True on every process iff ``flag`` is true on every process (a barrier too)."""
        if self.size == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def same(self, value: int) -> bool:
        """True on every process iff every process passed the same integer."""
        if self.size == 1:
            return True
        lo = torch.tensor([value], device=self.device, dtype=torch.int64)
        hi = lo.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return bool(lo.item() == hi.item())


@contextlib.contextmanager
def world(device: str = "auto") -> Iterator[World]:
    """This process's :class:`World` on its device; under ``torchrun`` with more than one process,
    a process group (NCCL on CUDA, gloo on CPU) lives for the ``with`` block."""
    rank, size, local = env_rank()
    dev = pick_device(device, local)
    created = False
    if size > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise DistributedError("this PyTorch build has no torch.distributed; run one process")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        pick = getattr(dist, "get_default_backend_for_device", None)  # torch >= 2.6
        backend = pick(dev) if pick else ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, rank=rank, world_size=size,
                                **({"device_id": dev} if dev.type == "cuda" else {}))
        created = True
    try:
        yield World(rank=rank, size=size, local_rank=local, device=dev)
    finally:
        if created:
            dist.destroy_process_group()
