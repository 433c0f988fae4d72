"""Classifier-free guidance and thresholding (cdm.guidance): w = 0 is the unguided sampler bit for
bit; the guided prediction is the formula, in one batched forward; the interval switches guidance
at the right steps; dynamic thresholding is Imagen's."""

from __future__ import annotations

import pytest
import torch

from cdm.cascade import Cascade, CascadeError, SamplingPlan, StagePlan, sample_stage
from cdm.diffusion import DiffusionConfig, GaussianDiffusion
from cdm.guidance import dynamic_threshold, guided_model
from cdm.stage import Stage

from conftest import tiny_config


def toy_net(calls: list):
    """out = x * (1 + label embedding's mean) + t/1000: depends on the conditioning, records batch sizes."""
    def net(x, t, cond):
        calls.append((x.shape[0], int(t[0])))
        scale = cond["cond_emb"].mean(1).view(-1, 1, 1, 1)
        return x * (1 + scale) + t.view(-1, 1, 1, 1).float() / 1000
    return net


def test_the_guided_prediction_is_the_formula_in_one_batched_forward():
    d = GaussianDiffusion(DiffusionConfig(steps=100))
    calls = []
    x, t = torch.randn(3, 1, 4, 4), torch.full((3,), 40)
    cond, uncond = {"cond_emb": torch.full((3, 8), 0.5)}, {"cond_emb": torch.full((3, 8), -0.25)}
    net = toy_net(calls)
    w = 2.5
    got = guided_model(net, cond, uncond, d, w)(x, t)
    c, u = net(x, t, cond), net(x, t, uncond)
    torch.testing.assert_close(got, (1 + w) * c - w * u)
    assert calls[0] == (6, 40)  # both passes as one batch of 2N


def test_a_learned_variance_keeps_the_conditional_pass():
    d = GaussianDiffusion(DiffusionConfig(steps=100))

    def net(x, t, cond):  # mean channel, then a variance channel
        c = cond["cond_emb"][:, :1, None, None]
        return torch.cat([x + c, (3 + c).expand_as(x)], 1)

    x, t = torch.zeros(2, 1, 2, 2), torch.full((2,), 10)
    cond, uncond = {"cond_emb": torch.ones(2, 4)}, {"cond_emb": torch.zeros(2, 4)}
    out = guided_model(net, cond, uncond, d, 1.0)(x, t)
    assert torch.all(out[:, 0] == 2.0) and torch.all(out[:, 1] == 4.0)  # (1+1)*1 - 1*0; the cond variance


def test_the_interval_switches_guidance_at_the_right_steps():
    d = GaussianDiffusion(DiffusionConfig(steps=100))
    calls = []
    model = guided_model(toy_net(calls), {"cond_emb": torch.ones(2, 4)}, {"cond_emb": torch.zeros(2, 4)}, d, 1.0,
                         interval=(0.2, 0.6))
    for t in (90, 60, 40, 20, 10):
        model(torch.zeros(2, 1, 2, 2), torch.full((2,), t))
    assert calls == [(2, 90), (4, 60), (4, 40), (4, 20), (2, 10)]  # guided (2N) only where 0.2 <= t/T <= 0.6


def test_zero_weight_is_the_unguided_sampler_bit_for_bit():
    torch.manual_seed(0)
    stage = Stage(tiny_config(resolution=8, lowres=4, aug="gaussian", p_uncond=0.1)).to("cpu")
    with torch.no_grad():  # an untrained network ignores its label (zero-initialised embeddings): make it see it
        for p in stage.net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    stage.net.eval()
    labels, seeds, z = torch.tensor([0, 1, 2]), [5, 6, 7], torch.rand(3, 1, 4, 4) * 2 - 1
    for sampler in ("ancestral", "ddim", "dpmpp-2m", "dpmpp-2m-sde"):
        plain = StagePlan(steps=4, level=10, sampler=sampler)
        a = sample_stage(stage, 1, labels, seeds, plain, lowres=z)
        b = sample_stage(stage, 1, labels, seeds, StagePlan(steps=4, level=10, sampler=sampler, guidance=0.0,
                                                           guidance_interval=[0.3, 0.7]), lowres=z)
        assert all(torch.equal(p, q) for p, q in zip(a, b))
        g = sample_stage(stage, 1, labels, seeds, StagePlan(steps=4, level=10, sampler=sampler, guidance=3.0),
                         lowres=z)
        assert not torch.equal(g[0], a[0]) and torch.isfinite(g[0]).all()


