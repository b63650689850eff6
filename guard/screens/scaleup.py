"""SCALE-UP (Guo et al., ICLR 2023): scaled prediction consistency.

Multiply the input's pixel values by a few factors (3, 5, ..., 11, clipped to the value range) and ask the
model again. A clean image washes out and its prediction drifts; a triggered one keeps the backdoor's answer,
because the trigger survives amplification (a patch saturates, a blend keeps its structure). The paper counts
the scaled copies predicted as the original (SPC); here the score is the mean softmax probability of the
originally predicted class over the copies, a continuous SPC whose ranks a conformal p-value can use, and, as
the paper's data-limited variant does, it is standardised within the predicted class on clean fit images: the
high tail is suspicious.

Nearly binary images (MNIST digits) defeat it: scaling leaves them as they are. It is meant for natural
images; measured on the RGB signs models beside STRIP and k-NN (docs/lab/rgb.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, field_validator

from guard.screens.common import class_statistics, softmax, within_class
from guard.screens.spec import ByClassSpec, FitData, Fitted

FACTORS = (3.0, 5.0, 7.0, 9.0, 11.0)


class ScaleUpSpec(ByClassSpec):
    section: ClassVar[str] = "scale_up"
    factors: list[float] = Field(default_factory=lambda: list(FACTORS), min_length=1,
                                 description="pixel-value amplification factors, each > 1")

    @field_validator("factors")
    @classmethod
    def _amplifying(cls, factors: list[float]) -> list[float]:
        if not all(f > 1 for f in factors):
            raise ValueError("scale_up.factors must all be above 1")
        return factors

    def describe(self, bundle: Any) -> str:
        return f"factors {', '.join(f'{f:g}' for f in self.factors)}" + (
            ", standardised per class" if self.class_mean else "")


@dataclass
class ScaleUpScreen:
    factors: tuple[float, ...] = FACTORS
    value_range: tuple[float, float] = (0.0, 1.0)
    class_mean: np.ndarray | None = None
    class_std: np.ndarray | None = None

    name = section = "scale_up"
    Spec = ScaleUpSpec
    score_name = "scale_up_consistency"
    score_help = ("SCALE-UP score of each input: mean probability of the predicted class over pixel-amplified "
                  "copies, standardised within the predicted class where the bundle has class statistics")
    side = "high"
    adds_rows = True
    trigger_free = True

    @classmethod
    def from_spec(cls, spec: ScaleUpSpec, arrays: dict[str, np.ndarray], bundle: Any, seed: int = 0,
                  sequential: bool = True) -> ScaleUpScreen:
        return cls(tuple(spec.factors), tuple(bundle.manifest.input.value_range), **spec.class_arrays())

    @classmethod
    def fit(cls, data: FitData, settings: Any) -> Fitted:
        """The per-class clean statistics, on the fit split (never the calibration images)."""
        raw = cls()
        scores, predicted = [], []
        for i in range(0, len(data.x_fit), 64):
            x = data.x_fit[i:i + 64]
            logits = data.infer(np.concatenate([x, raw.extra_rows(x)]))[0]
            predicted.append(logits[:len(x)].argmax(axis=1))
            scores.append(raw.consistency(logits[len(x):], predicted[-1]))
        mean, std = class_statistics(np.concatenate(scores), np.concatenate(predicted), data.num_classes)
        section = {"factors": list(FACTORS), "class_mean": mean.tolist(), "class_std": std.tolist()}
        return Fitted(cls(FACTORS, class_mean=mean, class_std=std), section)

    def features_error(self, width: int) -> str | None:
        return None

    def extra_rows(self, x: np.ndarray) -> np.ndarray:
        """Each input amplified by each factor around the value range's low end and clipped: (B * F, C, H, W)."""
        lo, hi = self.value_range
        f = np.asarray(self.factors, dtype=np.float32).reshape(1, -1, *([1] * (x.ndim - 1)))
        scaled = lo + (np.asarray(x, dtype=np.float32)[:, None] - lo) * f
        return np.clip(scaled, lo, hi).reshape(-1, *x.shape[1:])

    def consistency(self, scaled_logits: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        """Mean probability of each input's predicted class over its scaled copies, (B * F, K) -> (B,)."""
        probs = softmax(scaled_logits.astype(np.float64)).reshape(len(predicted), len(self.factors), -1)
        return probs[np.arange(len(predicted)), :, predicted].mean(axis=1)

    def scores(self, view) -> np.ndarray:
        return within_class(self.consistency(view.extra_logits(self), view.predicted), view.predicted,
                            self.class_mean, self.class_std)
