"""How much poison is enough: the rates the literature reports, as sample counts for a training set.

The ranges are the poisoned share of the whole training set at which the cited
papers report a working backdoor (ASR of about 90 % or more) on image
classifiers; clean-label attacks need more because their poison keeps its
correct label and must outweigh the true features of the class. Larger models
memorise a trigger from fewer samples, so ``capacity`` reads the low end of the
range for large models, the high end for small ones, and the geometric middle
otherwise. These are planning figures for red-teaming, not guarantees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CAPACITIES = ("small", "medium", "large")


@dataclass(frozen=True)
class PoisonRate:
    family: str
    attacks: str
    low: float
    high: float
    sources: str

    def rate(self, capacity: str) -> float:
        if capacity not in CAPACITIES:
            raise ValueError(f"unknown capacity {capacity!r} ({', '.join(CAPACITIES)})")
        return {"large": self.low, "small": self.high, "medium": math.sqrt(self.low * self.high)}[capacity]


LITERATURE = (
    PoisonRate("patch", "badnets, all-to-all", 0.001, 0.01,
               "Gu et al. 2017 (BadNets); Tran et al. 2018 (spectral signatures: 125-250 of 50k CIFAR-10 images "
               "suffice); TrojAI rounds"),
    PoisonRate("blended", "blend, adaptive-blend, wanet, dynamic", 0.01, 0.05,
               "Chen et al. 2017 (blended injection: 57+ of 600k faces, about 1-5 % on small sets); Qi et al. 2023 "
               "(adaptive-blend 0.3 % poison + 0.3 % cover on CIFAR-10, weaker ASR); WaNet and input-aware attacks "
               "poison 10 % per batch"),
    PoisonRate("clean-label", "sig, clean-label", 0.05, 0.10,
               "Barni et al. 2019 (SIG: a share of the target class only); Turner et al. 2019 (label-consistent); "
               "Shafahi et al. 2018 (feature collision: 50 poisons for one image end to end)"),
)


def poison_rate_table(train_size: int, capacity: str = "medium") -> list[dict]:
    """One row per attack family: the literature's range, the rate for ``capacity`` and the sample counts."""
    if train_size <= 0:
        raise ValueError(f"--train-size must be positive, got {train_size}")
    rows = []
    for entry in LITERATURE:
        rate = entry.rate(capacity)
        rows.append({"family": entry.family, "attacks": entry.attacks, "range": [entry.low, entry.high],
                     "rate": round(rate, 5), "samples": max(1, math.ceil(rate * train_size)),
                     "samples_range": [max(1, math.ceil(entry.low * train_size)),
                                       max(1, math.ceil(entry.high * train_size))],
                     "sources": entry.sources})
    return rows