def test_guidance_through_a_truncated_cascade_keeps_per_sample_seeding():
    torch.manual_seed(0)
    stages = [Stage(tiny_config(resolution=4, name="base", p_uncond=0.1)),
              Stage(tiny_config(resolution=8, lowres=4, aug="gaussian", p_uncond=0.1))]
    for s in stages:
        s.net.eval()
    cascade = Cascade(stages)
    plan = SamplingPlan.uniform(2, steps=3, levels=[0, 10], mode="truncated", sampler="ddim").override(
        guidance=[1.5, 2.0])
    both = cascade.sample(torch.tensor([0, 1, 2]), [1, 2, 3], plan)
    one = cascade.sample(torch.tensor([1]), [2], plan)  # sample 1 alone: the same image
    torch.testing.assert_close(both.images[-1][1:2], one.images[-1])
    assert [st.guidance for st in plan.stages] == [1.5, 2.0]


def test_guidance_is_refused_where_it_means_nothing_and_warns_without_label_dropout():
    stage = Stage(tiny_config(resolution=8, classes=0))
    with pytest.raises(CascadeError, match="unconditional"):
        sample_stage(stage, 0, torch.tensor([0]), [0], StagePlan(steps=2, guidance=1.0))
    dropped = Stage(tiny_config(resolution=8, p_uncond=0.0))
    with pytest.warns(UserWarning, match="without label dropout"):
        sample_stage(dropped, 0, torch.tensor([0]), [0], StagePlan(steps=2, guidance=1.0))
    for bad, msg in [(dict(guidance=-1.0), "guidance weight"), (dict(guidance_interval=[0.8, 0.2]), "interval"),
                     (dict(threshold="soft"), "unknown threshold")]:
        with pytest.raises(CascadeError, match=msg):
            StagePlan(**bad).check()


def test_dynamic_thresholding_is_imagens():
    x0 = torch.tensor([[0.5, -0.5, 0.25, 0.0], [3.0, -2.0, 1.0, 0.5]]).view(2, 1, 2, 2)
    got = dynamic_threshold(x0, percentile=1.0)  # q = max |x0| per sample, at least 1
    torch.testing.assert_close(got[0], x0[0])  # already inside [-1, 1]: unchanged
    torch.testing.assert_close(got[1], x0[1] / 3.0)
    d = GaussianDiffusion(DiffusionConfig(steps=100))
    x, t = torch.randn(2, 1, 4, 4) * 5, torch.full((2,), 50)
    out = guided_model(lambda x_, t_, c: x_ * 2, {}, None, d, 0.0, threshold="dynamic")(x, t)
    x0, _ = d.predict_x0_eps(out, x, t)
    assert x0.abs().max() <= 1 + 1e-5 and out.dtype == x.dtype  # the sampler's dtype is kept


def test_the_plan_carries_guidance_per_stage_and_from_the_command_line():
    from cdm.cli import build_parser

    a = build_parser().parse_args(["sample", "--stage", "b", "--stage", "s", "--out", "o", "--guidance", "0,2.5",
                                   "--guidance-interval", "0.2,0.8", "--threshold", "dynamic"])
    plan = SamplingPlan.uniform(2).override(**{k: getattr(a, k) for k in a.plan_flags})
    assert [st.guidance for st in plan.stages] == [0.0, 2.5]
    assert all(st.guidance_interval == [0.2, 0.8] and st.threshold == "dynamic" for st in plan.stages)
    assert [st.guidance for st in SamplingPlan.uniform(3).override(guidance=[1.0]).stages] == [1.0] * 3
    with pytest.raises(CascadeError, match="guidance needs 1 or 2 values"):
        SamplingPlan.uniform(2).override(guidance=[1.0, 2.0, 3.0])


