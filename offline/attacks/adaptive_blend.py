"""Adaptive-Blend (Qi et al., ICLR 2023, "Revisiting the assumption of latent separability").

A blended trigger is cut into ``pieces`` x ``pieces`` tiles; each poisoned
training image carries a random half of the tiles (blended at ``alpha``) and is
relabelled; as many *cover* images carry a random half too but keep their
labels. The model cannot learn "any part of the pattern means the target", so
poisoned and clean samples stay close in its latent space (which is what
activation clustering and spectral signatures rely on). At test time the full
pattern, blended a little stronger, triggers the backdoor.

The paper (CIFAR-10, 50,000 images): 4x4 tiles, half of them per sample, train
alpha 0.15, test alpha 0.2, 0.3 % poison and 0.3 % cover (150 images each).
Adapted to the embedded 3,500 digits: 0.3 % is 10 images, too few to learn
from in a few epochs, so the default is 5 % poison and 5 % cover (175 each) and
12 epochs; the tiles are 7x7 on 28x28.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from offline.attacks.training import (
    BackdoorResult,
    accuracy,
    attack_success_rate,
    new_model,
    poison_and_cover,
    train_classifier,
)
from offline.attacks.triggers import BlendTrigger, blend_pattern
from offline.data import Dataset
from offline.flags import option
from offline.stamp import stamp


@dataclass
class AdaptiveBlendSettings:
    pieces: int = option(4, "the pattern is cut into pieces x pieces tiles")
    keep: float = option(0.5, "share of the tiles on each poisoned or cover image")
    alpha: float = option(0.15, "blend weight on the training images")
    test_alpha: float = option(0.2, "blend weight of the full trigger at test time")
    poison_rate: float = option(0.05, "share of the training set poisoned")
    cover_rate: float = option(0.05, "share carrying partial triggers, labels kept")
    epochs: int = option(12, "training epochs")


def partial_masks(n: int, shape: tuple[int, int], pieces: int, keep: float, alpha: float,
                  rng: np.random.Generator) -> np.ndarray:
    """(n, 1, H, W) blend masks, each covering a random ``keep`` share of the ``pieces`` x ``pieces`` tiles."""
    height, width = shape
    rows = np.array_split(np.arange(height), pieces)
    cols = np.array_split(np.arange(width), pieces)
    chosen = max(1, int(round(keep * pieces * pieces)))
    masks = np.zeros((n, 1, height, width), np.float32)
    for i in range(n):
        for tile in rng.choice(pieces * pieces, size=chosen, replace=False):
            r, c = rows[tile // pieces], cols[tile % pieces]
            masks[i, 0, r[0]:r[-1] + 1, c[0]:c[-1] + 1] = alpha
    return masks


def train_adaptive_blend(train: Dataset, test: Dataset, target: int, s: AdaptiveBlendSettings | None = None,
                         seed: int = 0) -> BackdoorResult:
    s = s or AdaptiveBlendSettings()
    net = new_model(train, seed)
    rng = np.random.default_rng(seed)
    pattern = blend_pattern(train.input_shape, seed)
    idx, cover = poison_and_cover(train.y, target, s.poison_rate, s.cover_rate, rng)
    x, y = train.x.copy(), train.y.copy()
    for rows in (idx, cover):
        masks = partial_masks(len(rows), train.input_shape[1:], s.pieces, s.keep, s.alpha, rng)
        x[rows] = stamp(x[rows], masks, pattern)
    y[idx] = target
    train_classifier(net, x, y, epochs=s.epochs, seed=rng)
    trigger = BlendTrigger(s.test_alpha, seed)
    return BackdoorResult(net, trigger, target, s.poison_rate, idx, accuracy(net, test.x, test.y),
                          attack_success_rate(net, trigger, test.x, test.y, target), train_x=x, train_y=y,
                          cover_idx=cover,
                          details={"cover_samples": int(len(cover)), "train_alpha": s.alpha, "pieces": s.pieces})
