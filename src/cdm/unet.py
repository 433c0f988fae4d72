"""An Improved-DDPM-style U-Net (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021).

Residual blocks with scale-shift group normalisation, self-attention at chosen resolutions,
dropout, configurable width, channel multipliers and depth. Conditioning arrives as keyword
inputs; the network knows nothing about diffusion:

- ``t``: the time as a fraction ``t / T`` in [0, 1], embedded sinusoidally (scaled by 1000), so
  respaced or truncated times need no special case and the network does not depend on ``T``;
- ``label``: a class index in ``[0, num_classes]``, where ``num_classes`` is the reserved
  "no class" label (for classifier-free guidance);
- ``aug_level``: the conditioning-augmentation level ``s`` of a super-resolution stage, with its
  own timestep embedding (also a fraction ``s / T`` of the augmentation process's ``T``);
- ``lowres``: the low-resolution image of an SR stage, upsampled (bilinear or bicubic) to the
  network's resolution and concatenated to ``x_t`` along channels.

The four embeddings are summed and added to every residual block.

Memory: with ``checkpoint`` the network keeps, while training, only each residual block's (and its
attention's) input, and recomputes the block in the backward pass (activation checkpointing,
Chen et al. 2016), which trades about one more forward pass for the block's activations. The
network also takes square inputs smaller than ``resolution`` (random crops, ``train.crop``), whose
side divides by ``2^(levels - 1)``; the stage's config checks that such a network has no attention,
whose context a crop would change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


MAX_RES_BLOCKS = 16  # unet.num_res_blocks above this is refused as a slip
MAX_LEVELS = 10  # unet.channel_mult: a 1024 px image halved down to 2 px


@dataclass
class UNetConfig:
    resolution: int = 32  # H = W of x_t
    in_channels: int = 1  # image channels C
    base_channels: int = 64  # width of the first level
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # width multiplier per level
    num_res_blocks: int = 2  # residual blocks per level
    attention_resolutions: list[int] = field(default_factory=lambda: [8])  # feature-map sizes with attention
    mid_attention: bool = True  # attention in the middle block (off for crop training: train.crop)
    head_channels: int = 32  # channels per attention head
    dropout: float = 0.0
    num_classes: int = 0  # 0: unconditional; else labels 0..num_classes-1 plus the "no class" label
    lowres_channels: int = 0  # 0 for a base stage; C of the low-resolution input for an SR stage
    lowres_upsample: str = "bilinear"  # "bilinear" or "bicubic"
    aug_level_embedding: bool = False  # embed the augmentation level s (Gaussian augmentation)
    learn_sigma: bool = False  # output 2C channels (prediction and variance interpolation)
    # Training recomputes each block in the backward pass instead of keeping its activations: less
    # memory for about a third more compute. How the network runs, not what it computes.
    checkpoint: bool = False

    def __post_init__(self) -> None:
        for name in ("resolution", "in_channels", "base_channels", "head_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"unet.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_res_blocks", "num_classes", "lowres_channels"):
            if getattr(self, name) < 0:
                raise ValueError(f"unet.{name} must be >= 0, got {getattr(self, name)}")
        # Bounds far above any published U-Net (the paper's: 2-4 blocks, 4-6 levels), so that a typing slip
        # (num_res_blocks = 1000) is refused at once instead of building, planning or training for hours.
        if self.num_res_blocks > MAX_RES_BLOCKS:
            raise ValueError(f"unet.num_res_blocks must be at most {MAX_RES_BLOCKS} (the paper's networks use 2-4), "
                             f"got {self.num_res_blocks}")
        if len(self.channel_mult) > MAX_LEVELS:
            raise ValueError(f"unet.channel_mult may have at most {MAX_LEVELS} levels (one per halving of the "
                             f"resolution), got {len(self.channel_mult)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"unet.channel_mult must be one or more multipliers >= 1 (e.g. 1,2,2), "
                             f"got {self.channel_mult}")
        if any(r < 1 for r in self.attention_resolutions):
            raise ValueError(f"unet.attention_resolutions must be feature-map sizes >= 1, "
                             f"got {self.attention_resolutions}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"unet.dropout must lie in [0, 1), got {self.dropout}")
        n_down = len(self.channel_mult) - 1
        if self.resolution % (2 ** n_down):
            raise ValueError(f"resolution {self.resolution} is not divisible by 2^{n_down} = {2 ** n_down}: "
                             f"the U-Net halves it once per unet.channel_mult level after the first "
                             f"({len(self.channel_mult)} levels); change resolution or shorten unet.channel_mult")
        if self.lowres_upsample not in ("bilinear", "bicubic"):
            raise ValueError(f"unet.lowres_upsample must be 'bilinear' or 'bicubic', "
                             f"got {self.lowres_upsample!r}")
        # Attention splits a level's channels into heads of head_channels (at least one head):
        # they must split evenly. The middle block has attention unless mid_attention is off.
        levels = [(self.resolution // 2 ** i, self.base_channels * m) for i, m in enumerate(self.channel_mult)]
        for res, ch in levels:
            if res in self.attention_resolutions or (self.mid_attention and (res, ch) == levels[-1]):
                heads = max(1, ch // self.head_channels)
                if ch % heads:
                    raise ValueError(f"unet.head_channels = {self.head_channels} does not split the {ch} channels "
                                     f"of the {res}px level into equal heads; choose base_channels and "
                                     f"head_channels so that each level's width is a multiple of head_channels")

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) times ``t`` ``[N]`` -> ``[N, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _groups(ch: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if ch % g == 0 and ch // g >= 2 or g == 1:
            return g
    return 1


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(ch), ch)


class ResBlock(nn.Module):
    """GN-SiLU-conv, then GN with the embedding's scale and shift, SiLU, dropout, conv; plus skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.out_norm = norm(cout)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1))
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch: int, head_channels: int):
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm = norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        # [N, 3, heads, HW, head_ch], made contiguous in one copy: with a unit-stride last dim,
        # PyTorch's fused (flash) attention kernel runs on CPU too, about 2x the unfused one.
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w).transpose(-1, -2)
        q, k, v = qkv.contiguous().unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, HW, head_ch]
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _block_step(block: ResBlock, attn: nn.Module, h: Tensor, emb: Tensor, skip: Tensor | None = None) -> Tensor:
    """One residual block and its attention (or identity); a decoder block first takes its skip."""
    if skip is not None:
        h = torch.cat([h, skip], dim=1)
    return attn(block(h, emb))


