"""Live training logs for TensorBoard: event files in ``RUN/tb/`` beside ``log.jsonl``.

TensorBoard is optional (``pip install tensorboard``, or the ``tb`` extra): without it, or with
``train.tensorboard = false``, :func:`open_live_log` returns a :class:`NoLiveLog` whose methods do
nothing, and training runs exactly as it would otherwise (after one line saying that live logs are
off and how to turn them on). Live logs never stop a training: a broken TensorBoard install, a
``tb/`` that cannot be written, or a write that fails mid-run (a full disk) turns them off with
one warning line, and training goes on (``log.jsonl`` keeps every line). Only rank 0 opens one.
``log.jsonl`` stays the run's record; the event files are a view of it to watch while a run trains::

    tensorboard --logdir runs/      # every run below runs/, each under its own name
"""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

TB_DIR = "tb"  # inside the run directory
_SKIP = ("step", "time")  # bookkeeping in log.jsonl's lines, not a curve
_told = False  # "live logs are off" is said once per process, not once per stage


class NoLiveLog:
    """A live log that writes nothing (TensorBoard absent or switched off)."""

    def scalars(self, step: int, values: dict) -> None:
        pass

    def image(self, step: int, tag: str, image: str | Path | np.ndarray | torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass


class LiveLog(NoLiveLog):
    """TensorBoard event files in ``log_dir``, flushed at each call so a running TensorBoard shows
    them at once. ``purge_step``: on resuming from step ``k``, pass ``k + 1``; TensorBoard then
    hides what an earlier attempt logged for later steps (as :func:`cdm.train.trim_log` drops
    those lines of ``log.jsonl``)."""

    def __init__(self, log_dir: str | Path, prefix: str = "train/", purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # raises ImportError without tensorboard

        self.prefix = prefix
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def _guard(self, write) -> None:
        """Run ``write()`` and flush; on any failure, warn once and write nothing more."""
        if self.writer is None:
            return
        try:
            write()
            self.writer.flush()
        except Exception as e:  # live logs are optional: never the end of a training
            writer, self.writer = self.writer, None
            warnings.warn(_off(f"TensorBoard live logs are off from now on ({_reason(e)})", "training goes on; "
                               "log.jsonl keeps every line"), stacklevel=3)
            try:
                writer.close()
            except Exception:
                pass

    def scalars(self, step: int, values: dict) -> None:
        """Every finite number of ``values`` as the curve ``prefix + key`` at ``step`` (``step`` and
        ``time`` keys, strings and others are left out, so a ``log.jsonl`` line can be passed as it is)."""
        def write() -> None:
            for k, v in values.items():
                if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.writer.add_scalar(self.prefix + k, v, step)
        self._guard(write)

    def image(self, step: int, tag: str, image: str | Path | np.ndarray | torch.Tensor) -> None:
        """A PNG file, or a uint8 image ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` (C = 1 or 3)."""
        if isinstance(image, (str, Path)):
            from PIL import Image

            with Image.open(image) as im:
                a = np.asarray(im.convert("L" if im.mode in ("L", "1") else "RGB"))
        else:
            a = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
            if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
                a = a.transpose(1, 2, 0)  # [C, H, W] -> [H, W, C]
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        assert a.dtype == np.uint8 and a.ndim in (2, 3), f"expected a uint8 image, got {a.dtype} {a.shape}"
        self._guard(lambda: self.writer.add_image(self.prefix + tag, a, step,
                                                  dataformats="HW" if a.ndim == 2 else "HWC"))

    def close(self) -> None:
        self._guard(lambda: None)  # the last flush, guarded
        if self.writer is not None:
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except Exception as e:
                warnings.warn(_off(f"TensorBoard live logs could not be closed ({_reason(e)})", "log.jsonl keeps "
                                   "every line"), stacklevel=2)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")


def _off(what: str, then: str) -> str:
    return f"{what}: {then}; set train.tensorboard=false to silence this"


def open_live_log(run_dir: str | Path, enabled: bool = True, resume_step: int = 0,
                  fresh: bool = False) -> NoLiveLog:
    """The live log of the run in ``run_dir`` (event files in ``run_dir/tb``): a :class:`LiveLog`,
    or a :class:`NoLiveLog` when ``enabled`` is false or TensorBoard cannot be imported (said once
    per process, as a warning). ``fresh`` deletes the event files of earlier attempts; otherwise
    what they logged after ``resume_step`` (the step training resumes from) is hidden."""
    global _told
    log_dir = Path(run_dir) / TB_DIR
    if fresh:
        shutil.rmtree(log_dir, ignore_errors=True)
    if not enabled:
        return NoLiveLog()
    try:
        return LiveLog(log_dir, purge_step=resume_step + 1)
    except ImportError as e:
        if not _told:
            _told = True
            warnings.warn(f"TensorBoard live logs are off ({e}): pip install tensorboard (or cdm[tb]) to have "
                          f"them in RUN/{TB_DIR}/, or set train.tensorboard=false to silence this", stacklevel=2)
    except Exception as e:  # a broken install, a tb/ that cannot be written: training goes on without
        warnings.warn(_off(f"TensorBoard live logs are off ({_reason(e)})", f"training goes on without them; "
                           f"check {log_dir} and the tensorboard install"), stacklevel=2)
    return NoLiveLog()
