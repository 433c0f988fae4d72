"""The plan of a training run: its size, compute and memory, known before it runs.

:func:`training_plan` gives, for a resolved stage config: the parameter count, the training FLOPs
per image (:mod:`cdm.flops`), the total for ``train.steps``, and the **estimated peak memory of one
training step** of one process (batch ``train.batch_size / processes``), in ``train.precision``,
on the CPU and on CUDA:

    peak = weights + gradients + AdamW's two moments + EMA copies   (float32: 4 bytes per parameter each)
         [+ DDP's gradient buckets, when there is more than one process]
         + max(activations saved for backward + the backward's workspace,  the optimizer step's scratch)
         [+ the CPU kernel libraries' one-time allocations, on the CPU]

- *EMA copies*: the checkpoint's EMA and one per ``train.ema_profiles`` (post-hoc EMA), a float32
  copy of the network each, as :mod:`cdm.train` keeps them.
- *Activations*: the bytes of the distinct tensors that one forward of the training step
  (:func:`cdm.train.training_step_loss`: conditioning, network, loss) saves for backward, counted
  with :func:`torch.autograd.graph.saved_tensors_hooks` at batches 1 and 2, so that the part that
  does not grow with the batch (under bf16 autocast, the bf16 copies of the weights) is separated
  from the part that does; parameters are not counted (they are the weights). bf16 autocast is
  honoured (the CPU's autocast rules; CUDA's cast the same layers). The forward runs on *fake*
  tensors (shapes and dtypes only, ``torch._subclasses.fake_tensor.FakeTensorMode``), so a plan of
  an ImageNet-size network takes seconds and no memory; value checks (label and time ranges) read
  as passed there.
- *Workspace*: what backward holds beside the saved activations (gradients of activations; in a
  U-Net the gradients of the skip connections wait for the encoder's backward; kernels' scratch):
  :data:`WORKSPACE_FRACTION` of the activations a float32 forward saves, in fp32 and bf16 alike,
  measured on the CPU against peak RSS at two batch sizes (``benchmarks/memory.py --plan``,
  docs/BENCHMARKS.md "Peak memory"). The same margin is used for CUDA, where it is not measured.
- *Optimizer scratch* (CUDA): ``torch.optim.AdamW`` steps all tensors at once there and holds one
  float32 temporary per parameter; it can be the peak when activations are small. On the CPU it
  steps tensor by tensor (negligible scratch).
- *DDP's buckets*: under ``torchrun`` DistributedDataParallel keeps its own copy of the gradients.
- *Runtime* (CPU): :data:`CPU_RUNTIME_BYTES`, what the kernel libraries allocate at the first step.
- Gradients are counted in full beside all activations: an upper bound, since backward frees
  activations as it creates gradients; it matters only when the weights are large against the
  activations.

Not estimated: the process's own baseline (a CPU process with torch loaded holds ~250-300 MiB; a CUDA
process's context holds a few hundred MiB of GPU memory outside PyTorch's allocator); memory the
CUDA caching allocator reserves beyond what it hands out (fragmentation: ``max_memory_reserved``
exceeds ``max_memory_allocated``); cuDNN/cuBLAS workspaces beyond the margin; sampling the grids
during training (the EMA network on a few dozen images, without gradients); the data set, which every
process holds in memory as uint8 unless it is a prepared set (given separately,
:attr:`TrainingPlan.data_bytes`, when it was loaded; a prepared set's size on disk beside it).

:func:`measure_throughput` times real training steps (synthetic inputs) for images per second.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass

import torch

from .config import ConfigError, StageConfig, resolve_config
from .data import DataError, ImageSet, load_dataset
from .flops import ChecksPass, train_flops_per_image
from .peek import peek_data
from .stage import Stage

__all__ = ["MemoryEstimate", "TrainingPlan", "training_plan", "resolve_for_plan", "format_plan",
           "measure_throughput", "saved_activation_bytes", "WORKSPACE_FRACTION", "CPU_RUNTIME_BYTES",
           "DEFAULT_GPU_TFLOPS"]

GIB = 2 ** 30
STATE_BYTES = 4  # weights, gradients, Adam moments and EMAs are float32, whatever the autocast precision
# The backward's transient memory per image, as a fraction of the float32 activations saved per image
# (in fp32 and bf16 alike), measured on the CPU against peak RSS (docs/BENCHMARKS.md "Peak memory"):
# from 0.16 (a 32->64 stage at batch 32, whose large tensors the C allocator maps and unmaps) to 0.60
# (the small presets, whose tensors stay in its heap). 0.35 keeps every measured config within 25%.
WORKSPACE_FRACTION = 0.35
# What the CPU kernel libraries allocate once, at the first training step (primitive and weight caches,
# per-thread arenas): measured 85-120 MiB above the model for every config, docs/BENCHMARKS.md.
CPU_RUNTIME_BYTES = 100 * 2 ** 20
# GPU throughput assumed when none is given: 40% of an A100's dense bf16 peak (312 TFLOP/s), a typical
# achieved rate for convolutional U-Nets in bf16.
DEFAULT_GPU_TFLOPS = 0.4 * 312.0


# ----------------------------------------------------------------------------- shapes-only execution
@contextlib.contextmanager
def shapes_only():
    """Run torch code on fake tensors: shapes, dtypes and autocast as for real, no data, no memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import stage as stage_module

    warned = set(stage_module._warned)
    with FakeTensorMode(allow_non_fake_inputs=True), ChecksPass(), warnings.catch_warnings():
        # a plan counts bf16 on any device (a GPU's precision): the CPU's emulation warning is not for it
        warnings.filterwarnings("ignore", message="bf16 autocast on a")
        try:
            yield
        finally:
            stage_module._warned.intersection_update(warned)


