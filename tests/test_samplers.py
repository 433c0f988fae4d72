"""Fast samplers (DDIM, DPM-Solver++(2M)) and grid spacings: against the exact denoiser of Gaussian
data, against ancestral sampling, and for seeding, truncation and learned-variance outputs."""

from __future__ import annotations

import math

import pytest
import torch

from cdm.cascade import Cascade, CascadeError, SamplingPlan, StagePlan
from cdm.cli import build_parser
from cdm.diffusion import DiffusionConfig, GaussianDiffusion, log_snr, time_grid
from cdm.samplers import SAMPLERS, Churn, SeededNoise, ancestral, ddim, dpmpp_2m, dpmpp_2m_sde
from cdm.stage import Stage

from conftest import SIGMA, exact_model, tiny_config, tiny_stage


class NoNoise:
    """A noise source that a deterministic sampler must never touch."""

    def randn(self, *shape: int):
        raise AssertionError("a deterministic sampler drew noise")


def net_model(stage: Stage):
    """The tiny stage's (random, non-linear) network as a sampler model, unconditional label 0."""
    stage.net.eval()

    def model(x, t):
        return stage(x, t, stage.conditioning(torch.zeros(x.shape[0], dtype=torch.long)))
    return model


def ode_gain(sampler, d: GaussianDiffusion, prediction: str, grid: list[int]) -> float:
    """With the exact (linear) denoiser a deterministic sampler is a linear map x_T -> k x_T; return k^2."""
    x = torch.randn(16, 1, 4, 4)
    out, _ = sampler(exact_model(d, prediction), d, x, grid, NoNoise(), clip_x0=False)
    k = (out.flatten() @ x.flatten() / (x.flatten() @ x.flatten())).item()
    torch.testing.assert_close(out, k * x, rtol=1e-5, atol=1e-6)  # linear: no noise, no cross-talk
    return k ** 2


def marginal_var(d: GaussianDiffusion, s: int) -> float:
    """The probability-flow ODE maps N(0, 1) at T to variance v_s / v_T, v_t = abar_t SIGMA^2 + 1 - abar_t."""
    v = lambda t: d.alpha_bar[t].item() * SIGMA ** 2 + 1 - d.alpha_bar[t].item()  # noqa: E731
    return v(s) / v(d.T)


# ------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name,steps,spacing,stop,tol", [
    ("dpmpp-2m", 20, "uniform", 0, 0.02),
    ("dpmpp-2m", 20, "uniform", 400, 0.01),
    ("dpmpp-2m", 10, "quadratic", 0, 0.05),
    ("dpmpp-2m", 20, "quadratic", 0, 0.02),
    ("ddim", 100, "uniform", 0, 0.04),
    ("ddim", 50, "uniform", 400, 0.02),
    ("ddim", 50, "quadratic", 0, 0.08),
])
def test_ode_samplers_reach_the_marginal_variance(prediction, name, steps, spacing, stop, tol):
    """Full runs land on N(0, SIGMA^2); truncated runs on the noisy marginal q(z_s)."""
    d = GaussianDiffusion(DiffusionConfig(steps=1000, prediction=prediction))
    grid = time_grid(1000, steps, stop=stop, spacing=spacing)
    assert ode_gain(SAMPLERS[name], d, prediction, grid) == pytest.approx(marginal_var(d, stop), rel=tol)


def test_convergence_order():
    """Doubling the steps divides the error by ~2 for DDIM (first order) and ~4 for DPM-Solver++(2M)
    (second order); on a truncated grid, where no first-order final denoise step interferes."""
    d = GaussianDiffusion(DiffusionConfig(steps=1000))
    target = marginal_var(d, 400)
    err = {(s, n): abs(ode_gain(s, d, "eps", time_grid(1000, n, stop=400)) - target)
           for s in (ddim, dpmpp_2m) for n in (10, 20)}
    assert 1.7 < err[ddim, 10] / err[ddim, 20] < 2.3
    assert err[dpmpp_2m, 10] / err[dpmpp_2m, 20] > 3.0
    assert err[dpmpp_2m, 20] < err[ddim, 20] / 5


