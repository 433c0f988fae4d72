"""Power-function EMA and post-hoc EMA (EDM2): the profile maths, the reconstruction of an EMA
that was never run, and the snapshots that training writes for ``cdm ema``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdm.checkpoint import CheckpointError, load_checkpoint, load_stage
from cdm.cli import main
from cdm.ema import (gamma_to_sigma_rel, list_snapshots, posthoc_coefficients, power_decay, reconstruct,
                     sigma_rel_to_gamma)
from cdm.train import train_stage

from conftest import tiny_config, toy_images


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28])
def test_sigma_rel_and_gamma_are_inverse(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > -1 and gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-9)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(12 ** -0.5)  # gamma = 0: a flat average


def _run_power_ema(values: np.ndarray, gamma: float) -> np.ndarray:
    """The power-function EMA of a scalar sequence after every step (steps are 1-based)."""
    ema, out = 0.0, []
    for step, v in enumerate(values, start=1):
        b = power_decay(step, gamma)
        ema = b * ema + (1 - b) * v
        out.append(ema)
    return np.array(out)


def test_the_power_ema_has_the_relative_std_it_was_asked_for():
    """Averaging tau itself, and tau^2, gives the mean and spread of the profile: sigma_rel * t."""
    t = 4000
    tau = np.arange(1, t + 1, dtype=np.float64)
    for sigma_rel in (0.05, 0.1, 0.2):
        g = sigma_rel_to_gamma(sigma_rel)
        m1, m2 = _run_power_ema(tau, g)[-1], _run_power_ema(tau ** 2, g)[-1]
        assert m1 / t == pytest.approx((g + 1) / (g + 2), rel=2e-3)
        assert np.sqrt(m2 - m1 ** 2) / t == pytest.approx(sigma_rel, rel=2e-2)


def test_post_hoc_ema_rebuilds_an_ema_that_was_never_run():
    """Snapshots of two EMAs (sigma_rel 0.05 and 0.1) every 100 steps reconstruct the EMA of
    sigma_rel 0.07 (and 0.15, outside their range) of a drifting scalar 'weight'."""
    t = 2000
    tau = np.arange(1, t + 1, dtype=np.float64)
    theta = np.sin(tau / 250.0) + tau / 1000.0
    stored = {r: _run_power_ema(theta, sigma_rel_to_gamma(r)) for r in (0.05, 0.1)}
    snap_steps = list(range(100, t + 1, 100))
    steps = [s for s in snap_steps for _ in stored]
    gammas = [sigma_rel_to_gamma(r) for _ in snap_steps for r in stored]
    values = np.array([stored[r][s - 1] for s in snap_steps for r in stored])
    for target in (0.07, 0.15):
        want = _run_power_ema(theta, sigma_rel_to_gamma(target))[-1]
        coef = posthoc_coefficients(steps, gammas, t, sigma_rel_to_gamma(target))
        assert coef.sum() == pytest.approx(1.0, abs=1e-3)  # an average of averages
        assert float(coef @ values) == pytest.approx(want, abs=5e-3 * np.ptp(theta))
    # Asking for a stored profile gives that snapshot back.
    coef = posthoc_coefficients(steps, gammas, t, sigma_rel_to_gamma(0.1))
    np.testing.assert_allclose(coef, np.eye(len(steps))[-1], atol=1e-6)


def _cfg(steps: int, **train):
    cfg = tiny_config(resolution=8, lowres=4, aug="gaussian", classes=3, data_resolution=16, steps=50)
    cfg.train.steps = steps
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_training_writes_snapshots_and_cdm_ema_exports_sampleable_checkpoints(tmp_path, capsys):
    data = toy_images(16, 16)
    run = tmp_path / "run"
    train_stage(_cfg(6, ema_profiles=[0.05, 0.1], ema_snapshot_every=2), run, progress=False, data=data)
    assert [s for s, _ in list_snapshots(run)] == [2, 4, 6]
    ckpt = load_checkpoint(run)
    assert len(ckpt.ema_profiles) == 2
    # The stored profile comes back (up to the snapshots' float16) when asked for.
    state, info = reconstruct(run, 0.1)
    for k, v in ckpt.ema_profiles[1].items():
        if v.is_floating_point():
            torch.testing.assert_close(state[k], v, atol=2e-3, rtol=2e-3)
    assert info["step"] == 6 and len(info["profiles"]) == 6

    assert main(["ema", str(run), "--sigma-rel", "0.03,0.2", "--out", str(tmp_path / "ema")]) == 0
    out = capsys.readouterr().out
    assert "ema-0.030.safetensors" in out and "ema-0.200.safetensors" in out
    stage = load_stage(tmp_path / "ema" / "ema-0.200.safetensors")
    assert stage.step == 6
    assert main(["ema", str(run), "--sigma-rel", "0.1", "--step", "5", "--out", str(tmp_path / "e")]) == 2
    assert "no EMA snapshot at step 5" in capsys.readouterr().err
    # Starting over leaves none of the old run's snapshots to mix into a reconstruction.
    train_stage(_cfg(2, ema_profiles=[0.05, 0.1], ema_snapshot_every=2), run, fresh=True, progress=False, data=data)
    assert [s for s, _ in list_snapshots(run)] == [2]


def test_resume_keeps_the_ema_profiles_exact(tmp_path):
    data = toy_images(16, 16)
    kw = dict(ema_profiles=[0.05, 0.1], ema_sigma_rel=0.1)
    straight = load_checkpoint(train_stage(_cfg(6, **kw), tmp_path / "a", progress=False, data=data))
    train_stage(_cfg(3, **kw), tmp_path / "b", progress=False, data=data)
    resumed = load_checkpoint(train_stage(_cfg(6, **kw), tmp_path / "b", progress=False, data=data))
    for a, b in zip([straight.ema, *straight.ema_profiles], [resumed.ema, *resumed.ema_profiles]):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"train.ema_profiles: \[0.05, 0.1\] -> \[0.05\]"):
        train_stage(_cfg(8, ema_profiles=[0.05], ema_sigma_rel=0.1), tmp_path / "b", progress=False, data=data)


def test_a_run_without_snapshots_says_how_to_get_them(tmp_path):
    run = tmp_path / "run"
    train_stage(_cfg(2), run, progress=False, data=toy_images(16, 16))
    with pytest.raises(CheckpointError, match="train.ema_profiles"):
        reconstruct(run, 0.1)
