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

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from guard.screens.common import BLEND_RULES, blend, class_statistics, softmax_entropy, within_class
from guard.screens.spec import CleanStats, DetectorSpec, FitData, Fitted


class StripSpec(DetectorSpec):
    n: int = Field(ge=1)
    blend_rule: Literal["add", "average"] = "add"
    clean_entropy: CleanStats
    group: int | None = Field(None, ge=1, description="sequential screening: blends per round, stopping once "
                              "the verdict is settled; null: all n at once")
    within_sd: float = Field(0.0, ge=0, description="spread of one clean input's blend entropies around its mean")
    z: float = Field(3.0, gt=0, description="how sure a sequential stop must be, in predicted-mean deviations")
    class_mean: list[float] = Field(default_factory=list, description="clean blend entropy per predicted class: "
                                    "the score is the entropy standardised within the class; empty: raw entropy")
    class_std: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _group_below_n(self) -> StripSpec:
        if self.group is not None and self.group >= self.n:
            raise ValueError(f"strip.group {self.group} must be below n={self.n}")
        if len(self.class_mean) != len(self.class_std) or any(not v > 0 for v in self.class_std) or not all(
                math.isfinite(v) for v in self.class_mean):
            raise ValueError("strip.class_mean and class_std must pair up, with finite means and positive spreads")
        return self

    def check(self, num_classes: int) -> None:
        if self.class_mean and len(self.class_mean) != num_classes:
            raise ValueError(f"strip.class_mean has {len(self.class_mean)} entries for {num_classes} classes")

    def describe(self, bundle: Any) -> str:
        return (f"n={self.n}, blend '{self.blend_rule}', pool {len(bundle.pool)} images"
                + (f", sequential in rounds of {self.group} (z={self.z:g})" if self.group else ""))

    @classmethod
    def finish(cls, calibration_scores: np.ndarray) -> dict[str, Any]:
        return {"clean_entropy": CleanStats.of(calibration_scores).model_dump()}


def choose_strip_n(per_blend: np.ndarray, candidates: tuple[int, ...]) -> tuple[int, dict[str, Any]]:
    """STRIP's n as the paper chooses it: grow n until the spread of clean entropies flattens.

    The mean of n blend entropies has variance ``between + within / n``
    (``between``: the spread of the inputs' own entropies; ``within``: the
    blends' noise around them). The spread has flattened once the blends' part
    is at most a tenth of the inputs' own, i.e. the standard deviation is within
    5 % of its limit; ``per_blend`` is (inputs, max n) clean blend entropies.
    """
    n_max = per_blend.shape[1]
    within = float(per_blend.var(axis=1, ddof=1).mean())
    between = float(per_blend.mean(axis=1).var(ddof=1)) - within / n_max
    spread = {n: float(per_blend[:, :n].mean(axis=1).std()) for n in candidates if n <= n_max}
    chosen = next((n for n in sorted(spread) if between > 0 and within / n <= 0.1 * between), max(spread))
    return chosen, {"within_variance": within, "between_variance": between, "clean_entropy_std": spread,
                    "rule": "smallest n with within / n <= 0.1 * between (std within 5 % of its limit)"}


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

    name = section = "strip"
    Spec = StripSpec
    score_name = "strip_entropy"
    score_help = ("STRIP score of each input: mean blend entropy (nats), standardised within the predicted class "
                  "where the bundle has class statistics")
    side = "low"
    adds_rows = True
    trigger_free = True

    @classmethod
    def from_spec(cls, spec: StripSpec, arrays: dict[str, np.ndarray], bundle: Any, seed: int = 0,
                  sequential: bool = True) -> StripScreen:
        by_class = {"class_mean": np.asarray(spec.class_mean), "class_std": np.asarray(spec.class_std)} \
            if spec.class_mean else {}
        return cls(bundle.pool, spec.n, spec.blend_rule, tuple(bundle.manifest.input.value_range), seed=seed,
                   group=spec.group if sequential else None, within_sd=spec.within_sd, z=spec.z, **by_class)

    @classmethod
    def fit(cls, data: FitData, settings: Any) -> Fitted:
        """n by the paper's rule and the per-class clean entropy, both on the fit split (never the calibration
        images, so their scores stay exchangeable with clean traffic's)."""
        s, pool = settings, data.pool
        candidates = (s.strip_n,) if s.strip_n else tuple(n for n in s.strip_candidates if n <= len(pool))
        if not candidates:
            raise ValueError(f"STRIP's candidate n {list(s.strip_candidates)} all exceed the pool of {len(pool)} "
                             f"images; raise --pool-size or set --strip-n")
        probe = cls(pool, max(candidates), s.blend_rule, seed=s.seed)
        x_probe = data.x_fit[np.random.default_rng(s.seed).permutation(len(data.x_fit))[:data.n_calibration]]
        per_blend = np.concatenate([probe.per_blend(data.infer(probe.extra_rows(x_probe[i:i + 64]))[0])
                                    for i in range(0, len(x_probe), 64)])
        n, selection = choose_strip_n(per_blend, candidates)
        class_mean = class_std = None
        if s.strip_by_class:
            class_mean, class_std = cls(pool, n, s.blend_rule, seed=s.seed + 1)._class_entropy(data)
        group = (n // 10 if n >= 20 else None) if s.strip_group is None else (s.strip_group or None)
        if group is not None and group >= n:
            raise ValueError(f"--strip-group {group} must be below STRIP's n={n}")
        section = {"n": n, "blend_rule": s.blend_rule, "alone_frr": s.strip_frr, "group": group,
                   "within_sd": float(np.sqrt(selection["within_variance"])), "z": s.strip_z,
                   "class_mean": [] if class_mean is None else [float(v) for v in class_mean],
                   "class_std": [] if class_std is None else [float(v) for v in class_std]}
        return Fitted(cls(pool, n, s.blend_rule, seed=s.seed, class_mean=class_mean, class_std=class_std), section,
                      selection)

    def _class_entropy(self, data: FitData) -> tuple[np.ndarray, np.ndarray]:
        """Mean and spread of clean entropy per predicted class on the fit split (all pooled where fewer than 5)."""
        entropy, predicted, x = [], [], data.x_fit
        for i in range(0, len(x), 64):
            logits = data.infer(np.concatenate([x[i:i + 64], self.extra_rows(x[i:i + 64])]))[0]
            b = len(x[i:i + 64])
            entropy.append(self.per_blend(logits[b:]).mean(axis=1))
            predicted.append(logits[:b].argmax(axis=1))
        return class_statistics(np.concatenate(entropy), np.concatenate(predicted), data.num_classes)

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
        return within_class(entropy, predicted, self.class_mean, self.class_std)

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
