"""STRIP (Gao et al., ACSAC 2019): perturbation entropy.

Superimpose the input with ``n`` clean images from a held-out pool, take the
Shannon entropy of each blend's predicted class distribution and average over
the ``n`` blends. A triggered input keeps its (target) prediction whatever it is
blended with, so its entropy is low: the low tail is suspicious.

Clean entropies differ by class (a blended 8 still looks like an 8), so with
``class_mean`` / ``class_std`` (from clean fit images, per predicted class) the
score is the entropy standardised within the class the model answered: the
same low entropy is suspicious for a 1 and ordinary for an 8.

With ``group`` set, the screen draws the blends sequentially, ``group`` at a
time, and stops once the verdict is settled (see ``Screen``): stochastic
curtailment of the fixed-n test. After m blends with mean entropy mu_m, the
n-blend mean still to come is predicted as mu_m +- z * sd, with
sd = (n - m) / n * sigma * sqrt(1 / (n - m) + 1 / m) (sigma: the per-blend
spread, the larger of the calibration images' and this input's own); an input is
refused or answered early when the verdict is the same at both ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guard.screens.common import BLEND_RULES, blend, softmax_entropy


@dataclass
class StripScreen:
    pool: np.ndarray  # (P, C, H, W) clean images
    n: int
    rule: str = "add"
    value_range: tuple[float, float] = (0.0, 1.0)
    seed: int = 0
    group: int | None = None  # sequential: blends per round (None: all n at once)
    within_sd: float = 0.0  # per-blend entropy spread around an input's own mean, on clean calibration images
    z: float = 3.0  # how sure a sequential stop must be (predicted-mean standard deviations)
    class_mean: np.ndarray | None = None  # (K,) clean entropy per predicted class; None: raw entropy
    class_std: np.ndarray | None = None

    name = "strip"
    score_name = "strip_entropy"
    side = "low"
    adds_rows = True

    def __post_init__(self) -> None:
        if self.rule not in BLEND_RULES:
            raise ValueError(f"unknown blend rule '{self.rule}' (one of {', '.join(BLEND_RULES)})")
        if not 1 <= self.n <= len(self.pool):
            raise ValueError(f"STRIP needs 1 <= n <= pool size ({len(self.pool)}), got n={self.n}")
        if self.group is not None and not 1 <= self.group < self.n:
            raise ValueError(f"sequential STRIP needs 1 <= group < n={self.n}, got group={self.group}")
        if (self.class_mean is None) != (self.class_std is None):
            raise ValueError("STRIP's class standardisation needs both class_mean and class_std")
        if self.class_std is not None:
            self.class_mean = np.asarray(self.class_mean, dtype=np.float64)
            self.class_std = np.asarray(self.class_std, dtype=np.float64)
            if self.class_mean.shape != self.class_std.shape or not (self.class_std > 0).all():
                raise ValueError("STRIP's class_std must be positive, one per class_mean")
        self._rng = np.random.default_rng(self.seed)

    def standardise(self, entropy: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        """The score: the mean blend entropy, standardised within the predicted class when configured."""
        if self.class_mean is None:
            return entropy
        return (entropy - self.class_mean[predicted]) / self.class_std[predicted]

    def features_error(self, width: int) -> str | None:
        return None

    def draw(self, b: int) -> np.ndarray:
        """n distinct pool indices for each of b inputs, (b, n)."""
        idx = self._rng.permuted(np.broadcast_to(np.arange(len(self.pool)), (b, len(self.pool))), axis=1)
        return idx[:, :self.n]

    def blends(self, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Input i blended with pool images idx[i], flattened to (B * m, C, H, W)."""
        b, m, shape = len(x), idx.shape[1], x.shape[1:]
        out = np.empty((b * m, *shape), dtype=np.float32)
        blend(x, self.pool[idx], self.rule, *self.value_range, out=out.reshape(b, m, *shape))
        return out

    def extra_rows(self, x: np.ndarray) -> np.ndarray:
        """The n blends of every input, (B * n, C, H, W); each input gets n distinct pool images."""
        return self.blends(x, self.draw(len(x)))

    def per_blend(self, blend_logits: np.ndarray, m: int | None = None) -> np.ndarray:
        """Entropy of each blend, (B * m, K) -> (B, m) (m: n unless given)."""
        return softmax_entropy(blend_logits.astype(np.float64)).reshape(-1, m or self.n)

    def bounds(self, entropies: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """From the first m blend entropies (B, m): their mean, and the z-bounds of the n-blend mean."""
        mu = entropies[:, :m].mean(axis=1)
        own = entropies[:, :m].std(axis=1, ddof=1) if m > 1 else np.zeros(len(entropies))
        sigma = np.maximum(own, self.within_sd)
        left = max(self.n - m, 0)
        spread = self.z * left / self.n * sigma * np.sqrt(1.0 / max(left, 1) + 1.0 / m)
        return mu, mu - spread, mu + spread

    def scores(self, view) -> np.ndarray:
        return self.standardise(self.per_blend(view.extra_logits(self)).mean(axis=1), view.predicted)
