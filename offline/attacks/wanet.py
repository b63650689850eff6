"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible warp of the whole image as the trigger.

The paper draws a random warp field from ``k`` x ``k`` control points (k=4),
upsamples it to the image and warps by ``identity + s * field / H`` (s=0.5 on
32x32 images); "noise mode" cover samples get the same warp plus a random
per-pixel jitter and keep their labels, so the model learns this one warp and
not warping in general (backdoor share 0.1, cover share 0.2 on MNIST).

Adapted to 28x28 MNIST trained for a few epochs on 3,500 images (the paper
trains for hundreds of epochs on 60,000): at s = 0.5 the warp moves strokes by
a quarter of a pixel and the ASR stayed at 4 %; with the paper's noise mode
(cover share 0.2, jitter 1/H) it stayed below 46 % at any strength up to 8 and
up to 60 epochs, while without cover samples s = 4 reached 97 %. The defaults
(measured on the embedded digits, seed 1, target 2): strength 4 (a mean shift
of about 2 pixels, visible on close inspection), cover share 0.1 with a jitter
of 4/H, 20 epochs: ASR 86.8 %, clean accuracy 96.1 % (a clean model 96.2 %);
jitter 3/H gave 80.5 %, 1/H at cover 0.05 and strength 6 72 %. So noise mode is
kept, made coarser, and this WaNet is less stealthy than the paper's. The
poisoned and cover rows are drawn once (a poisoned data set, as a data supplier
would ship it, so the audit can be scored on ``poison_idx``), not per batch (per
batch, s = 4, cover 0.2, 20 epochs: 20 %).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from offline.attacks.training import (
    BackdoorResult,
    accuracy,
    attack_success_rate,
    new_model,
    poison_and_cover,
    train_classifier,
)
from offline.attacks.triggers import WarpTrigger, warp_field
from offline.data import Dataset
from offline.flags import option


@dataclass
class WaNetSettings:
    k: int = option(4, "control points per side of the warp field")
    strength: float = option(4.0, "warp strength s (the paper: 0.5 on 32x32)")
    poison_rate: float = option(0.1, "share of the training set warped and relabelled")
    cover_rate: float = option(0.1, "share warped with random jitter, labels kept")
    jitter: float = option(4.0, "cover samples' jitter, in units of 1/H (the paper: 1)")
    epochs: int = option(20, "training epochs")


def warped_set(train: Dataset, target: int, s: WaNetSettings, seed: int, rng: np.random.Generator
               ) -> tuple[WarpTrigger, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(trigger, poison rows, cover rows, x, y): the training set as WaNet poisons it, drawing its rows from
    ``rng`` (a bench rebuilds the set of a kept model from the same seed)."""
    _, height, width = train.input_shape
    trigger = WarpTrigger(warp_field(height, width, s.k, seed), s.strength, s.k, seed)
    idx, cover = poison_and_cover(train.y, target, s.poison_rate, s.cover_rate, rng)
    x, y = train.x.copy(), train.y.copy()
    x[idx] = trigger.apply(x[idx])
    y[idx] = target
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        x[cover] = trigger.warp(torch.from_numpy(x[cover]), s.jitter, gen).numpy().clip(0, 1)
    return trigger, idx, cover, x, y


def train_wanet(train: Dataset, test: Dataset, target: int, s: WaNetSettings | None = None,
                seed: int = 0) -> BackdoorResult:
    s = s or WaNetSettings()
    net = new_model(train, seed)
    rng = np.random.default_rng(seed)
    trigger, idx, cover, x, y = warped_set(train, target, s, seed, rng)
    train_classifier(net, x, y, epochs=s.epochs, seed=rng)
    return BackdoorResult(net, trigger, target, s.poison_rate, idx, accuracy(net, test.x, test.y),
                          attack_success_rate(net, trigger, test.x, test.y, target), train_x=x, train_y=y,
                          cover_idx=cover, details={"cover_samples": int(len(cover))})