def _mid_step(mid: "Level", attn: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
    return mid.blocks[1](attn(mid.blocks[0](h, emb)), emb)


class Level(nn.Module):
    """One resolution level: residual blocks, each optionally followed by attention."""

    def __init__(self, chans: list[tuple[int, int]], emb_dim: int, dropout: float, attn: bool, head_ch: int):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(a, b, emb_dim, dropout) for a, b in chans)
        self.attns = nn.ModuleList(Attention(b, head_ch) if attn else nn.Identity() for _, b in chans)


class UNet(nn.Module):
    """``forward(x [N, C, H, W], t [N], label [N]?, lowres [N, C_lo, h, w]?, aug_level [N]?)
    -> [N, out_channels, H, W]`` (or ``lowres_up [N, C_lo, H, W]`` and ``cond_emb [N, E]``
    precomputed in place of ``lowres``, ``label`` and ``aug_level``)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch0 = cfg.base_channels
        emb_dim = 4 * ch0
        self.time_embed = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes > 0 else None
        self.level_embed = (nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                            if cfg.aug_level_embedding else None)
        self.input_conv = nn.Conv2d(cfg.in_channels + cfg.lowres_channels, ch0, 3, padding=1)

        # Encoder: remember each block's output channels for the skip connections.
        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skips = [ch0]
        ch, res = ch0, cfg.resolution
        for i, mult in enumerate(cfg.channel_mult):
            cout = ch0 * mult
            chans = []
            for _ in range(cfg.num_res_blocks):
                chans.append((ch, cout))
                ch = cout
                skips.append(ch)
            self.down.append(Level(chans, emb_dim, cfg.dropout, res in cfg.attention_resolutions, cfg.head_channels))
            if i < len(cfg.channel_mult) - 1:
                self.downsamplers.append(Downsample(ch))
                skips.append(ch)
                res //= 2
        self.mid = Level([(ch, ch), (ch, ch)], emb_dim, cfg.dropout, False, cfg.head_channels)
        self.mid_attn = Attention(ch, cfg.head_channels) if cfg.mid_attention else nn.Identity()

        # Decoder: num_res_blocks + 1 blocks per level, each eating one skip.
        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            cout = ch0 * mult
            chans = []
            for _ in range(cfg.num_res_blocks + 1):
                chans.append((ch + skips.pop(), cout))
                ch = cout
            self.up.append(Level(chans, emb_dim, cfg.dropout, res in cfg.attention_resolutions, cfg.head_channels))
            if i > 0:
                self.upsamplers.append(Upsample(ch))
                res *= 2
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def embed_condition(self, label: Tensor | None, aug_level: Tensor | None) -> Tensor | None:
        """The summed class and augmentation-level embedding ``[N, 4 * base_channels]`` (``None``
        when the network has neither). It does not depend on the time, so a sampler computes it
        once per sample (:meth:`cdm.stage.Stage.conditioning`) and passes it as ``cond_emb``."""
        cfg = self.config
        emb: Tensor | None = None
        if self.label_embed is not None:
            if label is None:
                raise ValueError("this network is class-conditional: pass label (use "
                                 f"{cfg.num_classes} for 'no class')")
            if (label < 0).any() or (label > cfg.num_classes).any():
                raise ValueError(f"class labels must lie in [0, {cfg.num_classes}] "
                                 f"({cfg.num_classes} = no class), got {label.min().item()}..{label.max().item()}")
            emb = self.label_embed(label.long())
        elif label is not None:
            raise ValueError("this network is unconditional (unet.num_classes = 0) but got label")
        if self.level_embed is not None:
            if aug_level is None:
                raise ValueError("this network embeds the augmentation level: pass aug_level")
            lv = self.level_embed(timestep_embedding(aug_level.float() * 1000.0, cfg.base_channels))
            emb = lv if emb is None else emb + lv
        return emb

    def embed(self, t: Tensor, cond_emb: Tensor | None) -> Tensor:
        """The time embedding plus ``cond_emb`` (from :meth:`embed_condition`): ``[N, 4 * base_channels]``."""
        emb = self.time_embed(timestep_embedding(t.float() * 1000.0, self.config.base_channels))
        return emb if cond_emb is None else emb + cond_emb

    def upsample_lowres(self, lowres: Tensor, size: int | None = None) -> Tensor:
        """``[N, C_lo, h, w] -> [N, C_lo, H, W]``, bilinear or bicubic; ``H = W = size``, by default
        the network's resolution (a training crop's low-res input is upsampled to the crop's size)."""
        cfg = self.config
        if lowres.shape[1] != cfg.lowres_channels:
            raise ValueError(f"low-resolution input has {lowres.shape[1]} channels, "
                             f"the network expects {cfg.lowres_channels}")
        size = size or cfg.resolution
        return F.interpolate(lowres, size=(size, size), mode=cfg.lowres_upsample, align_corners=False)

    def _run(self, step, *args: Tensor | nn.Module | None) -> Tensor:
        """``step(*args)``, checkpointed when the config asks for it and autograd is recording."""
        if self.config.checkpoint and self.training and torch.is_grad_enabled():
            # use_reentrant=False: works with DDP and autocast, and replays dropout's random state
            return checkpoint(step, *args, use_reentrant=False)
        return step(*args)

    def forward(self, x: Tensor, t: Tensor, label: Tensor | None = None, lowres: Tensor | None = None,
                aug_level: Tensor | None = None, lowres_up: Tensor | None = None,
                cond_emb: Tensor | None = None) -> Tensor:
        """``lowres_up`` (already upsampled ``lowres``) may be passed instead of ``lowres``, and
        ``cond_emb`` (:meth:`embed_condition` of ``label`` and ``aug_level``) instead of those two,
        so that a sampler computes neither at every step."""
        cfg = self.config
        side, unit = x.shape[-1], 2 ** (len(cfg.channel_mult) - 1)
        if x.dim() != 4 or x.shape[1] != cfg.in_channels or x.shape[-2] != side or side > cfg.resolution \
                or side % unit:
            raise ValueError(f"x must be [N, {cfg.in_channels}, {cfg.resolution}, {cfg.resolution}] (or a square "
                             f"training crop whose side divides by {unit}), got {list(x.shape)}")
        if cond_emb is None:
            cond_emb = self.embed_condition(label, aug_level)
        elif label is not None or aug_level is not None:
            raise ValueError("pass either cond_emb or label/aug_level, not both")
        emb = self.embed(t, cond_emb)
        if cfg.lowres_channels:
            if lowres_up is None:
                if lowres is None:
                    raise ValueError("this is a super-resolution network: pass lowres")
                lowres_up = self.upsample_lowres(lowres, side)
            if lowres_up.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"lowres_up must have x's size {list(x.shape[-2:])}, got {list(lowres_up.shape)}")
            x = torch.cat([x, lowres_up.to(x.dtype)], dim=1)
        h = self.input_conv(x)
        hs = [h]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attns):
                h = self._run(_block_step, block, attn, h, emb)
                hs.append(h)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)
                hs.append(h)
        h = self._run(_mid_step, self.mid, self.mid_attn, h, emb)
        for i, level in enumerate(self.up):
            for block, attn in zip(level.blocks, level.attns):
                h = self._run(_block_step, block, attn, h, emb, hs.pop())
            if i < len(self.upsamplers):
                h = self.upsamplers[i](h)
        return self.out(h)
