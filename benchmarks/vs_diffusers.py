"""Training images/s of a cdm stage against Hugging Face diffusers' UNet2DModel of matched shape.

For each preset, diffusers' ``UNet2DModel`` is built from a config (random init, nothing is
downloaded) to match the stage's network: ``block_out_channels = base_channels * channel_mult``,
``layers_per_block = num_res_blocks``, ``AttnDownBlock2D``/``AttnUpBlock2D`` at the feature-map
resolutions in ``attention_resolutions`` (and attention in the middle block, as cdm),
``attention_head_dim = head_channels``, scale-shift time conditioning (cdm's ResBlock),
``num_class_embeds = num_classes + 1`` (cdm's extra "no class" label), the same dropout, and the
one GroupNorm group count that agrees with cdm's per-layer choice most often. An SR stage's
diffusers model gets ``in_channels = 2``: x_t concatenated with the bilinearly upsampled
(conditioning-augmented) low-resolution image, as cdm's network sees it. cdm's SR network also
embeds the augmentation level s; diffusers' has no such input (the parameter counts below
differ by that embedding).

Both sides run the same training step on the same synthetic batch: times, noise and
augmentation levels drawn from one seeded generator, x_t from cdm's ``q_sample``, the ε-prediction
MSE, backward, AdamW. For cdm it is :func:`cdm.train.training_step_loss`, exactly as
``benchmarks/train_precision.py`` runs it. All modes of a preset run side by side with
interleaved repeats:

- cdm: fp32, and its default (the preset's ``train.precision``: bf16 autocast);
- diffusers: fp32 (its default), bf16 autocast, bf16 autocast + channels_last.

Targets (issue "Speed"): cdm's default ≥ 2× diffusers' default and ≥ 2× diffusers' fastest mode,
and cdm ≥ 1× diffusers at equal precision (fp32).

Needs diffusers (not a test dependency). Install it after torch, so that pip keeps torch:

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/vs_diffusers.py --out docs/bench/vs_diffusers.json
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from _common import (PRESETS, SyntheticBatch, TrainStep, cdm_train_step, facts_line, fmt, interleaved_rates,
                     load_average, machine_facts, optimizer_step, print_table, resolved_config, summary, write_json)
from cdm.augment import ConditioningAugmentation
from cdm.config import StageConfig
from cdm.diffusion import GaussianDiffusion
from cdm.flops import train_flops_per_image
from cdm.stage import Stage, autocast
from cdm.unet import UNet

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a config-built model needs no hub; never download
try:
    import diffusers
    from diffusers import UNet2DModel
except ImportError:
    sys.exit("benchmarks/vs_diffusers.py needs diffusers, which cdm does not install by default.\n"
             "Install it into the venv after torch (pip then keeps the installed torch):\n"
             "    .venv/bin/pip install -e '.[bench]'")

DIFFUSERS_MODES = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16+channels_last": ("bf16", True)}


# ----------------------------------------------------------------------------- the matched model
def cdm_norm_groups(net: nn.Module) -> list[tuple[int, int]]:
    """(channels, groups) of every GroupNorm of a cdm network."""
    return [(m.num_channels, m.num_groups) for m in net.modules() if isinstance(m, nn.GroupNorm)]


def matched_groups(net: UNet) -> int:
    """diffusers takes one group count for all its GroupNorms; cdm picks one per layer. Take the
    count that divides every normalised width and equals cdm's choice on the most layers."""
    norms = cdm_norm_groups(net)
    ok = [g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c, _ in norms)]
    return max(ok, key=lambda g: (sum(cg == g for _, cg in norms), g))


