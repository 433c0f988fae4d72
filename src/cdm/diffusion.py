"""Discrete-time Gaussian diffusion (DDPM / Improved DDPM), independent of any network.

Convention (the paper's): timesteps are integers ``t in {0, 1, ..., T}`` with ``alpha_bar[0] = 1``,
so ``q(x_0 | x_0)`` is the identity and ``t = 0`` means "clean". The reverse process runs on a
descending *time grid* ``T = tau_K > ... > tau_0 = s``; consecutive grid points are joined by the
exact posterior ``q(x_prev | x_t, x_0)`` of the forward process between them, which gives
timestep respacing (fewer sampling steps than ``T``) and truncation at ``s`` (stop the reverse
process early, for truncated conditioning augmentation) with one formula.

Every function takes a model *output* (what the network returned) and turns it into the
quantities of the paper through :meth:`GaussianDiffusion.split_output`; the network itself knows
nothing about diffusion.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import Tensor


class Schedule(str, enum.Enum):
    COSINE = "cosine"  # Nichol & Dhariwal 2021, eq. 17
    LINEAR = "linear"  # Ho et al. 2020, scaled to T steps


class Prediction(str, enum.Enum):
    EPS = "eps"  # the network predicts the noise epsilon (DDPM)
    V = "v"  # the network predicts v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)


@dataclass
class DiffusionConfig:
    steps: int = 1000  # T, the number of forward-process steps
    schedule: str = "cosine"  # Schedule
    prediction: str = "eps"  # Prediction
    learn_sigma: bool = False  # Improved DDPM: the network also outputs the variance interpolation v
    hybrid_lambda: float = 0.001  # weight of L_vlb in the hybrid loss (used when learn_sigma)
    # Added to log SNR(t) at every t > 0 (Hoogeboom et al. 2023, "simple diffusion", eq. 4):
    # > 0 keeps more signal at each t, < 0 adds noise (their resolution shift is 2 ln(64 / d)).
    logsnr_shift: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"diffusion.steps must be >= 1, got {self.steps}")
        for name, enum_ in (("schedule", Schedule), ("prediction", Prediction)):
            if getattr(self, name) not in {e.value for e in enum_}:
                raise ValueError(f"diffusion.{name} must be one of {', '.join(e.value for e in enum_)}, "
                                 f"got {getattr(self, name)!r}")
        if not self.hybrid_lambda >= 0:
            raise ValueError(f"diffusion.hybrid_lambda must be >= 0, got {self.hybrid_lambda}")
        if not math.isfinite(self.logsnr_shift):
            raise ValueError(f"diffusion.logsnr_shift must be a finite number, got {self.logsnr_shift}")


def alpha_bar_schedule(schedule: str | Schedule, steps: int, logsnr_shift: float = 0.0) -> Tensor:
    """``alpha_bar[t]`` for ``t = 0..T`` (float64, shape ``[T + 1]``), with ``alpha_bar[0] = 1``.

    ``logsnr_shift`` moves every ``t > 0`` along the log-SNR axis: ``log SNR'(t) = log SNR(t) +
    shift``, i.e. ``alpha_bar' = sigmoid(logit(alpha_bar) + shift)``."""
    schedule = Schedule(schedule)
    if schedule is Schedule.COSINE:
        # abar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi / 2), betas clipped at 0.999
        s = 0.008
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    else:
        scale = 1000.0 / steps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64).clamp(max=0.999)
    abar = torch.cumprod(1 - betas, 0)
    if logsnr_shift:
        abar = torch.sigmoid(torch.logit(abar) + logsnr_shift)
    return torch.cat([torch.ones(1, dtype=torch.float64), abar])


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """Per-example values ``[N]`` shaped to broadcast against ``x`` ``[N, ...]``, in x's dtype."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) of 8-bit data scaled to [-1, 1] under a Gaussian discretised to 256 bins
    (Ho et al. 2020, eq. 13), elementwise, in nats."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min,
                                   torch.log(cdf_delta.clamp(min=1e-12))))


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension: ``[N, ...] -> [N]``."""
    return x.flatten(1).mean(1)


