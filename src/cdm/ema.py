"""Exponential moving averages of the weights, and post-hoc EMA (Karras et al. 2024, "Analyzing
and Improving the Training Dynamics of Diffusion Models", EDM2, §3).

Two kinds of running average, both ``ema <- beta * ema + (1 - beta) * net`` after every step:

- **classic** (``train.ema_decay``): ``beta = min(decay, (1 + n) / (10 + n))`` at step ``n``;
- **power function** (``train.ema_sigma_rel``): ``beta_n = (1 - 1/n)^(gamma + 1)`` (EDM2 eq. 2),
  which averages the weights of steps ``tau <= n`` with weights ``~ tau^gamma``. Its length is a
  fixed *fraction* of the run so far, its relative standard deviation ``sigma_rel`` (EDM2 eq. 3),
  so one value suits short and long runs alike.

**Post-hoc EMA**: training keeps power-function EMAs at a few ``sigma_rel`` (``train.ema_profiles``,
EDM2 uses 0.05 and 0.10) and writes snapshots of them (``ema/step-*.safetensors``) during the run.
Afterwards :func:`reconstruct` finds the EMA of any other ``sigma_rel``, at any snapshot's step, as
the least-squares combination of the snapshots' averaging profiles (EDM2 §3.2 and app. C.2), so
the EMA length is *chosen by measured quality* after training instead of guessed before it
(``cdm ema``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, atomic_write, check_not_pickle, write_hint
from .config import ConfigError

SNAPSHOT_DIR = "ema"
_NAME = re.compile(r"^step-(\d+)\.safetensors$")


# ----------------------------------------------------------------------------- sigma_rel <-> gamma
def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma`` of the power-function profile with relative std ``sigma_rel``:
    the largest real root of ``gamma^3 + 7 gamma^2 + (16 - 1/sigma^2) gamma + 12 - 1/sigma^2 = 0``,
    which is EDM2's eq. 3, ``sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))``, multiplied out."""
    if not 0 < sigma_rel < 12 ** -0.5:
        raise ValueError(f"sigma_rel must lie in (0, {12 ** -0.5:.4f}) (the flat average has 0.2887), got {sigma_rel}")
    k = 1.0 / sigma_rel ** 2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 eq. 3: the relative std of the profile ``p(tau) ~ tau^gamma`` on ``[0, t]``, divided by ``t``."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


# ----------------------------------------------------------------------------- running averages
def power_decay(step: int, gamma: float) -> float:
    """``beta`` after optimiser step ``step`` (1-based) of the power-function EMA: ``(1 - 1/step)^(gamma+1)``."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def classic_decay(step: int, decay: float) -> float:
    """``beta`` after step ``step`` (1-based) of the classic EMA, warmed up as ``(1 + n) / (10 + n)``."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """``ema <- beta * ema + (1 - beta) * net`` for parameters; buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1.0 - beta)
    for eb, nb in zip(ema.buffers(), net.buffers()):
        eb.copy_(nb)


