"""The pieces the ``cdm`` command line is built from: argument types that refuse bad values with one
line, and :func:`option`, which gives a flag the default of the library setting it stands for.

**One home per default.** A flag that sets a library setting takes that setting's default from its
home — a dataclass field (``SampleRequest.n``), a function parameter (``run_demo``'s ``scale``) or a
module constant (``CAS_RECIPE``) — and shows it in ``--help``; the command line never writes a default
of its own. ``tests/test_cli_defaults.py`` walks every command and fails on a flag whose default has
no home or differs from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import math
import re
import types
from typing import Any

from .cascade import StagePlan
from .config import PRECISIONS
from .diffusion import Spacing
from .distributed import is_device_name
from .samplers import SAMPLERS

__all__ = ["ints", "floats", "classes", "checked", "positive", "positive_float", "seed", "spaces", "device",
           "home_default", "shown", "option", "common", "cascade_args", "reference_args", "PLAN_FLAGS"]


# ----------------------------------------------------------------------------- argument types
def ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def classes(text: str) -> list[int | str]:
    """``7,8`` or ``sneaker,bag`` (or both): integers are class indices, the rest class names, which
    the library resolves against the cascade's (:func:`cdm.generate.resolve_classes`)."""
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated class names or indices, got {text!r}")
    return [int(v) if v.lstrip("-").isdigit() else v for v in items]


