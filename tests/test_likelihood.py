"""The variational bound: its estimators, a closed-form check on discretised Gaussian data, the
cascade's bookkeeping over stages and levels, and ``cdm nll``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cdm.cascade import Cascade, CascadeError, SamplingPlan
from cdm.cascade_file import write_cascade_file
from cdm.checkpoint import Checkpoint, checkpoint_path, save_checkpoint
from cdm.cli import main
from cdm.data import ImageSet
from cdm.diffusion import DiffusionConfig, GaussianDiffusion
from cdm.eval.likelihood import cascade_bound, diffusion_bound, stage_images
from cdm.samplers import SeededNoise, derive_seed
from cdm.stage import Stage

from conftest import tiny_config, toy_images


def two_stages(base_steps: int = 20, aug: str = "gaussian", aug_steps: int | None = None, classes: int = 3) -> Cascade:
    """Untrained 8px base and 8->16 SR stages; v-prediction keeps an untrained network's x0 estimate,
    and so its bound, moderate (an eps network's x0 = (x_T - eps) / sqrt(abar_T) explodes)."""
    torch.manual_seed(0)
    base = Stage(tiny_config(resolution=8, classes=classes, steps=base_steps, prediction="v", name="base"))
    sr = Stage(tiny_config(resolution=16, lowres=8, aug=aug, classes=classes, steps=12, prediction="v",
                           aug_steps=aug_steps or base_steps, name="sr"))
    for st in (base, sr):
        st.net.eval()
    return Cascade([base, sr])


# --------------------------------------------------------------------------- estimators
@pytest.mark.parametrize("stop", [0, 7])
def test_monte_carlo_estimate_is_unbiased_for_the_exact_sum(stop):
    """One image under many seeds: the mean of the Monte-Carlo estimates (K = 3 draws of t) matches
    the mean of the exact sums (every t), including the (T - stop) weight of a truncated bound."""
    stage = two_stages().stages[0]
    x0 = stage_images(toy_images(1, 8).images, 8)
    cond = stage.conditioning(torch.tensor([1]))
    model = lambda x, t: stage(x, t, cond)  # noqa: E731

    def estimates(m, t_samples, first_seed):
        noise = SeededNoise(range(first_seed, first_seed + m))
        return diffusion_bound(model, stage.diffusion, x0.expand(m, -1, -1, -1), noise, stop, t_samples)

    exact, mc = estimates(96, None, 0), estimates(1024, 3, 10_000)
    se = math.sqrt(exact.var() / len(exact) + mc.var() / len(mc))
    assert abs(mc.mean() - exact.mean()) < 4 * se
    assert se < 0.06 * exact.mean()  # the check has teeth
    assert mc.std() > 2 * exact.std()  # and the two estimators really differ


def test_bound_does_not_depend_on_the_batch():
    c = two_stages()
    data = toy_images(5, 16)
    a = cascade_bound(c, data, [0, 4], seed=3, batch_size=2, t_samples=2)
    b = cascade_bound(c, ImageSet(data.images[2:], data.labels[2:], data.class_names), [0, 4], seed=5, batch_size=64, t_samples=2)
    torch.testing.assert_close(a.total_bits[2:], b.total_bits)


def test_exact_sum_bookkeeping_of_the_stop():
    """stop = s keeps L_T and the terms t = s+1..T, each with the noise it sees when stop = 0."""
    stage = two_stages().stages[0]
    d, T = stage.diffusion, stage.diffusion.T
    x0 = stage_images(toy_images(3, 8).images, 8)
    cond = stage.conditioning(torch.tensor([0, 1, 2]))
    model = lambda x, t: stage(x, t, cond)  # noqa: E731
    noise = SeededNoise([7, 8, 9])
    terms = {}
    for t in range(T, 0, -1):  # by hand, in the estimator's order
        tt = torch.full((3,), t)
        xt = d.q_sample(x0, tt, noise.randn(1, 8, 8))
        terms[t] = d.vlb_terms(model(xt, tt), x0, xt, tt).double()
    prior = d.prior_bpd(x0).double()
    for stop in (0, 1, 6, T - 1, T):
        got = diffusion_bound(model, d, x0, SeededNoise([7, 8, 9]), stop=stop)
        want = prior + sum((terms[t] for t in range(stop + 1, T + 1)), torch.zeros(3, dtype=torch.float64))
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="8-bit grid"):
        diffusion_bound(model, d, x0 + 0.001, SeededNoise([7, 8, 9]))


