"""How a training run starts: fresh, resumed from its own checkpoint, or initialised from another
run's weights (fine-tuning), and what it says about it.

- **Initialising** (:class:`InitFrom`, ``cdm train --init``): a fresh run takes the EMA (or raw)
  weights of another run's newest intact checkpoint, or of a checkpoint file. Every tensor must
  match this stage's network by name and shape; a different architecture whose tensors happen to
  match is allowed. The run still starts at step 0 with a fresh optimiser, and its EMAs start at
  the loaded weights. Where the weights came from is kept (:func:`load_init_weights`' record).
- **Resuming** wins over initialising: a run directory with its own checkpoints continues from the
  newest intact one. :func:`check_resume` compares the checkpoint's config with the new one: the
  keys in :data:`RESUMABLE` may change (they do not touch the weights' trajectory, or only extend
  it), every other change is refused, naming the keys with their old and new values.
- :func:`startup_summary`: the few lines ``cdm train`` prints before its first step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from .checkpoint import (Checkpoint, CheckpointError, atomic_write, checkpoint_id, checksum, list_checkpoints,
                         load_checkpoint, newest_intact, read_metadata, resolve_checkpoint_path)
from .config import ConfigError, StageConfig, to_dict
from .data import FASHION_MNIST_DIR, ImageSet
from .recipe import lr_factor
from .stage import resolve_precision

INIT_WEIGHTS = ("ema", "raw")
INIT = "init.json"  # in a run directory: where a run started with --init took its weights


@dataclass(frozen=True)
class InitFrom:
    """Start a fresh run from another run's weights: ``path`` is a run directory (its newest intact
    checkpoint) or a checkpoint file; ``weights`` picks its ``"ema"`` (default) or ``"raw"`` weights."""

    path: str | Path
    weights: str = "ema"

    def __post_init__(self) -> None:
        if self.weights not in INIT_WEIGHTS:
            raise ConfigError(f"init weights must be one of {', '.join(INIT_WEIGHTS)}, got {self.weights!r}")


def _read_source(init: InitFrom) -> tuple[Path, Checkpoint]:
    """``(checkpoint file, its contents)`` of ``init.path``; every failure is one line."""
    p = Path(init.path)
    where = f"cannot initialise from {p} (--init)"
    try:
        if p.is_dir():
            found = newest_intact(p.parent if p.name == "checkpoints" else p,
                                  hint="pass a checkpoint file or another run to --init")
            if found is None:
                raise CheckpointError(f"it holds no checkpoints (in {p / 'checkpoints'})")
            return found
        path = resolve_checkpoint_path(p)
        return path, load_checkpoint(path, weights_only=True)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from e


def _value(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _fit_hint(source: StageConfig, target: StageConfig) -> str:
    """What to do about weights that do not fit: the network settings in which the two differ."""
    kind = {True: "a super-resolution stage", False: "a base stage"}
    was, now = kind[source.is_super_resolution], kind[target.is_super_resolution]
    if was != now:
        return (f"The checkpoint is {was} and this {now} (an SR stage's network also takes the low-resolution "
                f"image as input channels, and embeds the augmentation level): initialise an SR stage from an SR "
                f"run and a base stage from a base run")
    a, b = to_dict(source.unet), to_dict(target.unet)
    diffs = [f"unet.{k} ({_value(a[k])} in the checkpoint, {_value(b[k])} here)" for k in a if a[k] != b.get(k)
             and k not in ("resolution", "dropout", "lowres_upsample")]
    return ("The networks differ in " + ", ".join(diffs) if diffs else "The networks differ") + \
        ": initialise from a run with the same network settings, or set this config's to match it"


def load_init_weights(net: nn.Module, init: InitFrom, cfg: StageConfig) -> dict:
    """Load ``init``'s chosen weights into ``net`` (whose stage config is ``cfg``), exactly. Every
    tensor of ``net`` must be in the source with the same shape and the source must hold no other:
    else :class:`CheckpointError` naming the first tensor whose shape differs (with both shapes)
    and the missing and unexpected ones. Returns the provenance record a run keeps (``init.json``,
    its log and its checkpoints): the checkpoint file, which weights, its step, its checksum, and a
    SHA-256 of the weights taken."""
    path, ckpt = _read_source(init)
    weights: dict[str, Tensor] = ckpt.ema if init.weights == "ema" else ckpt.model
    if not weights:
        other = "raw" if init.weights == "ema" else "ema"
        raise CheckpointError(f"cannot initialise from {path} (--init): it holds no {init.weights} weights (a "
                              f"post-hoc EMA file holds EMA weights only); pass --init-weights {other}")
    want = net.state_dict()
    shapes = [k for k in want if k in weights and tuple(weights[k].shape) != tuple(want[k].shape)]
    missing = [k for k in want if k not in weights]
    unexpected = [k for k in weights if k not in want]
    if shapes or missing or unexpected:
        parts = []
        if shapes:
            k = shapes[0]
            more = f" (and {len(shapes) - 1} more tensors differ in shape)" if len(shapes) > 1 else ""
            parts.append(f"{k} is {list(weights[k].shape)} in the checkpoint but {list(want[k].shape)} in this "
                         f"network{more}")
        for what, keys in (("missing from the checkpoint", missing), ("not in this network", unexpected)):
            if keys:
                parts.append(f"{what}: {', '.join(keys[:3])}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else ""))
        raise CheckpointError(f"cannot initialise from {path} (--init): its weights do not fit this stage's "
                              f"network: {'; '.join(parts)}. {_fit_hint(ckpt.config, cfg)}")
    net.load_state_dict(weights, strict=True)
    return {"path": str(path.resolve()), "given": str(init.path), "weights": init.weights, "step": ckpt.step,
            "stage": ckpt.config.name, "checkpoint_checksum": checkpoint_id(path),
            "weights_sha256": checksum(weights, {})}


def check_training_dir(out: Path) -> None:
    """Refuse, in one line, to train into a directory that holds another command's output: a
    distillation (``cdm distill``: ``distill.json``, ``steps-N/``), post-hoc EMA exports (``cdm
    ema``) or a run whose newest checkpoint holds weights only (a distilled round, an export
    copied in), which has no optimiser state to resume and which ``--fresh`` would delete."""
    out = Path(out)
    if (out / "distill.json").is_file() or any(out.glob("steps-*/checkpoints")):
        what = "a distillation (cdm distill)"
        todo = f"sample one of its rounds with cdm sample --stage {out}/steps-N, or train"
    elif any(out.glob("ema-*.safetensors")):
        what = "post-hoc EMA exports (cdm ema)"
        todo = f"sample one with cdm sample --stage {out}/ema-*.safetensors, or train"
    else:
        found = list_checkpoints(out)
        try:
            meta = read_metadata(found[-1][1]) if found else {"optimizer": ""}
            extra = json.loads(meta.get("extra") or "{}")
        except (CheckpointError, ValueError):
            return  # a damaged checkpoint: resuming skips it, --fresh starts over
        if "optimizer" in meta or meta.get("format") != "cdm-stage":
            return
        what = ("a distilled stage (cdm distill)" if "distill" in extra else
                "a post-hoc EMA export (cdm ema)" if "posthoc_ema" in extra else "a weights-only checkpoint")
        todo = f"sample it with cdm sample --stage {out}, or fine-tune from it with --init {out}"
    raise CheckpointError(f"{out} holds {what}, not a training run: {todo}, into another --out")


# ----------------------------------------------------------------------------- resuming
# The config keys a resume may change, and nothing else: none of them changes what the weights
# are trained on or how (train.steps only lengthens or shortens the run; with a decaying
# train.lr_schedule the remaining steps follow the new length's schedule). The device and the
# memory layout change float rounding only. Every other key -- the network, diffusion,
# augmentation, data set, batch size, seed, precision, learning rate and its schedule, EMA
# settings, ... -- would make the run no longer what its config says: a resume refuses it.
RESUMABLE = ("name", "train.steps", "train.log_every", "train.ckpt_every", "train.keep_checkpoints",
             "train.sample_every", "train.sample_steps", "train.sample_level", "train.ema_snapshot_every",
             "train.device", "train.channels_last", "train.tensorboard",
             # memory levers: how a step runs, not what it computes (grad_accum: the same gradient up
             # to float rounding; with dropout, other masks from the same stream)
             "train.grad_accum", "unet.checkpoint",
             # how batches are read, not which images they hold
             "data.workers")
# ... and where the data set lies, when the checkpoint's prepared set and this one have the same
# content fingerprint (data.fingerprint): a prepared set moved or copied elsewhere resumes
SAME_DATA = ("data.path", "data.source")

# Parts of a stage config that define the model: a change in one of them is "a different stage".
_MODEL_KEYS = ("resolution", "lowres_resolution", "class_conditional", "unet", "diffusion", "augment")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_resume(saved: StageConfig, new: StageConfig, run_dir: Path) -> dict[str, list]:
    """The changes from ``saved`` (a checkpoint's config) to ``new`` that a resume applies,
    ``{key: [old, new]}`` (keys of :data:`RESUMABLE`); any other change raises
    :class:`CheckpointError` naming every such key with its old and new values."""
    a, b = _flat(to_dict(saved)), _flat(to_dict(new))
    changed = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    resumable = RESUMABLE
    if saved.data.fingerprint and saved.data.fingerprint == new.data.fingerprint:
        resumable += SAME_DATA  # the same prepared set, found at another path: its content decides
    refused = [k for k in changed if k not in resumable]
    if refused:
        stage = any(k.split(".")[0] in _MODEL_KEYS for k in refused)
        what = "a run of a different stage" if stage else "a run trained with settings a resume cannot change"
        keys = "; ".join(f"{k}: {_value(a.get(k))} -> {_value(b.get(k))}" for k in refused)
        raise CheckpointError(f"{run_dir} holds {what} ({keys}); pass --fresh to start over there, or another "
                              f"--out (a resume may change only {', '.join(RESUMABLE)}, and data.path to the same "
                              f"prepared set)")
    return {k: [a.get(k), b.get(k)] for k in changed}


def change_lines(changes: dict[str, list], step: int, saved: StageConfig, new: StageConfig) -> list[str]:
    """One line per applied config change (``key: old -> new``), with what it means where it
    is not obvious."""
    lines = []
    for k, (old, now) in changes.items():
        line = f"{k}: {_value(old)} -> {_value(now)}"
        if k == "train.steps" and new.train.lr_schedule != "constant":
            tc = new.train
            lr_old = tc.lr * lr_factor(step, saved.train.steps, tc.warmup_steps, tc.lr_schedule)
            lr_new = tc.lr * lr_factor(step, tc.steps, tc.warmup_steps, tc.lr_schedule)
            line += (f" (the {tc.lr_schedule} learning-rate schedule now ends at step {tc.steps}: "
                     f"{lr_old:.3g} -> {lr_new:.3g} at step {step})")
        lines.append(line)
    return lines


# ----------------------------------------------------------------------------- start-up summary
def describe_start(resumed: Path | None, step: int, init: InitFrom | None, origin: dict | None) -> str:
    """How a run starts, in words: resumed from ``resumed`` (its checkpoint at ``step``), initialised
    from another run (``origin``, :func:`load_init_weights`' record), or fresh."""
    if resumed is not None:
        text = f"resumed from step {step} ({resumed})"
        if init is not None:
            text += f"; --init {init.path} is not applied: it sets a fresh run's weights (--fresh starts over from it)"
        return text
    if origin:
        return f"initialised from {origin['given']} ({origin['weights']} weights of step {origin['step']})"
    return "starting fresh"


def record_start(out: Path, step: int, origin: dict | None, changes: dict[str, list]) -> None:
    """Keep how a run started in its directory: at a fresh start, ``init.json`` (``origin``) or
    none; a line of ``log.jsonl``, ``{"step": 0, "init": origin}`` or, on a resume that changed
    its config, ``{"step": step, "config_change": {key: [old, new]}}``."""
    if step == 0:
        if origin:
            atomic_write(out / INIT, lambda tmp: Path(tmp).write_text(json.dumps(origin, indent=2)))
        else:
            (out / INIT).unlink(missing_ok=True)
    record = {"config_change": changes} if changes else {"init": origin} if step == 0 and origin else None
    if record:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")


def startup_summary(cfg: StageConfig, data: ImageSet, out: Path, device: str, n_params: int, start: str,
                    changed: list[str] = ()) -> list[str]:
    """The lines ``cdm train`` prints before its first step: the data set, the stage, the device
    and precision, ``start`` (how the run starts) and the ``changed`` config keys of a resume."""
    d = cfg.data
    path = d.path or (FASHION_MNIST_DIR if d.source == "fashion-mnist" else "")
    n = data.num_classes
    if not cfg.class_conditional:
        classes = "unconditional"
    elif n <= 10:
        classes = f"{n} classes ({', '.join(data.class_names)})"
    else:
        classes = f"{n} classes"
    kind = (f"{cfg.lowres_resolution}->{cfg.resolution}px super-resolution stage" if cfg.is_super_resolution
            else f"{cfg.resolution}px base stage")
    used = resolve_precision(cfg.train.precision, device.split()[0].split(":")[0])  # device: e.g. "cuda:0 x 2 processes"
    precision = ("bf16 autocast" if used == "bf16" else "fp32") + (
        " (auto: this device has no native bf16)" if cfg.train.precision == "auto" and used == "fp32" else "")
    where = data.describe() or f"{d.source} {path}"
    return [f"cdm train {cfg.name} -> {out}",
            f"  data: {where}, split {d.split}: {len(data):,} images at {d.resolution}px, {classes}",
            f"  {kind}: {n_params:,} parameters; training to step {cfg.train.steps:,}, batch "
            f"{cfg.train.batch_size}, on {device} in {precision}",
            f"  {start}", *(f"  changed on resume: {c}" for c in changed)]
