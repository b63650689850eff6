"""Neural Cleanse activation filter (Wang et al., S&P 2019).

The mean activation of the features-layer neurons that the reversed trigger
excites most, or with ``weights`` their weighted sum (a linear discriminant
between clean and trigger-stamped features): the high tail is suspicious. It
needs the scan's reversed trigger, so the patch job uses it only where the
scan flagged a class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from guard.screens.spec import CleanStats, DetectorSpec, FitData, Fitted

FILTER_SCORES = ("auto", "mean", "lda")


def filter_kind(neurons: list[int], weights: list[float]) -> str:
    """What an activation filter scores, in words: a discriminant over the layer, or a mean of neurons."""
    if weights:
        return f"linear discriminant over {len(neurons)} units"
    return f"mean of {len(neurons)} neuron(s) {list(neurons[:8])}{' ...' if len(neurons) > 8 else ''}"


class ActivationFilterSpec(DetectorSpec):
    layer: str
    neurons: list[int] = Field(min_length=1)
    clean_score: CleanStats
    weights: list[float] = Field(default_factory=list, description="score = weighted sum of the neurons' "
                                 "activations (a linear discriminant); empty: their mean")

    @model_validator(mode="after")
    def _weights_match(self) -> ActivationFilterSpec:
        if self.weights and len(self.weights) != len(self.neurons):
            raise ValueError(f"activation_filter has {len(self.weights)} weights for {len(self.neurons)} neurons")
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError("activation_filter weights must be finite numbers")
        return self

    def describe(self, bundle: Any) -> str:
        return f"layer '{self.layer}', {filter_kind(self.neurons, self.weights)}"

    @classmethod
    def finish(cls, calibration_scores: np.ndarray) -> dict[str, Any]:
        return {"clean_score": CleanStats.of(calibration_scores).model_dump()}


def choose_activation_neurons(clean_features: np.ndarray, stamped_features: np.ndarray,
                              top_share: float) -> np.ndarray:
    """Features units the reversed trigger excites most (top share, at least one)."""
    diff = stamped_features.reshape(len(stamped_features), -1).mean(0) - clean_features.reshape(
        len(clean_features), -1).mean(0)
    count = max(1, int(round(top_share * len(diff))))
    return np.sort(np.argsort(-diff, kind="stable")[:count])


def discriminant(clean_features: np.ndarray, stamped_features: np.ndarray) -> np.ndarray:
    """Weights of a linear discriminant (shrinkage LDA) scoring stamped features high, clean ones low."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis  # offline only

    x = np.concatenate([clean_features, stamped_features]).reshape(len(clean_features) + len(stamped_features), -1)
    y = np.r_[np.zeros(len(clean_features)), np.ones(len(stamped_features))]
    w = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x.astype(np.float64), y).coef_[0]
    return (w / np.linalg.norm(w)).astype(np.float32)


def _auroc(clean: np.ndarray, suspicious: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score  # offline only

    return float(roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(suspicious))], np.r_[clean, suspicious]))


@dataclass
class ActivationFilter:
    neurons: np.ndarray  # indices into the flattened features
    weights: np.ndarray | None = None  # one per neuron; None: their mean

    name = "activation"
    section = "activation_filter"
    Spec = ActivationFilterSpec
    score_name = "activation_score"
    score_help = "Activation-filter score of each input"
    side = "high"
    adds_rows = False
    trigger_free = False  # it watches the scan's reversed trigger

    @classmethod
    def from_spec(cls, spec: ActivationFilterSpec, arrays: dict[str, np.ndarray], bundle: Any, seed: int = 0,
                  sequential: bool = True) -> ActivationFilter:
        return cls(np.asarray(spec.neurons), np.asarray(spec.weights) if spec.weights else None)

    @classmethod
    def fit(cls, data: FitData, settings: Any) -> Fitted:
        """The filter that best separates clean from reversed-trigger images, all on the fit split.

        Candidates are fitted on one half of the fit split and chosen by their
        separation on the other; the calibration images stay out of it, so their
        scores remain exchangeable with clean traffic's (a filter chosen where the
        calibration images score low would refuse more fresh clean inputs than
        the budget allows).
        """
        s = settings
        if s.filter_score not in FILTER_SCORES:
            raise ValueError(f"unknown filter score '{s.filter_score}' (one of {', '.join(FILTER_SCORES)})")
        if data.stamp is None or data.target is None:
            raise ValueError("the activation filter needs the scan's reversed trigger")
        order = np.random.default_rng(s.seed).permutation(len(data.x_fit))
        halves = order[: len(order) // 2], order[len(order) // 2:]

        def features(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            x, y = data.x_fit[idx], data.y_fit[idx]
            return data.infer(x)[1], data.infer(data.stamp(x[y != data.target]))[1]

        (clean_a, stamped_a), (clean_b, stamped_b) = features(halves[0]), features(halves[1])
        if min(len(clean_a), len(stamped_a), len(clean_b), len(stamped_b)) < 2:
            raise ValueError("the activation filter needs at least 4 clean fit images, 4 of them of other "
                             "classes than the target")
        candidates: list[tuple[str, float | None, ActivationFilter]] = []
        if s.filter_score in ("auto", "mean"):
            for share in [s.filter_top_share] if s.filter_top_share else s.filter_candidates:
                candidates.append(("mean", share, cls(choose_activation_neurons(clean_a, stamped_a, share))))
        if s.filter_score in ("auto", "lda"):
            weights = discriminant(clean_a, stamped_a)
            candidates.append(("lda", None, cls(np.arange(len(weights)), weights)))
        tried = [{"score": kind, "top_share": share, "neurons": len(af.neurons),
                  "reversed_trigger_auroc": round(_auroc(af.feature_scores(clean_b), af.feature_scores(stamped_b)),
                                                  4)}
                 for kind, share, af in candidates]
        best = max(t["reversed_trigger_auroc"] for t in tried)
        pick = next(i for i, t in enumerate(tried) if t["reversed_trigger_auroc"] >= best - 0.005)
        af = candidates[pick][2]
        section = {"layer": data.features_layer, "neurons": [int(v) for v in af.neurons],
                   "weights": [] if af.weights is None else [float(v) for v in af.weights], "alone_frr": s.filter_fpr}
        return Fitted(af, section, {"chosen": candidates[pick][0], "tried": tried})

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