# --------------------------------------------------------------------------- a known density
SIGMA = 0.5
BINS = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 8-bit values in [-1, 1]


def bin_probs() -> torch.Tensor:
    """P(bin k) of x ~ N(0, SIGMA^2) rounded to 8 bits and clipped to [-1, 1] (edge bins take the tails)."""
    lo = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), BINS[1:] - 1 / 255])
    hi = torch.cat([BINS[:-1] + 1 / 255, torch.tensor([math.inf], dtype=torch.float64)])
    cdf = lambda z: 0.5 * (1 + torch.erf(z / (SIGMA * math.sqrt(2))))  # noqa: E731
    return cdf(hi) - cdf(lo)


def exact_model(d: GaussianDiffusion, p: torch.Tensor):
    """The exact denoiser of the discretised data (the posterior over the 256 bins, pixel by pixel):
    E[eps | x_t] and, with learned sigma, the variance logits that give each reverse step the true
    variance beta_tilde + c0^2 Var[x0 | x_t] (between beta_tilde and beta for data of variance <= 1)."""
    log_p, bins = p.log().float(), BINS.float()

    def model(x, t):
        ab = d.alpha_bar[t].float().view(-1, 1, 1, 1)
        w = torch.softmax(log_p - (x[..., None] - ab[..., None].sqrt() * bins) ** 2 / (2 * (1 - ab[..., None])), -1)
        m = (w * bins).sum(-1)  # E[x0 | x_t]
        eps = (x - ab.sqrt() * m) / (1 - ab).sqrt()
        if not d.learn_sigma:
            return eps
        ab_p = d.alpha_bar[t - 1].float().view(-1, 1, 1, 1)
        beta = 1 - ab / ab_p
        beta_tilde = beta * (1 - ab_p) / (1 - ab)
        var = beta_tilde + ab_p * beta ** 2 / (1 - ab) ** 2 * ((w * bins ** 2).sum(-1) - m ** 2)
        frac = torch.where(t.view(-1, 1, 1, 1) > 1, (var.log() - beta_tilde.log()) / (beta.log() - beta_tilde.log()),
                           torch.zeros_like(var))  # at t = 1 the decoder's variance is beta either way
        return torch.cat([eps, 2 * frac - 1], 1)
    return model


@pytest.mark.parametrize("T", [10, 40])
def test_bound_for_discretised_gaussian_data(T):
    """Data: N(0, SIGMA^2) rounded to 8 bits, whose true NLL is known bin by bin. With the exact mean and
    variance of every reverse step the bound is >= the true NLL and within 0.1 bits/dim of it at any T
    (for Gaussian data the true reverse steps are Gaussian; only the 8-bit decoder and L_T approximate).
    With the fixed posterior variance the first steps are overconfident: the bound stays more than half
    a bit/dim loose, and more steps do not close the gap."""
    p = bin_probs()
    g = torch.Generator().manual_seed(0)
    n, shape = 128, (1, 8, 8)
    idx = torch.multinomial(p, n * 64, replacement=True, generator=g).view(n, *shape)
    true_nll = -p[idx].log2().flatten(1).mean(1)  # bits/dim of each image under the data distribution
    gaps = {}
    for learn_sigma in (True, False):
        d = GaussianDiffusion(DiffusionConfig(steps=T, learn_sigma=learn_sigma))
        gap = diffusion_bound(exact_model(d, p), d, BINS[idx].float(), SeededNoise(range(n))) - true_nll
        gaps[learn_sigma] = (gap.mean().item(), gap.std().item() / math.sqrt(n))
    mean, se = gaps[True]
    assert -3 * se < mean < 0.1 and se < 0.025
    mean, se = gaps[False]
    assert mean > 0.5 and se < 0.05