def guided_pair(perturbed: int) -> Cascade:
    """A tiny base + SR cascade trained with label dropout, stage ``perturbed``'s weights nudged off
    their initialisation (so that its conditional and unconditional predictions differ)."""
    torch.manual_seed(0)
    stages = [Stage(tiny_config(resolution=4, name="base", p_uncond=0.1)),
              Stage(tiny_config(resolution=8, lowres=4, aug="gaussian", p_uncond=0.1))]
    with torch.no_grad():
        for p in stages[perturbed].net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    for s in stages:
        s.net.eval()
    return Cascade(stages)


def test_the_sweep_searches_level_and_weight_jointly_and_old_points_keep_their_identity(tmp_path):
    from cdm.eval.ledger import Judge
    from cdm.eval.report import heatmap_svg
    from cdm.eval.search import decide as _decide
    from cdm.eval.sweep import SweepConfig, run_sweep, weight

    cascade, plan = guided_pair(perturbed=1), SamplingPlan.uniform(2, steps=2)
    judge = Judge(lambda x, labels: float(x.abs().mean()), "m")
    plain = run_sweep(cascade, plan, SweepConfig(levels=[0, 10], n=4, modes=["non-truncated"]), judge, tmp_path,
                      progress=lambda s: None)
    joint = run_sweep(cascade, plan, SweepConfig(levels=[0, 10], n=4, modes=["non-truncated"], weights=[0.0, 2.0]),
                      judge, tmp_path, progress=lambda s: None)
    assert sorted((r["level"], weight(r)) for r in joint) == [(0, 0.0), (0, 2.0), (10, 0.0), (10, 2.0)]
    assert all("guidance" not in r for r in plain)  # w = 0 points are the unguided ones, scored once
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
    by = {(r["level"], weight(r)): r["value"] for r in joint}
    assert by[(10, 2.0)] != by[(10, 0.0)]
    rows = [{**r, "metrics": {"m": r["value"], "m_se": 0.0}} for r in joint]
    best, cur, write, why = _decide(rows, "m", "non-truncated", 0, 0.0)
    assert cur is not None and write == (best is not cur)  # no noise here: any gain wins
    assert (f"w = {weight(best):g}" in why) == (write and weight(best) != 0)
    assert "<svg" in heatmap_svg({(s, w): v for (s, w), v in by.items()}, "s", "w")


def test_the_base_stage_sweep_searches_the_guidance_weight_alone(tmp_path):
    from cdm.eval.ledger import Judge
    from cdm.eval.search import decide as _decide
    from cdm.eval.sweep import SweepConfig, describe, run_sweep, weight

    cascade, plan = guided_pair(perturbed=0), SamplingPlan.uniform(2, steps=2)
    seen = []
    judge = Judge(lambda x, labels: seen.append(x.shape) or float(x.abs().mean()), "m")
    rows = run_sweep(cascade, plan, SweepConfig(stage=0, n=4, weights=[0.0, 2.0]), judge, tmp_path,
                     progress=lambda s: None)
    # one point per weight, at the base's own resolution, whatever the levels and modes were
    assert sorted(weight(r) for r in rows) == [0.0, 2.0] and seen == [(4, 1, 4, 4)] * 2
    assert {(r["stage"], r["level"], r["mode"]) for r in rows} == {(0, 0, plan.mode)}
    unguided = cascade.sample_stage(0, torch.arange(4) % max(cascade.num_classes, 1), list(range(4)), plan.stages[0])[0].clamp(-1, 1)
    by = {weight(r): r["value"] for r in rows}
    assert by[0.0] == pytest.approx(float(unguided.abs().mean()))  # w = 0 is the plain base stage
    assert by[2.0] != by[0.0]
    best, cur, write, why = _decide([{**r, "metrics": {"m_se": 0.0}} for r in rows], "m", plan.mode, 0, 0.0)
    assert describe(best).startswith("w = ") and "s =" not in why
    with pytest.raises(CascadeError, match="guidance weight"):
        run_sweep(cascade, plan, SweepConfig(stage=0, n=4), judge, tmp_path, progress=lambda s: None)
    with pytest.raises(CascadeError, match="low-resolution input"):
        run_sweep(cascade, plan, SweepConfig(stage=0, n=4, weights=[1.0], conditioning="ground-truth"), judge,
                  tmp_path, progress=lambda s: None)
