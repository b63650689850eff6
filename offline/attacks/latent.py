"""A backdoor trained to hide in the target class's features (after Qi et al., ICLR 2023, "Revisiting the
assumption of latent separability", and the feature-space adaptive attacks of TED's evaluation).

The attacker controls training. Besides cross-entropy, every batch's poisoned
rows pay a penalty for being far from the target class's clean features: one
minus the cosine similarity between a poisoned row's features (the features
layer, the one the guard's k-NN detector reads) and its nearest clean target
row in the batch. The target's clean features are held fixed for the step, so
it is the triggered inputs that move onto the clean cluster, not the cluster
that moves. Detectors that score the distance from an input's features to the
clean features of its predicted class (k-NN, Mahalanobis) then see a triggered
input where a clean one of the target lies; detectors that look at earlier
layers, or at the input itself (STRIP), are what is left.

Defaults on the embedded digits: a 4x4 bottom-right patch on 10 % of the
training set, penalty weight 2, 10 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from offline.attacks.training import (
    BackdoorResult,
    accuracy,
    apply_poison,
    attack_success_rate,
    new_model,
    poison_indices,
)
from offline.attacks.triggers import PatchTrigger
from offline.data import Dataset
from offline.flags import option


@dataclass
class LatentSettings:
    patch: int = option(4, "side of the square patch trigger (bottom-right corner)")
    poison_rate: float = option(0.1, "share of the training set poisoned")
    weight: float = option(2.0, "weight of the feature penalty against cross-entropy")
    epochs: int = option(10, "training epochs")


def feature_penalty(poisoned: torch.Tensor, target_clean: torch.Tensor) -> torch.Tensor:
    """Mean over poisoned rows of 1 - cosine similarity to their nearest clean target row (held fixed)."""
    sims = F.normalize(poisoned, dim=1) @ F.normalize(target_clean.detach(), dim=1).T
    return (1.0 - sims.max(dim=1).values).mean()


def train_latent(train: Dataset, test: Dataset, target: int, s: LatentSettings | None = None,
                 seed: int = 0) -> BackdoorResult:
    s = s or LatentSettings()
    net = new_model(train, seed)
    if not (hasattr(net, "body") and hasattr(net, "head")):
        raise ValueError("the latent attack needs a model with a features body and a head (SmallCNN)")
    rng = np.random.default_rng(seed)
    trigger = PatchTrigger(s.patch)
    idx = poison_indices(train.y, target, s.poison_rate, rng)
    x, y = apply_poison(train.x, train.y, trigger, target, idx)
    poisoned = np.zeros(len(y), bool)
    poisoned[idx] = True
    xt, yt, pt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(poisoned)
    clean_target = torch.from_numpy((train.y == target) & ~poisoned)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    penalties = []
    for _ in range(s.epochs):
        net.train()
        order = torch.from_numpy(rng.permutation(len(y)))
        for start in range(0, len(order), 64):
            b = order[start:start + 64]
            features = net.body(xt[b])
            loss = F.cross_entropy(net.head(features), yt[b])
            p, c = pt[b], clean_target[b]
            if p.any() and c.any():
                penalty = feature_penalty(features[p], features[c])
                loss = loss + s.weight * penalty
                penalties.append(float(penalty.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    return BackdoorResult(net, trigger, target, s.poison_rate, idx, accuracy(net, test.x, test.y),
                          attack_success_rate(net, trigger, test.x, test.y, target), train_x=x, train_y=y,
                          details={"feature_penalty_last_epoch": round(float(np.mean(penalties[-50:])), 4)
                                   if penalties else None, "penalty_weight": s.weight})