def test_dpmpp_first_step_is_ddim():
    """The first (single-step) DPM-Solver++ update is first order and equals DDIM (Lu et al. 2022, eq. 9)."""
    stage = tiny_stage(steps=100)
    x = torch.randn(3, 1, 8, 8)
    for grid in ([100, 40], [70, 0]):
        a, a0 = dpmpp_2m(net_model(stage), stage.diffusion, x, grid, NoNoise())
        b, b0 = ddim(net_model(stage), stage.diffusion, x, grid, NoNoise())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a0, b0)


class BatchNoise:
    """Noise for many samples at once from one generator (statistical tests, not per-sample seeding)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.g = n, torch.Generator().manual_seed(seed)

    def randn(self, *shape: int):
        return torch.randn(self.n, *shape, generator=self.g)


@pytest.mark.parametrize("steps,spacing,stop", [(25, "quadratic", 0), (15, "uniform", 0), (20, "uniform", 400)])
def test_sde_solver_reaches_the_marginal_variance(steps, spacing, stop):
    """With the exact denoiser of N(0, SIGMA^2) data, SDE-DPM-Solver++(2M) samples have the right
    variance at s = 0 (SIGMA^2) and on a truncated grid (that of q(z_s)), to within sampling error
    (16384 values: ~1% standard error) and discretisation error."""
    d = GaussianDiffusion(DiffusionConfig(steps=1000))
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    out, _ = dpmpp_2m_sde(exact_model(d, "eps"), d, x, time_grid(1000, steps, stop=stop, spacing=spacing),
                          BatchNoise(64), clip_x0=False)
    v = d.alpha_bar[stop].item() * SIGMA ** 2 + 1 - d.alpha_bar[stop].item()
    assert out.var().item() == pytest.approx(v, rel=0.05)
    assert abs(out.mean().item()) < 0.03


def test_sde_solver_first_step_is_the_ancestral_step():
    """A single SDE-DPM-Solver++ step is the first-order SDE solver, i.e. DDIM with eta = 1
    (the ancestral step without learned variance), given the same noise."""
    stage = tiny_stage(steps=100)
    x = torch.randn(3, 1, 8, 8)
    for grid in ([100, 40], [70, 0]):
        a, a0 = dpmpp_2m_sde(net_model(stage), stage.diffusion, x, grid, SeededNoise([1, 2, 3]))
        b, b0 = SAMPLERS["ddim-eta1"](net_model(stage), stage.diffusion, x, grid, SeededNoise([1, 2, 3]))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a0, b0)


# ------------------------------------------------------------------------------ noise and equivalences
@pytest.mark.parametrize("stop", [0, 30])
def test_ddim_eta1_equals_ancestral_sample_for_sample(stop):
    """With eta = 1 DDIM's variance is the step's posterior variance, so given the same noise it is
    the ancestral sampler; with clipping on, as the random network's x0 estimates leave [-1, 1]."""
    stage = tiny_stage(steps=100)
    grid = time_grid(100, 8, stop=stop)
    x = torch.randn(4, 1, 8, 8)
    a, a0 = ancestral(net_model(stage), stage.diffusion, x, grid, SeededNoise([1, 2, 3, 4]))
    b, b0 = SAMPLERS["ddim-eta1"](net_model(stage), stage.diffusion, x, grid, SeededNoise([1, 2, 3, 4]))
    assert a0.abs().max() == 1.0  # clipping was active
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b0, a0, rtol=1e-5, atol=1e-5)
    # and for the v-parameterisation, unclipped
    d = GaussianDiffusion(DiffusionConfig(steps=100, prediction="v"))
    a, _ = ancestral(exact_model(d, "v"), d, x, grid, SeededNoise([5, 6, 7, 8]), clip_x0=False)
    b, _ = ddim(exact_model(d, "v"), d, x, grid, SeededNoise([5, 6, 7, 8]), clip_x0=False, eta=1.0)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m"])