# ----------------------------------------------------------------------------- post-hoc reconstruction
def _profile_dot(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """Inner products ``<p_a, p_b>`` of normalised power-function profiles ``p(tau) = (g + 1)
    tau^g / t^(g + 1)`` on ``[0, t]`` (zero after ``t``): for every pair, ``(g_a + 1)(g_b + 1)
    min(t_a, t_b)^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1))``. Broadcasts."""
    t_min = np.minimum(t_a, t_b)
    g_sum = g_a + g_b + 1
    # In logs: the powers of steps in the thousands overflow float64 for large gamma.
    log = (np.log(g_a + 1) + np.log(g_b + 1) + g_sum * np.log(t_min) - np.log(g_sum)
           - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
    return np.exp(log)


def posthoc_coefficients(snap_steps: list[int], snap_gammas: list[float], step: int, gamma: float) -> np.ndarray:
    """Weights ``x`` ``[K]`` such that ``sum_i x_i * snapshot_i`` best approximates (least squares
    over the averaging profiles, EDM2 app. C.2) the power-function EMA of exponent ``gamma`` at
    ``step``, given snapshots taken at ``snap_steps`` of EMAs with exponents ``snap_gammas``."""
    t = np.asarray(snap_steps, dtype=np.float64)
    g = np.asarray(snap_gammas, dtype=np.float64)
    if len(t) == 0:
        raise ValueError("post-hoc EMA needs at least one snapshot")
    A = _profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = _profile_dot(t, g, np.float64(step), np.float64(gamma))
    x, *_ = np.linalg.lstsq(A, b, rcond=None)
    return x


# ----------------------------------------------------------------------------- snapshots
def snapshot_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step-{step:08d}.safetensors"


def save_snapshot(run_dir: str | Path, step: int, profiles: list[tuple[float, dict[str, Tensor]]]) -> Path:
    """Write the power-function EMAs ``[(sigma_rel, state_dict), ...]`` of step ``step`` to
    ``ema/step-*.safetensors`` (float16, as EDM2 stores them), atomically."""
    from safetensors.torch import save_file

    tensors = {f"{i}.{k}": v.detach().to("cpu", torch.float16).contiguous()
               for i, (_, sd) in enumerate(profiles) for k, v in sd.items() if v.is_floating_point()}
    meta = {"format": "cdm-ema-snapshot", "step": str(step), "sigma_rels": json.dumps([s for s, _ in profiles])}
    path = snapshot_path(run_dir, step)
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    except OSError as e:
        raise CheckpointError(f"could not write EMA snapshot {path} ({e}); {write_hint(e)}") from e
    return path


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of a run's EMA snapshots, oldest first."""
    d = Path(run_dir) / SNAPSHOT_DIR
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)))


def remove_snapshots_after(run_dir: str | Path, step: int) -> None:
    """Delete the snapshots of steps after ``step``: a run resumed (or restarted, ``step = 0``) from
    there writes its own, and none of an abandoned trajectory may enter a reconstruction."""
    for s, p in list_snapshots(run_dir):
        if s > step:
            p.unlink(missing_ok=True)


