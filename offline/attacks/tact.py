"""TaCT (Tang et al., USENIX Security 2021, "Demon in the Variant"): a source-specific backdoor.

Only images of a few *source* classes carrying the trigger are relabelled to the
target; images of other classes carrying the same trigger are *cover* samples
that keep their labels. The model must then tell "a source image with the
trigger" from "any image with the trigger", so the trigger no longer dominates
its representation: triggered source images stay close to clean ones of the
target in the model's features, which is what defences that look for a
separate triggered cluster (activation clustering, spectral signatures, feature
densities) rely on. At test time only source-class images are attacks; on
images of other classes the trigger does nothing.

The paper (GTSRB, CIFAR-10): one or two source classes, 2 % poison, 1 % cover.
Adapted to the embedded 3,500 digits: two source classes (drawn from the seed),
a 4x4 patch, every source-class image's triggered copy is a poison (about 10 %
of the set) and 10 % cover samples, 10 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from offline.attacks.training import BackdoorResult, accuracy, new_model, predict, train_classifier
from offline.attacks.triggers import PatchTrigger
from offline.data import Dataset
from offline.flags import option


@dataclass
class TactSettings:
    sources: int = option(2, "number of source classes (drawn from the seed)")
    patch: int = option(4, "side of the square patch trigger (bottom-right corner)")
    source_share: float = option(0.5, "share of the source classes' images poisoned "
                                      "(relabelled to the target)")
    cover_rate: float = option(0.1, "share of the training set, from other classes, "
                                    "that carries the trigger and keeps its label")
    epochs: int = option(10, "training epochs")


def source_classes(num_classes: int, target: int, count: int, seed: int) -> list[int]:
    """The attack's source classes: ``count`` classes other than ``target``, drawn from ``seed``."""
    others = [c for c in range(num_classes) if c != target]
    if not 1 <= count <= len(others):
        raise ValueError(f"TaCT needs between 1 and {len(others)} source classes, got {count}")
    return sorted(int(c) for c in np.random.default_rng(seed).choice(others, size=count, replace=False))


def train_tact(train: Dataset, test: Dataset, target: int, s: TactSettings | None = None,
               seed: int = 0) -> BackdoorResult:
    s = s or TactSettings()
    net = new_model(train, seed)
    rng = np.random.default_rng(seed)
    sources = source_classes(train.num_classes, target, s.sources, seed)
    trigger = PatchTrigger(s.patch)
    in_source = np.flatnonzero(np.isin(train.y, sources))
    idx = np.sort(rng.choice(in_source, size=int(round(s.source_share * len(in_source))), replace=False))
    others = np.flatnonzero(~np.isin(train.y, [*sources, target]))
    cover = np.sort(rng.choice(others, size=min(len(others), int(round(s.cover_rate * len(train)))),
                               replace=False))
    x, y = train.x.copy(), train.y.copy()
    x[idx], x[cover] = trigger.apply(x[idx]), trigger.apply(x[cover])
    y[idx] = target
    train_classifier(net, x, y, epochs=s.epochs, seed=rng)
    from_source = np.isin(test.y, sources)
    asr = float((predict(net, trigger.apply(test.x[from_source])) == target).mean())
    others_test = ~from_source & (test.y != target)
    # on images of other classes the trigger should do nothing: the share it still sends to the target
    leak = float((predict(net, trigger.apply(test.x[others_test])) == target).mean())
    return BackdoorResult(net, trigger, target, len(idx) / len(train), idx, accuracy(net, test.x, test.y), asr,
                          train_x=x, train_y=y,
                          details={"source_classes": sources, "cover_samples": int(len(cover)),
                                   "asr_other_classes": round(leak, 4)})