class GaussianDiffusion:
    """The forward process q, its posteriors, and the model's reverse step p.

    Holds ``alpha_bar`` (float64, ``[T + 1]``). All ``t`` arguments are integer tensors ``[N]``
    with values in ``0..T``.
    """

    def __init__(self, config: DiffusionConfig):
        self.config = config
        self.T = config.steps
        self.prediction = Prediction(config.prediction)
        self.learn_sigma = config.learn_sigma
        self.alpha_bar = alpha_bar_schedule(config.schedule, config.steps, config.logsnr_shift)

    # ----------------------------------------------------------------- forward process
    def abar(self, t: Tensor) -> Tensor:
        """``alpha_bar_t`` for integer ``t`` ``[N]`` (float64 ``[N]``)."""
        if (t < 0).any() or (t > self.T).any():
            raise ValueError(f"timesteps must lie in [0, {self.T}], got range "
                             f"[{int(t.min())}, {int(t.max())}]")
        return self.alpha_bar.to(t.device)[t.long()]

    def snr(self, t: Tensor) -> Tensor:
        """``SNR_t = alpha_bar_t / (1 - alpha_bar_t)`` for integer ``t`` ``[N]`` (float64 ``[N]``; inf at 0)."""
        ab = self.abar(t)
        return ab / (1 - ab)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw ``x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I)``; ``x0, noise: [N, C, H, W]``."""
        ab = self.abar(t)
        return _bcast(ab.sqrt(), x0) * x0 + _bcast((1 - ab).sqrt(), x0) * noise

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor, t_prev: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of ``q(x_{t_prev} | x_t, x_0)`` for any ``0 <= t_prev < t``
        (the one-step posterior of DDPM eq. 7 when ``t_prev = t - 1``).

        With ``a = abar_t / abar_prev``: mean = sqrt(abar_prev)(1 - a)/(1 - abar_t) x0
        + sqrt(a)(1 - abar_prev)/(1 - abar_t) x_t, var = (1 - a)(1 - abar_prev)/(1 - abar_t).
        """
        ab_t, ab_p = self.abar(t), self.abar(t_prev)
        a = ab_t / ab_p
        c0 = ab_p.sqrt() * (1 - a) / (1 - ab_t)
        ct = a.sqrt() * (1 - ab_p) / (1 - ab_t)
        var = (1 - a) * (1 - ab_p) / (1 - ab_t)
        # At t_prev = 0 the posterior is a point mass; like DDPM's decoder we give that last step
        # the variance beta = 1 - a instead, so that its log (and the decoder likelihood) is finite.
        var = torch.where(t_prev == 0, 1 - a, var)
        return _bcast(c0, x0) * x0 + _bcast(ct, xt) * xt, _bcast(torch.log(var), xt).expand_as(xt)

    # ----------------------------------------------------------------- model output
    def split_output(self, out: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
        """Split a network output ``[N, C or 2C, H, W]`` into (prediction, variance logits or None)."""
        if self.learn_sigma:
            if out.shape[1] != 2 * channels:
                raise ValueError(f"learn_sigma needs a network with 2*C={2 * channels} output "
                                 f"channels, got {out.shape[1]}")
            return out[:, :channels], out[:, channels:]
        if out.shape[1] != channels:
            raise ValueError(f"network returned {out.shape[1]} channels, expected {channels}")
        return out, None

    def predict_x0_eps(self, pred: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from the network's prediction at ``x_t``."""
        ab = self.abar(t)
        sa, s1 = _bcast(ab.sqrt(), xt), _bcast((1 - ab).sqrt(), xt)
        if self.prediction is Prediction.EPS:
            eps = pred
            x0 = (xt - s1 * eps) / sa
        else:  # v: x0 = sqrt(abar) x_t - sqrt(1-abar) v; eps = sqrt(1-abar) x_t + sqrt(abar) v
            x0 = sa * xt - s1 * pred
            eps = s1 * xt + sa * pred
        return x0, eps

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network is trained to predict at ``x_t = q_sample(x0, t, noise)``."""
        if self.prediction is Prediction.EPS:
            return noise
        ab = self.abar(t)
        return _bcast(ab.sqrt(), x0) * noise - _bcast((1 - ab).sqrt(), x0) * x0

    def p_mean_logvar(self, out: Tensor, xt: Tensor, t: Tensor, t_prev: Tensor,
                      clip_x0: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, log-variance of ``p(x_{t_prev} | x_t)`` and the x0 estimate.

        The mean is the posterior mean at the predicted x0. The variance is the posterior variance
        (beta tilde), or, with learned sigma, Improved DDPM's interpolation (eq. 15) between
        ``log beta`` and ``log beta tilde`` of the step ``t -> t_prev``.
        """
        pred, var_logits = self.split_output(out, xt.shape[1])
        x0, _ = self.predict_x0_eps(pred, xt, t)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        mean, post_logvar = self.q_posterior(x0, xt, t, t_prev)
        if var_logits is None:
            return mean, post_logvar, x0
        ab_t, ab_p = self.abar(t), self.abar(t_prev)
        log_beta = _bcast(torch.log(1 - ab_t / ab_p), xt)
        frac = (var_logits.float() + 1) / 2
        logvar = frac * log_beta + (1 - frac) * post_logvar
        return mean, logvar, x0

    # ----------------------------------------------------------------- losses
    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Training timesteps ``t ~ U{1..T}`` ``[n]``."""
        return torch.randint(1, self.T + 1, (n,), generator=generator, device=device)

    def vlb_terms(self, out: Tensor, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Per-example L_{t-1} of the variational bound, in bits per dimension ``[N]``:
        KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 1 and the discretised decoder NLL
        -log p(x_0|x_1) for t = 1."""
        t_prev = t - 1
        true_mean, true_logvar = self.q_posterior(x0, xt, t, t_prev)
        mean, logvar, _ = self.p_mean_logvar(out, xt, t, t_prev, clip_x0=False)
        kl = mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)) / math.log(2.0)
        return torch.where(t == 1, nll, kl)

    def prior_bpd(self, x0: Tensor) -> Tensor:
        """L_T = KL(q(x_T|x_0) || N(0, I)) in bits per dimension ``[N]``."""
        t = torch.full((x0.shape[0],), self.T, device=x0.device, dtype=torch.long)
        ab = _bcast(self.abar(t), x0)
        mean, logvar = ab.sqrt() * x0, torch.log(1 - ab).expand_as(x0)
        return mean_flat(normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0))) / math.log(2.0)

    def training_loss(self, out: Tensor, x0: Tensor, xt: Tensor, t: Tensor, noise: Tensor,
                      weight: Tensor | None = None) -> Tensor:
        """Per-example loss ``[N]``: the simple loss ``||target - pred||^2`` (DDPM), times ``weight``
        ``[N]`` if given (:func:`cdm.recipe.loss_weight`), plus ``hybrid_lambda * L_vlb`` when the
        variance is learned (Improved DDPM's hybrid loss, with the mean's gradient stopped in the
        L_vlb term so it only trains the variance)."""
        pred, var_logits = self.split_output(out, x0.shape[1])
        loss = mean_flat((pred.float() - self.target(x0, noise, t).float()) ** 2)
        if weight is not None:
            loss = loss * weight.to(loss)
        if var_logits is not None:
            frozen = torch.cat([pred.detach(), var_logits], dim=1).float()
            # L_vlb scaled by T: the bound sums T terms and t is sampled uniformly.
            loss = loss + self.config.hybrid_lambda * self.T * self.vlb_terms(frozen, x0.float(), xt.float(), t)
        return loss