# --------------------------------------------------------------------------- the cascade
def test_cascade_bound_is_the_sum_of_its_parts():
    """Truncated at s: the base's L_T and terms t > s, plus the SR stage's full bound conditioned on
    z_s ~ q(z_s | z0) (the base's forward process), in bits; the total per final-image dimension."""
    c, s = two_stages(), 5
    base, sr = c.stages
    data = toy_images(4, 16)
    seeds = [11, 12, 13, 14]
    got = cascade_bound(c, data, [0, s], "truncated", seed=11)
    z0, x0 = stage_images(data.images, 8), stage_images(data.images, 16)
    eps_z = SeededNoise([derive_seed(j, 1, 1) for j in seeds]).randn(1, 8, 8)
    z_s = base.diffusion.q_sample(z0, torch.full((4,), s), eps_z)
    cond = sr.conditioning(data.labels, z_s, torch.full((4,), float(s)), corrupt=False)
    want_sr = diffusion_bound(lambda x, t: sr(x, t, cond), sr.diffusion, x0,
                              SeededNoise([derive_seed(j, 1) for j in seeds])) * 256
    cond = base.conditioning(data.labels)
    want_base = diffusion_bound(lambda x, t: base(x, t, cond), base.diffusion, z0,
                                SeededNoise([derive_seed(j, 0) for j in seeds]), stop=s) * 64
    torch.testing.assert_close(got.stages[0].bits, want_base.double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.stages[1].bits, want_sr.double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.total_bits, want_base + want_sr, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.bpd, got.total_bits / 256)
    summary = got.summary()
    assert [st["dims"] for st in summary["stages"]] == [64, 256] and summary["total"]["dims"] == 256
    assert [st["terms"] for st in summary["stages"]] == [f"L_T + t={s + 1}..20", "L_T + t=1..12"]
    assert summary["total"]["bits"] == pytest.approx(sum(st["bits"] for st in summary["stages"]))
    assert summary["total"]["bpd"] == pytest.approx(summary["total"]["bits"] / 256)
    assert summary["estimator"] == "exact" and summary["n_images"] == 4


def test_levels_zero_and_positive():
    """s = 0: the base's full bound (decoder included) and the SR stage on the clean z0, in either
    mode. Non-truncated at s > 0: the base's full bound and the SR stage on the augmented z0, so it
    exceeds the truncated bound at the same s by exactly the base's terms t <= s."""
    c, s = two_stages(), 6
    data = toy_images(3, 16)
    tr0 = cascade_bound(c, data, [0, 0], "truncated")
    nt0 = cascade_bound(c, data, [0, 0], "non-truncated")
    torch.testing.assert_close(tr0.total_bits, nt0.total_bits)
    sr = c.stages[1]
    cond = sr.conditioning(data.labels, stage_images(data.images, 8), torch.zeros(3), corrupt=False)
    clean = diffusion_bound(lambda x, t: sr(x, t, cond), sr.diffusion, stage_images(data.images, 16),
                            SeededNoise([derive_seed(j, 1) for j in range(3)])) * 256
    torch.testing.assert_close(tr0.stages[1].bits, clean.double(), rtol=1e-5, atol=1e-4)

    tr = cascade_bound(c, data, [0, s], "truncated")
    nt = cascade_bound(c, data, [0, s], "non-truncated")
    assert tr.stages[0].stop == s and nt.stages[0].stop == 0 and tr0.stages[0].stop == 0
    torch.testing.assert_close(nt.stages[1].bits, tr.stages[1].bits)  # same z_s draw
    torch.testing.assert_close(nt.stages[0].bits, tr0.stages[0].bits)  # the full base bound
    base = c.stages[0]
    cond = base.conditioning(data.labels)
    z0 = stage_images(data.images, 8)
    noise = SeededNoise([derive_seed(j, 0) for j in range(3)])
    d = base.diffusion
    low = torch.zeros(3, dtype=torch.float64)
    for t in range(d.T, 0, -1):
        tt = torch.full((3,), t)
        xt = d.q_sample(z0, tt, noise.randn(1, 8, 8))
        if t <= s:
            low += d.vlb_terms(base(xt, tt, cond), z0, xt, tt).double() * 64
    torch.testing.assert_close(nt.total_bits - tr.total_bits, low, rtol=1e-5, atol=1e-3)