def checked(cast, ok, want: str):
    """An argparse type: ``cast(text)``, refused with one message unless ``ok`` of it holds."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return v
    return parse


positive = checked(int, lambda v: v >= 1, "an integer >= 1")
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
seed = checked(int, lambda v: 0 <= v < 2 ** 63, "an integer seed in [0, 2^63)")
spaces = checked(lambda t: [v for v in t.split(",") if v], lambda v: v and set(v) <= {"classifier", "inception"},
                 "feature spaces, comma-separated: classifier, inception")
device = checked(str, is_device_name, "auto, cpu, cuda, cuda:N, mps or xpu")


# ----------------------------------------------------------------------------- one home per default
def home_default(owner: Any, path: str) -> Any:
    """The default at ``path`` (``"n"``, ``"reference.n"``) of ``owner``: a dataclass (its field's
    default), a function (its parameter's default) or a module (its attribute); the rest of a dotted
    path reads attributes of that value."""
    first, *rest = path.split(".")
    if dataclasses.is_dataclass(owner) and isinstance(owner, type):
        f = {f.name: f for f in dataclasses.fields(owner)}[first]
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise KeyError(f"{owner.__name__}.{first} has no default")
    elif isinstance(owner, types.ModuleType):
        value = getattr(owner, first)
    else:
        value = inspect.signature(owner).parameters[first].default
        if value is inspect.Parameter.empty:
            raise KeyError(f"{owner.__name__}({first}) has no default")
    for name in rest:
        value = getattr(value, name)
    return value


@functools.cache
def _field_comments(cls: type) -> dict[str, str]:
    """A dataclass's ``name: type = value  # comment`` comments, by field name."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def shown(value: Any) -> str | None:
    """How ``--help`` shows a default (None: not shown: no default, or a switch)."""
    if value is None or isinstance(value, bool) or value == "":
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def option(p: argparse.ArgumentParser, *flags: str, home: tuple[Any, str], help: str | None = None,
           **kw) -> argparse.Action:
    """``p.add_argument(*flags, **kw)`` with the default of ``home`` (``(owner, path)``, see
    :func:`home_default`), shown in the help; ``help`` defaults to the dataclass field's comment."""
    owner, path = home
    default = home_default(owner, path)
    if help is None and dataclasses.is_dataclass(owner) and "." not in path:
        help = _field_comments(owner).get(path, "")
    text = help or ""
    if shown(default) is not None:
        text = f"{text} (default {shown(default)})" if text else f"default {shown(default)}"
    action = p.add_argument(*flags, default=default, help=text.replace("%", "%%"), **kw)
    action.home = home  # read by the test that keeps every default in one place
    return action


def common(p: argparse.ArgumentParser, owner: Any = None, seed_help: str = "", *, progress: bool = True,
           device_flag: bool = True) -> None:
    """The flags every command that does the work they name takes, each with one meaning: --no-progress
    (no progress bar), --device and --seed (``seed_help`` says what it seeds; "": no --seed), their
    defaults from ``owner``'s ``device`` and ``seed`` (a settings dataclass or the command's function).
    With no ``owner`` they default to None: the config's own (train.device, train.seed) then stands."""
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    if device_flag:
        what = "auto: cuda:LOCAL_RANK if CUDA is available, else cpu; or cpu, cuda, cuda:N, mps"
        if owner is None:
            p.add_argument("--device", type=device, help=f"{what} (default: the config's train.device)")
        else:
            option(p, "--device", type=device, home=(owner, "device"), help=what)
    if seed_help:
        if owner is None:
            p.add_argument("--seed", type=seed, help=seed_help)
        else:
            option(p, "--seed", type=seed, home=(owner, "seed"), help=seed_help)


PLAN_FLAGS = ("steps", "levels", "mode", "sampler", "spacing", "guidance", "guidance_interval", "threshold", "churn",
              "churn_interval", "start")


def cascade_args(p: argparse.ArgumentParser, plan_flags: tuple[str, ...] = PLAN_FLAGS) -> None:
    """--cascade / --stage, --precision and the sampling-plan flags ``plan_flags``: unset, each leaves the
    cascade file's plan (else :class:`cdm.cascade.StagePlan`'s default) as it is."""
    sp = StagePlan()
    p.add_argument("--cascade", help="cascade file (JSON, see docs/SAMPLING.md, 'Cascade files') naming the stage "
                                     "checkpoints and the sampling plan")
    p.add_argument("--stage", action="append", default=[], metavar="CHECKPOINT",
                   help="a stage checkpoint or run directory, base first (repeat per stage)")
    p.add_argument("--precision", choices=list(PRECISIONS),
                   help="network precision while sampling (default: what each stage was trained with, auto for "
                        "the presets: bf16 autocast where the device computes bf16 natively, else fp32)")
    lo_hi = f"{sp.guidance_interval[0]:g},{sp.guidance_interval[1]:g}"
    flags = {
        "steps": dict(type=ints, help=f"sampler steps, one value or one per stage (e.g. 10,6; default: the cascade "
                                      f"file's, else {sp.steps} per stage)"),
        "levels": dict(type=ints, help="augmentation level s per stage, 0 for the base (e.g. 0,250)"),
        "mode": dict(choices=["truncated", "non-truncated"], help="how SR stages get their input"),
        "sampler": dict(choices=list(SAMPLERS),
                        help=f"reverse-process sampler of every stage (default: the cascade file's, else "
                             f"{sp.sampler})"),
        "spacing": dict(choices=[s.value for s in Spacing],
                        help=f"time-grid spacing of every stage (default: the cascade file's, else {sp.spacing}): "
                             "uniform in t, quadratic (DDIM's), logsnr (DPM-Solver's) or edm (Karras et al.'s)"),
        "guidance": dict(type=floats, help="classifier-free guidance weight w, one value or one per stage: the "
                                           "prediction is (1 + w) cond - w uncond, so 0 is unguided (Imagen's "
                                           "scale is 1 + w); needs stages trained with train.p_uncond > 0"),
        "guidance_interval": dict(type=floats, metavar="LO,HI",
                                  help=f"guide only where LO <= t/T <= HI (default {lo_hi}: every step)"),
        "threshold": dict(choices=["static", "dynamic", "none"],
                          help=f"the x0 estimate: static clips to [-1, 1], dynamic is Imagen's (for high guidance "
                               f"weights), none leaves it (default {sp.threshold})"),
        "churn": dict(type=float, help=f"EDM's stochastic churn S_churn for the deterministic samplers (ddim, "
                                       f"dpmpp-2m): fresh noise before each step, gamma = S_churn / steps "
                                       f"(default {sp.churn:g}: none)"),
        "churn_interval": dict(type=floats, metavar="LO,HI",
                               help=f"churn only where LO <= t/T <= HI (default "
                                    f"{sp.churn_interval[0]:g},{sp.churn_interval[1]:g})"),
        "start": dict(type=floats, metavar="F,F,...",
                      help="one per stage, 1 for the base: an SR stage with F < 1 starts its reverse process at "
                           "t = F*T from its upsampled input noised to that level, not from pure noise at T "
                           f"(non-truncated mode; default {sp.start:g})")}
    for name in plan_flags:
        p.add_argument(f"--{name.replace('_', '-')}", **flags[name])
    p.set_defaults(plan_flags=plan_flags)


def reference_args(p: argparse.ArgumentParser, owner: Any, n_ref: bool = True) -> None:
    """--split, --reference, --n-ref and --ref-seed: the ``reference`` (a ReferenceSpec) of ``owner``."""
    option(p, "--split", choices=["test", "train", "all"], home=(owner, "reference.split"),
           help="split of the stages' data set to compare with (test: Fashion-MNIST's test set; for a folder or "
                ".npz the held-out part training never reads, see data.held_out)")
    p.add_argument("--reference", metavar="PATH",
                   help="compare with these real images instead (a folder of class sub-folders, or an .npz)")
    if n_ref:
        option(p, "--n-ref", type=positive, home=(owner, "reference.n"),
               help="reference images: a random class-stratified subset of this many")
    option(p, "--ref-seed", type=seed, home=(owner, "reference.seed"), help="seed of the reference subset")