def diffusers_config(cfg: StageConfig, groups: int) -> dict:
    """UNet2DModel's config matching the stage's network (see the module docstring)."""
    u = cfg.unet
    resolutions = [cfg.resolution // 2 ** i for i in range(len(u.channel_mult))]
    attn = [r in u.attention_resolutions for r in resolutions]
    return {
        "sample_size": cfg.resolution,
        "in_channels": u.in_channels + u.lowres_channels,
        "out_channels": u.out_channels,
        "block_out_channels": tuple(u.base_channels * m for m in u.channel_mult),
        "layers_per_block": u.num_res_blocks,
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        "attention_head_dim": u.head_channels,
        "norm_num_groups": groups,
        "attn_norm_num_groups": groups,  # else the mid-block attention has no GroupNorm under scale_shift
        "resnet_time_scale_shift": "scale_shift",
        "num_class_embeds": u.num_classes + 1 if u.num_classes else None,
        "dropout": u.dropout,
    }


def build_diffusers(cfg: StageConfig, groups: int) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**diffusers_config(cfg, groups))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def diffusers_train_step(cfg: StageConfig, groups: int, precision: str, channels_last: bool,
                         device: str = "cpu") -> TrainStep:
    """The training step of :func:`cdm.train.training_step_loss` with diffusers' network: the same
    random draws in the same order (from a CPU generator, moved to ``device`` as cdm's are), the
    same augmentation, upsampling, x_t and loss."""
    model = build_diffusers(cfg, groups).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    diffusion, aug = GaussianDiffusion(cfg.diffusion), ConditioningAugmentation(cfg.augment)
    batch = SyntheticBatch.for_config(cfg, device=device)
    g = torch.Generator().manual_seed(0)
    n, res = cfg.train.batch_size, cfg.resolution
    labels = batch.labels if cfg.unet.num_classes else None

    def loss() -> torch.Tensor:
        if cfg.is_super_resolution:
            levels = aug.draw_levels(n, g).to(device)
            z = aug.apply(batch.z0, levels, torch.randn(batch.z0.shape, generator=g).to(device))
            lowres_up = F.interpolate(z, size=(res, res), mode=cfg.unet.lowres_upsample, align_corners=False)
        t = diffusion.sample_t(n, g).to(device)
        eps = torch.randn(batch.x0.shape, generator=g).to(device)
        x = diffusion.q_sample(batch.x0, t, eps)
        if cfg.is_super_resolution:
            x = torch.cat([x, lowres_up], dim=1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, precision):
            out = model(x, t, class_labels=labels, return_dict=False)[0]
        return ((out.float() - eps) ** 2).flatten(1).mean(1).mean()

    return TrainStep(optimizer_step(model, loss), n)


def diffusers_train_flops_per_image(cfg: StageConfig, model: nn.Module) -> int:
    """FLOPs of one training example through diffusers' network (as :mod:`cdm.flops` counts cdm's).

    Counted with the math attention kernel: FlopCounterMode does not count the CPU flash-attention
    kernel that diffusers' attention otherwise dispatches to (cdm's attention takes the math path)."""
    c = cfg.unet.in_channels + cfg.unet.lowres_channels
    x = torch.zeros(1, c, cfg.resolution, cfg.resolution)
    labels = torch.zeros(1, dtype=torch.long) if cfg.unet.num_classes else None
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(x, torch.full((1,), 500), class_labels=labels, return_dict=False)[0].sum().backward()
    model.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