def test_deterministic_samplers_draw_no_noise(name):
    stage = tiny_stage(steps=100)
    x = torch.randn(2, 1, 8, 8)
    grid = time_grid(100, 6, spacing="quadratic")
    a, _ = SAMPLERS[name](net_model(stage), stage.diffusion, x, grid, NoNoise())
    b, _ = SAMPLERS[name](net_model(stage), stage.diffusion, x.clone(), grid, NoNoise())
    assert torch.equal(a, b)


def test_ddim_eta_must_lie_in_unit_interval():
    d = GaussianDiffusion(DiffusionConfig(steps=10))
    with pytest.raises(ValueError, match="eta"):
        ddim(exact_model(d, "eps"), d, torch.zeros(1, 1, 2, 2), [10, 0], NoNoise(), eta=1.5)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_sample_depends_on_its_seed_not_its_batch(name):
    stage = tiny_stage(steps=50)
    grid = time_grid(50, 5, stop=10)

    def run(seeds):
        noise = SeededNoise(seeds)
        return SAMPLERS[name](net_model(stage), stage.diffusion, noise.randn(1, 8, 8), grid, noise)[0]

    torch.testing.assert_close(run([7, 8, 9])[1:2], run([8]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_learned_variance_outputs(name):
    """Every sampler runs on a 2C-channel output; DDIM and DPM-Solver++ ignore the variance channels."""
    stage = tiny_stage(steps=50, learn_sigma=True)
    model = net_model(stage)
    x = torch.randn(2, 1, 8, 8)
    grid = time_grid(50, 5)
    out, x0 = SAMPLERS[name](model, stage.diffusion, x, grid, SeededNoise([0, 1]))
    assert out.shape == x0.shape == x.shape and torch.isfinite(out).all()
    if name != "ancestral":
        def scrambled(x_, t_):
            o = model(x_, t_)
            return torch.cat([o[:, :1], torch.randn_like(o[:, 1:])], dim=1)
        out2, _ = SAMPLERS[name](scrambled, stage.diffusion, x, grid, SeededNoise([0, 1]))
        torch.testing.assert_close(out2, out)


@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m"])
def test_truncated_run_stops_at_the_noisy_state(name):
    """A grid ending at s > 0 returns z_s, not the x0 estimate, and z_s has the marginal's scale."""
    d = GaussianDiffusion(DiffusionConfig(steps=100))
    x = torch.randn(64, 1, 4, 4)
    z, x0 = SAMPLERS[name](exact_model(d, "eps"), d, x, time_grid(100, 10, stop=50), NoNoise(), clip_x0=False)
    assert not torch.allclose(z, x0)
    assert z.var().item() / x.var().item() == pytest.approx(marginal_var(d, 50), rel=0.05)
    assert (x0.var() / z.var()).item() < 0.5  # x0_hat shrinks towards the data's smaller scale


# ------------------------------------------------------------------------------ grids
def test_quadratic_grid():
    assert time_grid(100, 4, spacing="quadratic") == [100, 56, 25, 6, 0]  # 100 (1 - i/4)^2
    assert time_grid(100, 4, stop=20, spacing="quadratic") == [100, 65, 40, 25, 20]
    for T, steps, stop in [(1000, 50, 0), (100, 50, 0), (100, 99, 1), (1000, 20, 300), (10, 50, 5), (3, 1, 0)]:
        g = time_grid(T, steps, stop=stop, spacing="quadratic")
        assert g[0] == T and g[-1] == stop and len(g) == min(steps, T - stop) + 1
        assert all(a > b for a, b in zip(g, g[1:]))
        assert g[0] - g[1] >= g[-2] - g[-1]  # coarse near T, dense near stop
    assert time_grid(1000, 50) == time_grid(1000, 50, spacing="uniform")
    with pytest.raises(ValueError):
        time_grid(100, 10, spacing="cubic")


# ------------------------------------------------------------------------------ exposure
def test_cascade_and_cli_expose_samplers_and_spacing():
    base = Stage(tiny_config(resolution=4, steps=50, name="base"))
    sr = Stage(tiny_config(resolution=8, lowres=4, aug="gaussian", steps=50, name="sr"))
    cascade = Cascade([base, sr])
    outs = {}
    for name in SAMPLERS:
        settings = SamplingPlan.uniform(2, steps=4, levels=[0, 10], mode="truncated", sampler=name, spacing="quadratic")
        out = cascade.sample(torch.tensor([0, 1]), [3, 4], settings)
        assert out.images[1].shape == (2, 1, 8, 8) and torch.isfinite(out.inputs[1]).all()
        torch.testing.assert_close(cascade.sample(torch.tensor([0, 1]), [3, 4], settings).images[1], out.images[1])
        outs[name] = out.inputs[1]  # the base's z_s, handed over unclamped
    # the plan's sampler is the one that runs: DDIM with eta = 1 is the ancestral sampler step for step
    # (test_ddim_eta1_equals_ancestral_sample_for_sample), and each stochastic sampler draws noise that its
    # deterministic counterpart does not (a random network cannot tell the deterministic ones apart)
    torch.testing.assert_close(outs["ddim-eta1"], outs["ancestral"])
    assert not torch.allclose(outs["ancestral"], outs["ddim"]) and not torch.allclose(outs["dpmpp-2m-sde"],
                                                                                       outs["dpmpp-2m"])
    with pytest.raises(CascadeError, match="spacing"):
        cascade.sample(torch.tensor([0]), [0], SamplingPlan(stages=[StagePlan(spacing="cubic")] * 2))
    a = build_parser().parse_args(["sample", "--stage", "b", "--out", "o", "--sampler", "dpmpp-2m",
                                   "--spacing", "quadratic"])
    assert (a.sampler, a.spacing) == ("dpmpp-2m", "quadratic")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--stage", "b", "--out", "o", "--sampler", "euler"])


# ------------------------------------------------------------------------------ few-step options
def test_logsnr_and_edm_grids():
    d = GaussianDiffusion(DiffusionConfig(steps=1000))
    lam = log_snr(d.alpha_bar.double())
    for spacing in ("logsnr", "edm"):
        for steps, stop in [(4, 0), (10, 0), (25, 0), (4, 200), (10, 300), (999, 1), (1000, 0)]:
            g = time_grid(1000, steps, stop=stop, spacing=spacing, alpha_bar=d.alpha_bar)
            assert g[0] == 1000 and g[-1] == stop and len(g) == min(steps, 1000 - stop) + 1
            assert all(a > b for a, b in zip(g, g[1:]))
        with pytest.raises(ValueError, match="alpha_bar"):
            time_grid(1000, 10, spacing=spacing)
    # logsnr: equal log-SNR steps between sigma = 80 and t = 1 (up to rounding to integer times)
    g = time_grid(1000, 10, spacing="logsnr", alpha_bar=d.alpha_bar)
    gaps = [(lam[b] - lam[a]).item() for a, b in zip(g[1:-2], g[2:-1])]
    assert max(gaps) - min(gaps) < 0.1 * sum(gaps) / len(gaps)
    # edm: sigma^(1/7) evenly spaced
    s7 = [math.exp(-lam[t].item() / 7) for t in g]
    e = time_grid(1000, 10, spacing="edm", alpha_bar=d.alpha_bar)
    s7 = [math.exp(-lam[t].item() / 7) for t in e[1:-1]]
    gaps = [a - b for a, b in zip(s7, s7[1:])]
    assert max(gaps) - min(gaps) < 0.1 * sum(gaps) / len(gaps)


def test_churn_raises_the_noise_level_to_that_of_t_hat():
    """Churn on x_t ~ q(x_t) of N(0, SIGMA^2) data gives a sample of q(x_t_hat)."""
    d = GaussianDiffusion(DiffusionConfig(steps=1000))
    t = 300
    v = lambda t: d.alpha_bar[t].item() * SIGMA ** 2 + 1 - d.alpha_bar[t].item()  # noqa: E731
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * math.sqrt(v(t))
    x_hat, t_hat = Churn(s_churn=4.0, steps=10)(d, x, t, BatchNoise(64, seed=1))
    ab = d.alpha_bar.double()
    sigma = lambda t: math.sqrt((1 - ab[t].item()) / ab[t].item())  # noqa: E731
    assert t_hat > t and sigma(t_hat) >= 1.4 * sigma(t) > sigma(t_hat - 1)  # gamma = min(0.4, sqrt 2 - 1)
    assert x_hat.var().item() == pytest.approx(v(t_hat), rel=0.03)
    for off in (Churn(0.0, 10), Churn(4.0, 10, (0.5, 1.0))):  # no churn; t outside its interval
        x_same, t_same = off(d, x, t, NoNoise())
        assert x_same is x and t_same == t


@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m"])
def test_churned_deterministic_samplers_converge_to_the_marginal(name):
    """Churn trades ODE accuracy for error correction: with the exact denoiser it only adds
    discretisation error (a churned step is first order and longer), which vanishes as the steps
    grow at a fixed total churn (gamma = S_churn / steps)."""
    d = GaussianDiffusion(DiffusionConfig(steps=1000))
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    err = []
    for n in (25, 100):
        grid = time_grid(1000, n, spacing="quadratic")
        out, _ = SAMPLERS[name](exact_model(d, "eps"), d, x, grid, BatchNoise(64), clip_x0=False,
                                churn=Churn(s_churn=2.0, steps=n, interval=(0.05, 0.8)))
        err.append(abs(out.var().item() / SIGMA ** 2 - 1))
    assert err[1] < 0.06 and err[1] < err[0]


def test_the_plan_refuses_churn_for_stochastic_samplers():
    with pytest.raises(CascadeError, match="churn"):
        StagePlan(sampler="dpmpp-2m-sde", churn=5.0).check()
    with pytest.raises(CascadeError, match="churn"):
        StagePlan(sampler="ddim", churn=-1.0).check()
    StagePlan(sampler="dpmpp-2m", churn=5.0, churn_interval=[0.1, 0.9], spacing="edm").check()


def test_cascade_file_and_cli_carry_churn_and_the_new_grids(tmp_path):
    from cdm.cascade_file import read_cascade_file, write_cascade_file

    base = Stage(tiny_config(resolution=4, steps=50, name="base"))
    sr = Stage(tiny_config(resolution=8, lowres=4, aug="gaussian", steps=50, name="sr"))
    plan = SamplingPlan.uniform(2, steps=6, levels=[0, 10], sampler="dpmpp-2m", spacing="edm").override(
        churn=5.0, churn_interval=[0.1, 0.9])
    out = Cascade([base, sr]).sample(torch.tensor([0, 1]), [3, 4], plan)
    assert torch.isfinite(out.images[1]).all()
    f = tmp_path / "cascade.json"
    write_cascade_file(f, ["a", "b"], plan)
    assert read_cascade_file(f)[1] == plan
    a = build_parser().parse_args(["sample", "--stage", "b", "--out", "o", "--sampler", "ddim", "--spacing", "logsnr",
                                   "--churn", "3", "--churn-interval", "0.2,0.8"])
    assert (a.sampler, a.spacing, a.churn, a.churn_interval) == ("ddim", "logsnr", 3.0, [0.2, 0.8])
