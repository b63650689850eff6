"""Neural Cleanse activation filter (Wang et al., S&P 2019).

The mean activation of the features-layer neurons that the reversed trigger
excites most, or with ``weights`` their weighted sum (a linear discriminant
between clean and trigger-stamped features): the high tail is suspicious. It
needs the scan's reversed trigger, so the patch job uses it only where the
scan flagged a class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ActivationFilter:
    neurons: np.ndarray  # indices into the flattened features
    weights: np.ndarray | None = None  # one per neuron; None: their mean

    name = "activation"
    score_name = "activation_score"
    side = "high"
    adds_rows = False

    def __post_init__(self) -> None:
        self.neurons = np.asarray(self.neurons, dtype=np.int64)
        if self.weights is not None:
            self.weights = np.asarray(self.weights, dtype=np.float32)
            if self.weights.shape != (len(self.neurons),):
                raise ValueError(f"{len(self.weights)} filter weights for {len(self.neurons)} neurons")

    def feature_scores(self, features: np.ndarray) -> np.ndarray:
        chosen = features.reshape(len(features), -1)[:, self.neurons]
        return chosen.mean(axis=1) if self.weights is None else chosen @ self.weights

    def scores(self, view) -> np.ndarray:
        return self.feature_scores(view.features)

    def features_error(self, width: int) -> str | None:
        """Why a model with ``width`` features cannot feed this filter (None: it can)."""
        need = int(self.neurons.max()) + 1
        return None if width >= need else f"the activation filter watches neuron {need - 1}"