class Spacing(str, enum.Enum):
    UNIFORM = "uniform"  # evenly spaced in t (Ho et al. 2020; Nichol & Dhariwal 2021 respacing)
    QUADRATIC = "quadratic"  # t - stop grows quadratically (Song et al. 2021, DDIM, app. D.2)
    LOGSNR = "logsnr"  # evenly spaced in log-SNR lambda_t (Lu et al. 2022, DPM-Solver's default)
    EDM = "edm"  # sigma_t^(1/rho) evenly spaced, rho = 7 (Karras et al. 2022, eq. 5)


EDM_RHO = 7.0  # Karras et al. 2022, eq. 5: rho = 7 balances the steps' errors at high and low noise
GRID_SIGMA_MAX = 80.0  # EDM's sigma_max: the logsnr and edm grids are spaced from here (a cosine schedule's
# sigma_T is ~2e4; spacing from there would spend most steps where the sample is pure noise)


def log_snr(alpha_bar: Tensor) -> Tensor:
    """``lambda_t = log(alpha_t / sigma_t) = 0.5 log(abar_t / (1 - abar_t))``, elementwise
    (``+inf`` where ``abar = 1``, i.e. at ``t = 0``)."""
    return 0.5 * (torch.log(alpha_bar) - torch.log1p(-alpha_bar))