# ----------------------------------------------------------------------------- one preset
def compare(preset: str, steps: int, repeats: int, warmup: int, overrides: list[str], device: str) -> dict:
    cfg = resolved_config(preset, overrides)
    default = cfg.train.precision
    cdm_net = Stage(cfg).net
    groups = matched_groups(cdm_net)
    cases: dict[str, TrainStep] = {"cdm fp32": cdm_train_step(preset, "fp32", False, overrides, device)}
    cases[f"cdm {default} (default)"] = cdm_train_step(preset, default, cfg.train.channels_last, overrides, device)
    for mode, (prec, cl) in DIFFUSERS_MODES.items():
        cases[f"diffusers {mode}"] = diffusers_train_step(cfg, groups, prec, cl, device)
    rates = interleaved_rates({k: (s.step, s.batch_size) for k, s in cases.items()}, steps, repeats, warmup)
    stats = {k: summary(v) for k, v in rates.items()}

    dnet = build_diffusers(cfg, groups)
    n_cdm, n_diff = param_count(cdm_net), param_count(dnet)
    level_params = param_count(cdm_net.level_embed) if cdm_net.level_embed is not None else 0
    mismatched = sum(cg != groups for _, cg in cdm_norm_groups(cdm_net))
    diff_modes = [f"diffusers {m}" for m in DIFFUSERS_MODES]
    fastest = max(diff_modes, key=lambda k: stats[k]["median"])
    med = {k: s["median"] for k, s in stats.items()}
    cdm_default = f"cdm {default} (default)"
    targets = [
        ("equal precision: cdm fp32 / diffusers fp32", med["cdm fp32"] / med["diffusers fp32"], 1.0),
        (f"default modes: cdm {default} / diffusers fp32", med[cdm_default] / med["diffusers fp32"], 2.0),
        (f"fastest modes: cdm {default} / {fastest}", med[cdm_default] / med[fastest], 2.0),
    ]
    return {
        "preset": preset, "overrides": overrides, "device": device, "batch_size": cfg.train.batch_size,
        "resolution": cfg.resolution,
        "img_per_s": stats, "diffusers_fastest_mode": fastest,
        "targets": [{"comparison": c, "ratio": r, "target": t, "pass": r >= t} for c, r, t in targets],
        "params": {"cdm": n_cdm, "diffusers": n_diff, "difference_pct": 100 * (n_cdm - n_diff) / n_diff,
                   "cdm_level_embedding": level_params},
        "train_flops_per_image": {"cdm": train_flops_per_image(cfg),
                                  "diffusers": diffusers_train_flops_per_image(cfg, dnet)},
        "norm_groups": {"diffusers": groups, "cdm_layers": len(cdm_norm_groups(cdm_net)),
                        "cdm_layers_with_other_groups": mismatched},
        "diffusers_config": {k: list(v) if isinstance(v, tuple) else v for k, v in diffusers_config(cfg, groups).items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="fmnist-sr8to32,fmnist-single32,fmnist-base8",
                   help=f"comma-separated, from {PRESETS}")
    p.add_argument("--steps", type=int, default=8, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override every preset's config, e.g. --set resolution=64 (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    facts = {**machine_facts(), "diffusers": diffusers.__version__}
    print(facts_line(facts) + f", diffusers {diffusers.__version__}", flush=True)
    results = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for preset in a.presets.split(","):
            r = compare(preset, a.steps, a.repeats, a.warmup, a.set, a.device)
            results.append(r)
            print(f"{preset}: " + ", ".join(f"{k} {fmt(s, 1)}" for k, s in r["img_per_s"].items()) + " img/s",
                  flush=True)
    warned = sorted({f"{w.category.__name__}: {w.message}" for w in caught})

    print("\nTraining images/s, median (min–max) over repeats:\n")
    modes = list(results[0]["img_per_s"])
    print_table(["preset (batch)", *modes],
                [[f"{r['preset']} ({r['batch_size']})", *(fmt(r["img_per_s"][m]) for m in modes)] for r in results])
    print("Targets (ratio of medians):\n")
    print_table(["preset", "comparison", "ratio", "target", ""],
                [[r["preset"], t["comparison"], f"{t['ratio']:.2f}×", f"≥ {t['target']:.0f}×",
                  "PASS" if t["pass"] else "MISS"] for r in results for t in r["targets"]])
    print("Matched models (train FLOPs: forward + backward per image, matmul/conv/attention only):\n")
    print_table(["preset", "cdm params", "diffusers params", "difference", "cdm level embedding",
                 "train GFLOP/img cdm", "diffusers", "GroupNorm groups (cdm layers differing)"],
                [[r["preset"], f"{r['params']['cdm']:,}", f"{r['params']['diffusers']:,}",
                  f"{r['params']['difference_pct']:+.2f}%", f"{r['params']['cdm_level_embedding']:,}",
                  f"{r['train_flops_per_image']['cdm'] / 1e9:.3f}",
                  f"{r['train_flops_per_image']['diffusers'] / 1e9:.3f}",
                  f"{r['norm_groups']['diffusers']} ({r['norm_groups']['cdm_layers_with_other_groups']}"
                  f" of {r['norm_groups']['cdm_layers']})"] for r in results])
    for w in warned:
        print(f"warning seen: {w}")
    meta = {**facts, "load_average_at_end": load_average(), "steps": a.steps, "repeats": a.repeats,
            "warmup": a.warmup, "warnings": warned,
            "unit": "training images/s at the preset batch size; median (min–max) over interleaved repeats"}
    write_json(a.out, {"meta": meta, "presets": results})


if __name__ == "__main__":
    main()