def test_truncated_bound_needs_the_lower_forward_process():
    data = toy_images(2, 16)
    c = two_stages(base_steps=20, aug_steps=40)
    with pytest.raises(CascadeError, match="forward-process state z_s.*retrain stage 1 with augment.schedule"):
        cascade_bound(c, data, [0, 5], "truncated", t_samples=1)
    cascade_bound(c, data, [0, 5], "non-truncated", t_samples=1)  # any process will do
    cascade_bound(c, data, [0, 0], "truncated", t_samples=1)  # s = 0: no z_s at all
    blur = two_stages(aug="blur")
    with pytest.raises(CascadeError, match="pass 0"):
        cascade_bound(blur, data, [0, 5], "non-truncated", t_samples=1)
    cascade_bound(blur, data, [0, 0], "truncated", t_samples=1)


# --------------------------------------------------------------------------- the command line
def save_run(stage: Stage, run) -> str:
    sd = stage.net.state_dict()
    ema = {k: v.clone() for k, v in sd.items()}
    save_checkpoint(checkpoint_path(run, 1), Checkpoint(config=stage.config, step=1, model=sd, ema=ema))
    return str(run)


def test_cli_nll(tmp_path, toy_npz, capsys):
    with pytest.raises(SystemExit) as e:
        main(["nll", "--help"])
    assert e.value.code == 0 and "--t-samples" in capsys.readouterr().out
    c = two_stages(classes=3)
    runs = [save_run(st, tmp_path / name) for st, name in zip(c.stages, ["base", "sr"])]
    out = tmp_path / "nll"
    argv = ["nll", "--stage", runs[0], "--stage", runs[1], "--level", "5", "--n", "6", "--reference", str(toy_npz),
            "--t-samples", "2", "--out", str(out), "--no-progress", "--batch-size", "4"]
    assert main(argv) == 0
    summary = json.loads((out / "nll.json").read_text())
    assert summary["n_images"] == 6 and summary["levels"] == [0, 5] and summary["mode"] == "truncated"
    assert summary["estimator"] == "monte-carlo" and summary["t_samples"] == 2
    assert summary["total"]["bpd"] == pytest.approx(sum(s["bits"] for s in summary["stages"]) / 256)
    assert summary["total"]["bpd_se"] > 0
    assert "| **total** |" in (out / "nll.md").read_text() and "**total**" in capsys.readouterr().out
    cfile = write_cascade_file(tmp_path / "cascade.json", runs, SamplingPlan.uniform(len(c.stages), levels=[0, 3]))
    assert main(["nll", "--cascade", str(cfile), "--n", "2", "--reference", str(toy_npz), "--t-samples", "1",
                 "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "nll.json").read_text())
    assert summary["levels"] == [0, 3] and summary["mode"] == "non-truncated" and summary["n_images"] == 2

    for extra, message in [(["--n", "99"], "holds 24"), (["--level", "0,5,5"], "--level needs one value"),
                           (["--level", "21"], "[0, 20]")]:
        bad = argv + extra
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("cdm: error:") and message in err, err