def time_grid(T: int, steps: int, stop: int = 0, spacing: str | Spacing = "uniform",
              alpha_bar: Tensor | None = None, start: int | None = None) -> list[int]:
    """A descending grid of distinct integer times from ``T`` down to ``stop``: the respaced
    reverse process runs ``grid[i] -> grid[i + 1]``. ``stop > 0`` truncates it at ``stop``;
    ``start < T`` begins it at ``start`` instead of ``T`` (an SR stage started from its noised
    input, ``StagePlan.start``): the grid is then the one this function makes for ``T = start``.

    ``spacing="uniform"``: ``steps + 1`` evenly spaced times (fewer if the range is short).
    ``spacing="quadratic"``: ``t_i = stop + (T - stop) (1 - i/steps)^2``, DDIM's quadratic grid
    (Song et al. 2021, app. D.2, used there for CIFAR-10) made to start at ``T``. It puts the steps
    where the image is nearly clean and takes large steps through the noisy end.
    ``spacing="logsnr"``: evenly spaced in ``lambda_t`` (DPM-Solver's grid) and ``spacing="edm"``:
    evenly spaced in ``sigma_t^(1/7)``, ``sigma_t = sqrt((1 - abar_t) / abar_t)`` (EDM's grid) —
    both need the schedule, ``alpha_bar`` ``[T + 1]``. They are spaced from ``sigma = 80`` (EDM's
    ``sigma_max``; a cosine schedule's ``sigma_T`` is ~2e4, and spacing from there would spend most
    steps on pure noise) down to ``t = 1`` with ``steps`` points, their first point moved to ``T``,
    and end with the step ``1 -> 0`` (lambda and sigma are infinite and zero at ``t = 0``); a
    truncated grid ends at ``stop`` instead, with ``steps + 1`` points. Which grid suits which
    stage is measured, not assumed (docs/BENCHMARKS.md). Every non-uniform grid is rounded to
    integer times, and times that round onto each other are pushed apart, so it has exactly
    ``min(steps, T - stop) + 1`` points.
    """
    if start is not None:
        if not 0 < start <= T:
            raise ValueError(f"the grid's start must lie in [1, {T}], got {start}")
        T = start  # everything below spans [stop, start]; alpha_bar keeps its T + 1 entries
    if not 0 <= stop < T:
        raise ValueError(f"truncation level must lie in [0, {T - 1}], got {stop}")
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    spacing = Spacing(spacing)
    steps = min(steps, T - stop)
    if spacing is Spacing.UNIFORM:
        pts = torch.linspace(T, stop, steps + 1, dtype=torch.float64).round().long().tolist()
        out: list[int] = []
        for p in pts:
            if not out or p < out[-1]:
                out.append(int(p))
        return out
    if spacing is Spacing.QUADRATIC:
        u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)  # ascending, from stop up to T
        return _distinct_descending((stop + (T - stop) * u ** 2).round().long().tolist(), T, stop)
    if alpha_bar is None:
        raise ValueError(f"the {spacing.value!r} grid needs the noise schedule (alpha_bar)")
    lo = max(stop, 1)  # the grid's noisiest-to-cleanest span with finite lambda and sigma
    n = steps if stop == 0 else steps + 1  # a full run appends the step 1 -> 0
    lam = log_snr(alpha_bar.double())  # [T + 1], descending in t
    noisy = max(lam[T].item(), -math.log(GRID_SIGMA_MAX))
    if spacing is Spacing.LOGSNR:
        target = torch.linspace(noisy, lam[lo].item(), n, dtype=torch.float64)
    else:  # EDM: sigma = exp(-lambda)
        a, b = math.exp(-noisy / EDM_RHO), math.exp(-lam[lo].item() / EDM_RHO)
        target = -EDM_RHO * torch.log(torch.linspace(a, b, n, dtype=torch.float64))
    # each target lambda to the integer time in [lo, T] whose lambda is nearest; the first is T
    times = ((lam[lo:T + 1].view(1, -1) - target.view(-1, 1)).abs().argmin(dim=1) + lo).tolist()
    times[0] = T
    times = times[::-1] + ([0] if stop == 0 else [])  # ascending
    return _distinct_descending(sorted(times), T, stop)


def _distinct_descending(up: list[int], T: int, stop: int) -> list[int]:
    """``up`` (ascending integer times from ``stop`` to ``T``, possibly repeated) made strictly
    increasing by pushing repeats up one step (then down, if they overshot ``T``), returned descending."""
    out: list[int] = []
    for p in up:
        out.append(p if not out or p > out[-1] else out[-1] + 1)
    out[0], out[-1] = stop, max(out[-1], T)
    if out[-1] > T:  # pushed past T: push down from the top instead
        out[-1] = T
        for i in range(len(out) - 2, -1, -1):
            out[i] = min(out[i], out[i + 1] - 1)
    return out[::-1]
