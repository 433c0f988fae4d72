"""Shared tiny configs and data: every test runs on the CPU in seconds."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from cdm.augment import AugmentConfig
from cdm.config import StageConfig, TrainConfig
from cdm.data import DataConfig, ImageSet
from cdm.diffusion import DiffusionConfig, GaussianDiffusion
from cdm.stage import Stage
from cdm.unet import UNetConfig

torch.set_num_threads(1)  # tiny networks: one thread is fastest, and immune to a busy machine


def write_idx(path, arr: np.ndarray, gz: bool = True):
    """``arr`` as an IDX file of unsigned bytes (Fashion-MNIST's format), gzipped if ``gz``."""
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


def tiny_config(resolution: int = 8, lowres: int = 0, aug: str = "none", classes: int = 3, channels: int = 1,
                steps: int = 100, aug_steps: int | None = None, learn_sigma: bool = False,
                prediction: str = "eps", name: str | None = None, data_resolution: int | None = None,
                **train) -> StageConfig:
    """A resolved stage config with a network of a few thousand parameters."""
    cfg = StageConfig(
        name=name or f"tiny{lowres}to{resolution}",
        resolution=resolution, lowres_resolution=lowres, class_conditional=classes > 0,
        data=DataConfig(source="npz", path="unused.npz", resolution=data_resolution or resolution),
        unet=UNetConfig(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[resolution // 2],
                        head_channels=8),
        diffusion=DiffusionConfig(steps=steps, learn_sigma=learn_sigma, prediction=prediction),
        augment=AugmentConfig(kind=aug, steps=aug_steps or steps, s_max=(aug_steps or steps) // 2),
        train=TrainConfig(**{"precision": "fp32", "steps": 4, "batch_size": 8, "log_every": 1, "ckpt_every": 2,
                             "sample_every": 0, "sample_steps": 3, "warmup_steps": 0, **train}),
    )
    return cfg.resolve(channels=channels, num_classes=classes)


def tiny_stage(**kw) -> Stage:
    torch.manual_seed(0)
    return Stage(tiny_config(**kw))


def toy_images(n: int = 24, resolution: int = 16, channels: int = 1, classes: int = 3, seed: int = 0) -> ImageSet:
    """Structured toy images: class c is a bright square in corner c, on noise."""
    g = np.random.default_rng(seed)
    x = g.integers(0, 40, size=(n, channels, resolution, resolution)).astype(np.uint8)
    labels = np.arange(n) % classes
    h = resolution // 2
    for i, c in enumerate(labels):
        r, col = divmod(int(c) % 4, 2)
        x[i, :, r * h:(r + 1) * h, col * h:(col + 1) * h] = 220
    return ImageSet(torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64)), [f"c{i}" for i in range(classes)])


SIGMA = 0.5  # data x0 ~ N(0, SIGMA^2 I): the exact noise predictor is linear in x_t


def exact_model(d: GaussianDiffusion, prediction: str):
    """The exact network output (E[eps | x_t], or v) for data ``N(0, SIGMA^2 I)``."""
    def model(x, t):
        ab = d.alpha_bar[t].float().view(-1, 1, 1, 1)
        denom = ab * SIGMA ** 2 + 1 - ab
        eps = (1 - ab).sqrt() / denom * x  # E[eps | x_t]
        if prediction == "eps":
            return eps
        x0 = ab.sqrt() * SIGMA ** 2 / denom * x  # E[x0 | x_t]
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0
    return model


@pytest.fixture
def toy_npz(tmp_path):
    data = toy_images(24, 16)
    p = tmp_path / "toy.npz"
    np.savez(p, images=data.images.numpy(), labels=data.labels.numpy())
    return p