def _snapshot_file(path: Path, tensors: bool) -> tuple[list[float], dict[str, Tensor]]:
    """A snapshot's ``sigma_rel`` list, and (with ``tensors``) its weights."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    check_not_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        weights = load_file(str(path)) if tensors else {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"EMA snapshot {path} is unreadable ({e}); delete it to reconstruct from the others") from e
    if meta.get("format") != "cdm-ema-snapshot":
        raise CheckpointError(f"{path} is not a cdm EMA snapshot")
    return json.loads(meta["sigma_rels"]), weights


def _at_step(run_dir: str | Path, snaps: list[tuple[int, Path]], step: int | None) -> int:
    """``step`` (default: the last snapshot's), checked to be a snapshot's step of the run."""
    if not snaps:
        raise CheckpointError(f"{run_dir} has no EMA snapshots (no {SNAPSHOT_DIR}/step-*.safetensors); train it with "
                              f"train.ema_profiles set (e.g. --set train.ema_profiles=0.05,0.1)")
    step = snaps[-1][0] if step is None else step
    if step not in {s for s, _ in snaps}:
        raise CheckpointError(f"no EMA snapshot at step {step} in {run_dir} (snapshots at steps "
                              f"{', '.join(str(s) for s, _ in snaps)}): pass one of them to --step")
    return step


def reconstruct(run_dir: str | Path, sigma_rel: float, step: int | None = None,
                template: dict[str, Tensor] | None = None) -> tuple[dict[str, Tensor], dict]:
    """The post-hoc EMA of relative std ``sigma_rel`` at ``step`` (default: the last snapshot's),
    from the run's snapshots up to that step. ``template`` (a state dict of the network) supplies
    the non-float buffers, which are not averaged. Returns ``(state_dict, info)``; ``info`` lists
    the snapshots' profiles and their weights."""
    snaps = list_snapshots(run_dir)
    step = _at_step(run_dir, snaps, step)
    used = [(s, _snapshot_file(p, tensors=False)[0], p) for s, p in snaps if s <= step]
    profiles = [(s, r) for s, rels, _ in used for r in rels]  # one entry per stored EMA
    coef = posthoc_coefficients([s for s, _ in profiles], [sigma_rel_to_gamma(r) for _, r in profiles], step,
                                sigma_rel_to_gamma(sigma_rel))
    acc: dict[str, Tensor] = {}
    k = 0
    for _, rels, path in used:
        tensors = _snapshot_file(path, tensors=True)[1]
        for i in range(len(rels)):
            for name, v in tensors.items():
                if name.startswith(f"{i}."):
                    key = name[len(f"{i}."):]
                    acc[key] = acc.get(key, 0.0) + float(coef[k]) * v.double()
            k += 1
    state = {name: v.float() for name, v in acc.items()}
    for name, v in (template or {}).items():
        state.setdefault(name, v.clone())
    info = {"sigma_rel": sigma_rel, "step": step,
            "profiles": [{"step": s, "sigma_rel": r, "weight": float(c)} for (s, r), c in zip(profiles, coef)]}
    return state, info


SIGMA_REL_MAX = 12 ** -0.5  # the flat average of the whole run (EDM2): every EMA is shorter


def check_sigma_rels(values: list[float]) -> list[float]:
    """``values`` with each checked to lie in ``(0, 0.2887)`` (:data:`SIGMA_REL_MAX`), equal ones
    once, in the order given."""
    out: list[float] = []
    for r in values:
        if not (math.isfinite(r) and 0 < r < SIGMA_REL_MAX):
            raise ConfigError(f"--sigma-rel {r:g} is out of range: each relative EMA length must lie in (0, "
                              f"{SIGMA_REL_MAX:.4f}) ({SIGMA_REL_MAX:.4f} averages the whole run), e.g. 0.05,0.1")
        if r not in out:
            out.append(r)
    if not out:
        raise ConfigError("--sigma-rel needs at least one relative EMA length, e.g. 0.05,0.1")
    return out


def export_name(sigma_rel: float) -> str:
    """The file of a post-hoc EMA: ``ema-0.050.safetensors``, or with every digit where three
    decimals would round it (``ema-0.0501.safetensors``), so distinct values never share a file."""
    text = f"{sigma_rel:.3f}"
    return f"ema-{text if float(text) == sigma_rel else repr(sigma_rel)}.safetensors"


def export_posthoc(run_dir: str | Path, sigma_rels: list[float], out_dir: str | Path,
                   step: int | None = None) -> list[tuple[Path, dict]]:
    """Write one stage checkpoint per ``sigma_rel`` (``out_dir/``:func:`export_name`), whose weights
    are the run's post-hoc EMA at ``step`` (default: its last snapshot). Each samples like any
    checkpoint (``cdm sample --stage FILE``) and records what made it (``extra["posthoc_ema"]``:
    the run, step, sigma_rel and the profiles' weights). Every argument is checked before any work;
    ``out_dir`` is locked for the export (:func:`cdm.runlock.run_lock`). Returns ``[(path, info), ...]``."""
    from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from .runlock import run_lock

    run, out = Path(run_dir), Path(out_dir)
    sigma_rels = check_sigma_rels(sigma_rels)
    if not run.is_dir():
        raise CheckpointError(f"run directory {run} does not exist" if not run.exists() else
                              f"{run} is a file: cdm ema takes the run directory of a training with "
                              f"train.ema_profiles (its {SNAPSHOT_DIR}/ snapshots)")
    step = _at_step(run, list_snapshots(run), step)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: name a directory")
    base = load_checkpoint(run, weights_only=True)  # the config, and the buffers' template
    written = []
    with run_lock(out, "exporting post-hoc EMAs"):
        for r in sigma_rels:
            state, info = reconstruct(run, r, step, template=base.ema)
            info = {**info, "run": str(run.resolve())}
            path = out / export_name(r)
            # The weights go in as the EMA (a weights-only file: no training state to resume from).
            save_checkpoint(path, Checkpoint(config=base.config, step=info["step"], model={}, ema=state,
                                             extra={"posthoc_ema": info, "run": str(run)}))
            written.append((path, info))
    return written