def planned_precision(precision: str) -> str:
    """The precision a plan assumes: ``"auto"`` is planned as bf16, what it is on any device that
    computes bf16 natively (a GPU plan's device; a CPU without it trains in fp32, ~2x the activations)."""
    return "bf16" if precision == "auto" else precision


def saved_activation_bytes(config: StageConfig, batch: int) -> int:
    """Bytes of the distinct tensors one forward of the training step (conditioning, network, loss)
    at ``batch`` images saves for backward, parameters excluded; in ``config.train.precision``.
    Counted on fake tensors; ``config`` resolved."""
    return _saved(config, batch)[0]


def _saved(config: StageConfig, batch: int) -> tuple[int, int]:
    """(bytes, bytes at 4 per element) of what the training step's forward saves for backward."""
    from .step import training_step_loss

    cfg = copy.deepcopy(config)
    cfg.train.precision = planned_precision(cfg.train.precision)
    c, r, lo, crop = cfg.unet.in_channels, cfg.resolution, cfg.lowres_resolution, cfg.train.crop
    if crop:  # crop training: the step sees crop x crop windows and their low-res windows
        r, lo = crop, crop * lo // r
    seen: dict[int, tuple[int, int]] = {}
    with shapes_only():
        stage = Stage(cfg)
        params = {id(p) for p in stage.net.parameters()}
        x0 = torch.zeros(batch, c, r, r)
        z0 = torch.zeros(batch, c, lo, lo) if cfg.is_super_resolution else None
        labels = torch.zeros(batch, dtype=torch.long)

        def pack(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in params:  # one entry per storage (fake storages have no data_ptr): views count once
                st = t.untyped_storage()
                seen[st._cdata] = (st.nbytes(), st.nbytes() // t.element_size() * 4)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            training_step_loss(stage, x0, z0, labels, torch.Generator(), cfg.train.p_uncond)
    return sum(b for b, _ in seen.values()), sum(f for _, f in seen.values())


# ----------------------------------------------------------------------------- the plan
@dataclass
class MemoryEstimate:
    """Bytes of one training step's peak on one device, by part (module docstring: what each is)."""
    weights: int
    gradients: int
    optimizer: int  # AdamW's exp_avg and exp_avg_sq
    ema: int  # the EMA and the post-hoc EMA profiles
    activations: int  # saved for backward, at the plan's batch per process
    workspace: int  # the backward's transient margin
    optimizer_scratch: int = 0  # CUDA: the multi-tensor AdamW step's float32 temporaries (after backward)
    ddp_buckets: int = 0  # more than one process: DistributedDataParallel's gradient buckets
    runtime: int = 0  # CPU: what the kernel libraries allocate once, at the first step

    @property
    def state(self) -> int:
        """What does not depend on the batch: weights, gradients, optimizer, EMAs, DDP's buckets."""
        return self.weights + self.gradients + self.optimizer + self.ema + self.ddp_buckets

    @property
    def total(self) -> int:
        """The peak: the state, plus the larger of backward's and the optimizer step's own needs."""
        return self.state + self.runtime + max(self.activations + self.workspace, self.optimizer_scratch)


@dataclass
class TrainingPlan:
    """Size, compute and memory of training one stage (:func:`training_plan`)."""
    name: str
    resolution: int
    lowres_resolution: int
    channels: int
    num_classes: int
    params: int
    flops_per_image: int  # forward + backward, :func:`cdm.flops.train_flops_per_image`
    batch_size: int  # per process and forward pass
    global_batch: int  # train.batch_size
    processes: int
    steps: int
    precision: str
    ema_copies: int
    activation_bytes_per_image: float  # saved activations: the part that grows with the batch ...
    activation_bytes_fixed: int  # ... and the part that does not
    cpu: MemoryEstimate
    cuda: MemoryEstimate
    data_images: int | None = None  # images in the training split, when the data set was loaded
    data_bytes: int | None = None  # what every process holds of them in memory (a prepared set: its labels)
    data_disk_bytes: int | None = None  # a prepared set's size on disk
    data_name: str = ""  # a prepared set: where it is and its fingerprint

    @property
    def total_flops(self) -> float:
        """Training FLOPs of the whole run: per image x global batch x steps."""
        return float(self.flops_per_image) * self.global_batch * self.steps

    def gpu_hours(self, tflops_per_gpu: float = DEFAULT_GPU_TFLOPS) -> float:
        """GPU-hours to ``steps`` at an achieved ``tflops_per_gpu`` (TFLOP/s per GPU)."""
        return self.total_flops / (tflops_per_gpu * 1e12) / 3600.0


def training_plan(config: StageConfig, processes: int = 1, data: ImageSet | None = None,
                  workspace_fraction: float = WORKSPACE_FRACTION) -> TrainingPlan:
    """The plan of training ``config`` (resolved: :func:`resolve_for_plan` or
    :func:`cdm.config.resolve_config`) on ``processes`` processes (GPUs): parameters, FLOPs and the
    estimated peak memory of one step of one process, whose batch is ``train.batch_size /
    processes``, in ``train.precision``. ``data``, if given, adds the data set's in-memory size.
    Runs in seconds for any network size (module docstring: what is and is not estimated)."""
    tc = config.train
    accum = tc.grad_accum  # gradient accumulation splits each process's batch further
    if processes < 1 or tc.batch_size % (processes * accum):
        raise ConfigError(f"train.batch_size ({tc.batch_size}) must divide evenly among {processes} "
                          f"process(es)" + (f" x {accum} accumulation steps" if accum > 1 else ""))
    batch = tc.batch_size // (processes * accum)
    with shapes_only():
        torch.manual_seed(0)
        params = sum(p.numel() for p in Stage(copy.deepcopy(config)).net.parameters())
    flops = train_flops_per_image(config)  # on meta tensors: no memory either
    (one, one32), (two, two32) = _saved(config, 1), _saved(config, 2)
    per_image, fixed = two - one, max(2 * one - two, 0)
    per_image_fp32 = two32 - one32  # the workspace is float32-sized whatever the autocast precision (measured)
    ema = 1 + len(tc.ema_profiles)
    state = STATE_BYTES * params
    cpu = MemoryEstimate(weights=state, gradients=state, optimizer=2 * state, ema=ema * state,
                         activations=int(fixed + per_image * batch),
                         workspace=int(workspace_fraction * per_image_fp32 * batch),
                         ddp_buckets=state if processes > 1 else 0, runtime=CPU_RUNTIME_BYTES)
    cuda = dataclasses.replace(cpu, runtime=0, optimizer_scratch=state)
    return TrainingPlan(
        name=config.name, resolution=config.resolution, lowres_resolution=config.lowres_resolution,
        channels=config.unet.in_channels, num_classes=config.unet.num_classes, params=params,
        flops_per_image=flops, batch_size=batch, global_batch=tc.batch_size, processes=processes, steps=tc.steps,
        precision=planned_precision(tc.precision), ema_copies=ema, activation_bytes_per_image=float(per_image),
        activation_bytes_fixed=fixed, cpu=cpu, cuda=cuda,
        data_images=len(data) if data is not None else None,
        data_bytes=data.memory_bytes if data is not None else None,
        data_disk_bytes=data.prepared.disk_bytes if data is not None and data.prepared is not None else None,
        data_name=data.describe() if data is not None else "")


def resolve_for_plan(config: StageConfig) -> tuple[StageConfig, ImageSet | None, str]:
    """Resolve ``config`` for a plan. When it states its channels (``data.channels``) and, if
    class-conditional, its classes (``data.classes``), that is done without reading the data set
    (which need not exist yet, and may be too large to load for a dry run); otherwise the data set
    is peeked at (:func:`cdm.peek.peek_data`: its listing and headers, never its images). A folder preset
    with no ``data.path`` yet and no ``data.classes`` is planned with one class (the class embedding is a few thousand
    parameters per class), and the note says so. Returns the config (resolved in place), the data
    set if it was loaded, and the note ("" when nothing was assumed)."""
    d = config.data
    if d.is_prepared:  # opening one reads its manifest and labels only: seconds for any size

        data = load_dataset(d)
        return resolve_config(config, data), data, ""
    if d.channels and (d.classes or not config.class_conditional):
        return config.resolve(channels=d.channels, num_classes=d.classes), None, ""
    if d.channels and not d.path and d.source == "folder":
        note = ("classes: unknown until data.path names the folder (or data.classes states them); planned with "
                "1 class, and each class adds one row of the class embedding")
        return config.resolve(channels=d.channels, num_classes=1), None, note
    try:
        channels, names, images, note = peek_data(d)
    except DataError as e:
        raise DataError(f"{e} (to plan without the data set, state data.channels and data.classes, e.g. "
                        f"--set data.channels=3 --set data.classes=1000)") from None
    size = (f"data set: {images:,} images listed (before any held-out split), {_gib(images * channels * d.resolution ** 2)} "
            f"as uint8 in every process's memory (a prepared set, cdm prepare, holds ~0)")
    note = "; ".join(n for n in (size, note) if n)
    config.data.class_names = names  # as cdm.config.resolve_config fills them in
    return config.resolve(channels=channels, num_classes=len(names) if config.class_conditional else 0), None, note


# ----------------------------------------------------------------------------- report
def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= 0.1 * GIB else f"{n / 2 ** 20:.0f} MiB"


def _num(x: float) -> str:
    """A duration to two significant figures below 100, whole above."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.2g}"


def _flop(x: float) -> str:
    """FLOPs with the largest SI prefix that leaves at least 1 (T, P, E, Z)."""
    for unit, scale in (("ZFLOP", 1e21), ("EFLOP", 1e18), ("PFLOP", 1e15)):
        if x >= scale:
            return f"{x / scale:,.1f} {unit}"
    return f"{x / 1e12:,.1f} TFLOP"


def format_plan(plan: TrainingPlan, gpu_tflops: float | None = None, measured_img_s: float | None = None) -> str:
    """The plan as a short human-readable block (what ``cdm train --dry-run`` prints). GPU-hours at
    ``gpu_tflops`` achieved TFLOP/s per GPU (default :data:`DEFAULT_GPU_TFLOPS`); a measured rate
    (:func:`measure_throughput`) adds a line."""
    stage = (f"{plan.lowres_resolution}->{plan.resolution} SR" if plan.lowres_resolution
             else f"{plan.resolution}x{plan.resolution} base")
    m, c = plan.cpu, plan.cuda
    per_proc = ("" if plan.processes == 1 else
                f" per process (global batch {plan.global_batch} on {plan.processes} processes)")
    act = (f"activations {_gib(m.activations)} ({_gib(plan.activation_bytes_per_image)}/image) + "
           f"workspace {_gib(m.workspace)}")
    classes = f"{plan.num_classes} class" + "es" * (plan.num_classes > 1) if plan.num_classes else "unconditional"
    lines = [
        f"plan of {plan.name} ({stage}, {plan.channels} channel{'s' * (plan.channels > 1)}, {classes})",
        f"  parameters          {plan.params:,} ({plan.params / 1e6:.1f} M)",
        f"  training compute    {plan.flops_per_image / 1e9:,.2f} GFLOP per image (forward + backward); "
        f"{_flop(plan.total_flops)} for {plan.steps:,} steps at batch {plan.global_batch}",
        f"  peak memory of a training step at batch {plan.batch_size}{per_proc}, {plan.precision} (estimate):",
        f"    CPU  {_gib(m.total)} = {_gib(m.state)} state + {_gib(m.runtime)} runtime + {act}",
        f"    CUDA {_gib(c.total)} = {_gib(c.state)} state + "
        + (act if c.activations + c.workspace >= c.optimizer_scratch else
           f"AdamW's scratch {_gib(c.optimizer_scratch)}") + ", plus the CUDA context",
        f"    state: weights, gradients, AdamW (2x), EMA (x{plan.ema_copies})"
        + (", DDP buckets" if plan.processes > 1 else "") + f", {_gib(m.weights)} each",
    ]
    if plan.data_disk_bytes is not None:
        lines.append(f"  data set            {plan.data_name}: {_gib(plan.data_disk_bytes)} on disk, read by index; "
                     f"{_gib(plan.data_bytes)} in memory per process ({plan.data_images:,} images' labels)")
    elif plan.data_bytes is not None:
        lines.append(f"  data set in memory  {_gib(plan.data_bytes)} ({plan.data_images:,} images, uint8; "
                     f"every process holds it; a prepared set, cdm prepare, holds ~0)")
    tflops = gpu_tflops or DEFAULT_GPU_TFLOPS
    how = (f"at {tflops:g} TFLOP/s per GPU" if gpu_tflops else
           f"at {tflops:g} TFLOP/s per GPU (40% of an A100's bf16 peak; --gpu-tflops)")
    hours = plan.gpu_hours(tflops)
    lines.append(f"  GPU time            {_num(hours)} GPU-hours {how}: "
                 f"{_num(hours / plan.processes)} h on {plan.processes} GPU{'s' * (plan.processes > 1)}")
    if measured_img_s is not None:
        hours = plan.steps * plan.global_batch / (measured_img_s * plan.processes) / 3600
        lines.append(f"  measured here       {measured_img_s:.1f} img/s per process "
                     f"({measured_img_s * plan.flops_per_image / 1e12:.3f} TFLOP/s): {_num(hours)} h for "
                     f"{plan.steps:,} steps on {plan.processes} such process{'es' * (plan.processes > 1)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- measured throughput
def measure_throughput(config: StageConfig, steps: int, batch_size: int | None = None, warmup: int = 1) -> float:
    """Images per second of ``steps`` real training steps (loss, backward, gradient clipping, AdamW,
    EMA update) at ``batch_size`` (default ``train.batch_size``) on synthetic inputs, after
    ``warmup`` untimed steps, on ``train.device`` (``auto``: CUDA if available). ``config`` resolved."""
    from .ema import ema_update
    from .step import training_step_loss

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    tc = config.train
    dev = torch.device(tc.device if tc.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(tc.seed)
    stage = Stage(config).to(dev)
    ema = copy.deepcopy(stage.net).requires_grad_(False)
    opt = torch.optim.AdamW(stage.net.parameters(), lr=tc.lr, betas=tuple(tc.adam_betas),
                            weight_decay=tc.weight_decay)
    g = torch.Generator().manual_seed(tc.seed)
    b, c, r, lo = batch_size or tc.batch_size, config.unet.in_channels, config.resolution, config.lowres_resolution
    x0 = (torch.rand(b, c, r, r, generator=g) * 2 - 1).to(dev)
    z0 = (torch.rand(b, c, lo, lo, generator=g) * 2 - 1).to(dev) if config.is_super_resolution else None
    labels = torch.randint(0, max(config.unet.num_classes, 1), (b,), generator=g).to(dev)

    def step() -> None:
        loss = training_step_loss(stage, x0, z0, labels, g, tc.p_uncond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.net.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        opt.step()
        ema_update(ema, stage.net, 0.999)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * b / (time.perf_counter() - t0)
