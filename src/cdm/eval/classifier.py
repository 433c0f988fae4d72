"""A small domain classifier: a feature space for FID/KID/PR on small images, and the
Classification Accuracy Score (CAS) of the paper.

The Inception network was trained on 299x299 photographs; for 28-32 px grayscale images a
classifier trained on the domain itself gives a feature space that is fast on a CPU and
meaningful (as in the "FID in a domain classifier's features" practice for MNIST-like data).
The same network, trained only on generated class-conditional samples and tested on the real
test split, gives CAS (Ravuri & Vinyals 2019; the paper's Table 3).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import CheckpointError, atomic_write
from ..config import ConfigError, from_dict, to_dict
from ..stage import autocast
from ..data import DataConfig, to_float
from ..prepared import PreparedImages
from ..runlock import run_lock
from .report import Report
from .reference import ReferenceSpec, load_reference

FORMAT = "cdm-classifier"
FORMAT_VERSION = 1


@dataclass
class ClassifierConfig:
    resolution: int = 32  # input H = W (inputs of other sizes are resized to it)
    channels: int = 1
    num_classes: int = 10
    width: int = 16  # channels of the first block; doubled twice (cheap enough for a 2-core CPU)
    feature_dim: int = 128  # the penultimate layer: the feature space for FID/KID/PR
    dropout: float = 0.2
    epochs: int = 3
    min_steps: int = 400  # at least this many optimiser steps, however few the images (e.g. CAS on 1000 samples)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    max_shift: int = 2  # training augmentation: random translation by up to this many pixels
    flip: bool = False  # training augmentation: random horizontal flips
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse a setting that cannot train (``cdm train-classifier --set KEY=VALUE``), in one line."""
        bad = [f"{k} must be >= 1, got {getattr(self, k)}" for k in ("width", "feature_dim", "batch_size", "resolution",
                                                                      "channels") if getattr(self, k) < 1]
        bad += [f"{k} must be >= 0, got {getattr(self, k)}" for k in ("epochs", "min_steps", "max_shift")
                if getattr(self, k) < 0]
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad.append(f"lr must be a number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            bad.append(f"weight_decay must be a number >= 0, got {self.weight_decay}")
        if not 0 <= self.dropout < 1:
            bad.append(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.epochs == 0 and self.min_steps == 0:
            bad.append("epochs and min_steps are both 0: nothing would train")
        if bad:
            raise ConfigError(f"classifier setting {bad[0]} (set it with --set KEY=VALUE)")


# What `cdm eval --cas` trains on the generated images (the Classification Accuracy Score), and on as
# many real ones for reference: the domain classifier's recipe, 4 epochs.
CAS_RECIPE = ClassifierConfig(epochs=4)
DATA_FROM = "fmnist-sr8to32"  # cdm train-classifier's data when none is named: the demo's data set


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class Classifier(nn.Module):
    """A conv stem and two conv blocks with pooling, global average pooling, a feature layer and logits.
    ``forward(x [N, C, R, R] in [-1, 1]) -> logits [N, K]``; ``features(x) -> [N, feature_dim]``."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = c = config
        w = c.width
        # A single conv at full resolution, then two blocks at 1/2 and 1/4: the full-resolution
        # layers dominate a CPU's time, so they are kept to one.
        self.body = nn.Sequential(nn.Conv2d(c.channels, w, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
                                  _block(w, 2 * w), nn.MaxPool2d(2), _block(2 * w, 4 * w),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, c.feature_dim), nn.SiLU())
        self.head = nn.Sequential(nn.Dropout(c.dropout), nn.Linear(c.feature_dim, c.num_classes))

    def _prepare(self, x: Tensor) -> Tensor:
        c = self.config
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"classifier inputs must be [N, 1 or 3, H, W], got {list(x.shape)}")
        if x.shape[1] != c.channels:
            x = x.mean(1, keepdim=True) if c.channels == 1 else x.expand(-1, 3, -1, -1)
        if x.shape[-1] != c.resolution or x.shape[-2] != c.resolution:
            x = F.interpolate(x, size=(c.resolution, c.resolution), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def features(self, x: Tensor) -> Tensor:
        return self.body(self._prepare(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def as_float_images(images: Tensor | np.ndarray) -> Tensor:
    """uint8 ``[N, C, H, W]`` (or already float in [-1, 1]) -> float ``[N, C, H, W]`` in [-1, 1]."""
    x = torch.as_tensor(images)
    return to_float(x) if x.dtype == torch.uint8 else x.float()


def _augment(x: Tensor, cfg: ClassifierConfig, g: torch.Generator) -> Tensor:
    if cfg.max_shift > 0:
        m = cfg.max_shift
        xp = F.pad(x, (m, m, m, m), value=-1.0)
        dx, dy = torch.randint(0, 2 * m + 1, (2,), generator=g).tolist()
        x = xp[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]
    if cfg.flip:
        flip = torch.rand(x.shape[0], generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


def train_classifier(images: Tensor | np.ndarray | PreparedImages, labels: Tensor | np.ndarray, config: ClassifierConfig,
                     progress: bool = False, log=None) -> Classifier:
    """Train a classifier on ``images`` (uint8 or float ``[N, C, H, W]``; a prepared set's rows are
    read a batch at a time) and ``labels`` ``[N]``."""
    from tqdm.auto import tqdm

    x = torch.as_tensor(images) if isinstance(images, np.ndarray) else images  # made float a batch at a time
    y = torch.as_tensor(labels).long()
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    if y.numel() == 0 or y.min() < 0 or y.max() >= config.num_classes:
        raise ValueError(f"labels must lie in [0, {config.num_classes - 1}]")
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    net = Classifier(config)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(x) // config.batch_size)
    epochs = max(config.epochs, -(-config.min_steps // steps_per_epoch))
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total, pct_start=0.15)
    net.train()
    bar = tqdm(total=total, disable=not progress, desc="classifier", mininterval=1.0)
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        run_loss, t0 = 0.0, time.perf_counter()
        for i in range(steps_per_epoch):
            idx = perm[i * config.batch_size:(i + 1) * config.batch_size]
            with autocast(torch.device("cpu"), "fp32" if torch.cuda.is_available() else "auto"):
                logits = net(_augment(as_float_images(x[idx]), config, g))
            loss = F.cross_entropy(logits.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += loss.item()
            bar.update(1)
        if log is not None:
            log({"epoch": epoch + 1, "loss": run_loss / steps_per_epoch,
                 "img_per_s": steps_per_epoch * config.batch_size / (time.perf_counter() - t0)})
    bar.close()
    return net.eval()


@torch.no_grad()
def predict(net: Classifier, images: Tensor | np.ndarray | PreparedImages, batch_size: int = 500) -> dict[str, Tensor]:
    """``{"features": [N, D] float64, "logits": [N, K], "probs": [N, K]}`` for uint8/float images."""
    net.eval()
    x = torch.as_tensor(images) if isinstance(images, np.ndarray) else images  # a tensor, or a prepared set's rows
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
        f = net.features(as_float_images(x[i:i + batch_size]))
        feats.append(f.double())
        logits.append(net.head(f).float())
    lg = torch.cat(logits)
    return {"features": torch.cat(feats), "logits": lg, "probs": lg.softmax(-1)}


def accuracy_report(logits: Tensor, labels: Tensor, num_classes: int) -> dict:
    """Top-1, top-5 (or top-k for fewer classes) and per-class top-1 accuracy, in percent."""
    labels = torch.as_tensor(labels).long()
    k = min(5, num_classes)
    topk = logits.topk(k, dim=-1).indices
    top1 = (topk[:, 0] == labels).float()
    top5 = (topk == labels[:, None]).any(-1).float()
    per_class = [100.0 * top1[labels == c].mean().item() if (labels == c).any() else float("nan")
                 for c in range(num_classes)]
    return {"top1": 100.0 * top1.mean().item(), f"top{k}": 100.0 * top5.mean().item(), "per_class_top1": per_class,
            "n": len(labels)}


def save_classifier(net: Classifier, path: str | Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(to_dict(net.config)),
            "extra": json.dumps(extra or {})}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))
    return Path(path)


def load_classifier(path: str | Path) -> tuple[Classifier, dict]:
    """A classifier and its ``extra`` metadata (e.g. its test accuracy and data)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "classifier.safetensors"
    if not p.is_file():
        raise CheckpointError(f"classifier {p} does not exist; train one with 'cdm train-classifier --out DIR'")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(p))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{p} is not a readable classifier ({e})") from e
    if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{p} is not a cdm classifier of format version {FORMAT_VERSION}")
    net = Classifier(from_dict(ClassifierConfig, json.loads(meta["config"])))
    net.load_state_dict(tensors)
    return net.eval(), json.loads(meta.get("extra", "{}"))


def train_and_test(train_images, train_labels, test_images, test_labels, config: ClassifierConfig,
                   progress: bool = False) -> dict:
    """The classifier recipe ``config`` trained on ``(train_images [N, C, H, W], train_labels [N])``
    and tested on ``(test_images, test_labels)``: an :func:`accuracy_report` plus ``train_n``."""
    net = train_classifier(train_images, train_labels, config, progress=progress)
    out = accuracy_report(predict(net, test_images)["logits"], torch.as_tensor(test_labels), config.num_classes)
    out["train_n"] = len(train_labels)
    return out


def classification_accuracy_score(gen_images, gen_labels, test_images, test_labels, config: ClassifierConfig,
                                  real_images=None, real_labels=None, progress: bool = False) -> dict:
    """CAS: a classifier trained only on generated ``(gen_images, gen_labels)``, tested on the real
    test split; with ``real_images``, the same classifier recipe trained on as many real images, for
    reference. Returns accuracy reports (percent)."""
    out = {"config": to_dict(config)}
    out["generated"] = train_and_test(gen_images, gen_labels, test_images, test_labels, config, progress)
    if real_images is not None:
        out["real"] = train_and_test(real_images, real_labels, test_images, test_labels, config, progress)
    return out


def train_domain_classifier(data: DataConfig, out_dir: str | Path, config: ClassifierConfig,
                            progress: bool = True) -> dict:
    """``cdm train-classifier``: train the domain classifier on the ``train`` split of ``data``
    (with ``data.limit``, a class-stratified random subset of that many, seed 0), test it on the
    whole held-out ``test`` split (:mod:`cdm.eval.reference`), save ``classifier.safetensors``,
    ``summary.json`` and a report."""
    out = Path(out_dir)
    t0 = time.time()
    train = load_reference(data, ReferenceSpec(split="train", n=data.limit))
    test = load_reference(data, ReferenceSpec(split="test", n=0))
    config = replace(config, resolution=data.resolution, channels=train.images.shape[1],
                     num_classes=len(train.class_names))
    with run_lock(out, "training a classifier"):  # one writer per --out, taken before the work
        history: list[dict] = []
        net = train_classifier(train.images, train.labels, config, progress=progress, log=history.append)
        acc = accuracy_report(predict(net, test.images)["logits"], test.labels, config.num_classes)
        summary = {"test": acc, "train_n": len(train), "test_n": len(test), "train": train.source,
                   "test_set": test.source, "data": to_dict(data), "history": history,
                   "seconds": round(time.time() - t0, 1), "classes": train.class_names}
        path = save_classifier(net, out / "classifier.safetensors",
                               extra={"test_top1": acc["top1"], "data": to_dict(data)})
        atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
        rep = Report("cdm domain classifier")
        rep.text(f"Trained on {len(train)} images ({train.source}), tested on {len(test)} held-out images "
                 f"({test.source}): top-1 {acc['top1']:.2f}%, top-5 {acc.get('top5', float('nan')):.2f}%, "
                 f"in {summary['seconds']} s.")
        rep.table([{"class": c, "top1 %": a} for c, a in zip(train.class_names, acc["per_class_top1"])])
        rep.table(history)
        rep.write(out)
        summary["path"] = str(path)
    return summary
