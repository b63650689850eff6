"""The guard's screens: STRIP perturbation entropy and the Neural Cleanse activation filter.

numpy only. The offline calibration calls exactly this code on the exported
model, so a threshold means the same thing when the guard serves it.

- STRIP (Gao et al., ACSAC 2019): superimpose the input with ``n`` clean images
  from a held-out pool, take the Shannon entropy of each blend's predicted class
  distribution and average over the ``n`` blends. A triggered input keeps its
  (target) prediction whatever it is blended with, so its entropy is low;
  flagged when the entropy is below the threshold.
- Activation filter (Wang et al., S&P 2019): the mean activation of the
  features-layer neurons that the reversed trigger excites most; flagged when
  above the threshold.

Each screen keeps the scores it was calibrated on, so it reports a p-value with
every verdict: the share of clean calibration inputs at least as suspicious.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

BLEND_RULES = ("add", "average")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) over the last axis."""
    p = np.clip(probs, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def softmax_entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy (nats) of softmax(logits) over the last axis, without forming log-probabilities.

    With z = logits - max and S = sum(exp z): H = log S - sum(softmax * z).
    """
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=-1)
    return np.log(total) - (e * z).sum(axis=-1) / total


def blend(x: np.ndarray, overlays: np.ndarray, rule: str, lo: float = 0.0, hi: float = 1.0,
          out: np.ndarray | None = None) -> np.ndarray:
    """Superimpose each input with its overlays.

    ``x`` is (B, C, H, W), ``overlays`` (B, N, C, H, W); returns (B, N, C, H, W),
    written into ``out`` when given. ``add`` sums the two images pixel by pixel,
    as the paper does, clipped to the value range; ``average`` takes their mean.
    """
    if rule not in BLEND_RULES:
        raise ValueError(f"unknown blend rule '{rule}' (one of {', '.join(BLEND_RULES)})")
    out = np.add(x[:, None], overlays, out=out)
    if rule == "add":
        return np.clip(out, lo, hi, out=out)
    return np.multiply(out, 0.5, out=out)


def answered_with(predicted: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Which inputs the model answered with one of ``classes`` (every input when ``classes`` is empty)."""
    return np.isin(predicted, list(classes)) if len(classes) else np.ones(len(predicted), dtype=bool)


def p_values(calibration_scores: np.ndarray, scores: np.ndarray, low_is_suspicious: bool,
             presorted: bool = False) -> np.ndarray:
    """Share of calibration scores at least as suspicious as each score (with +1 smoothing)."""
    ref = np.asarray(calibration_scores, dtype=np.float64)
    if not presorted:
        ref = np.sort(ref)
    if low_is_suspicious:
        count = np.searchsorted(ref, scores, side="right")
    else:
        count = len(ref) - np.searchsorted(ref, scores, side="left")
    return (count + 1) / (len(ref) + 1)


def quantile_threshold(clean_scores: np.ndarray, rate: float, low_is_suspicious: bool) -> float:
    """Empirical threshold that flags ``rate`` of the clean scores."""
    q = rate if low_is_suspicious else 1.0 - rate
    return float(np.quantile(np.asarray(clean_scores, dtype=np.float64), q))


def normal_threshold(clean_scores: np.ndarray, rate: float, low_is_suspicious: bool) -> float:
    """Threshold from a normal fit of the clean scores (STRIP's paper rule)."""
    scores = np.asarray(clean_scores, dtype=np.float64)
    mu, sigma = float(scores.mean()), float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
    z = NormalDist().inv_cdf(rate if low_is_suspicious else 1.0 - rate)
    return mu + z * sigma


def _calibrated_p_values(sorted_calibration: np.ndarray, scores: np.ndarray, low_is_suspicious: bool) -> np.ndarray:
    """p-values against a screen's sorted calibration scores; NaN when it has none."""
    if not len(sorted_calibration):
        return np.full(len(scores), np.nan)
    return p_values(sorted_calibration, scores, low_is_suspicious, presorted=True)


@dataclass
class Verdicts:
    """Scores, verdicts and p-values of one screen over a batch."""

    scores: np.ndarray
    flagged: np.ndarray
    p_values: np.ndarray


@dataclass
class StripScreen:
    """STRIP: low average blend entropy means a trigger dominates the input."""

    pool: np.ndarray  # (P, C, H, W) clean images
    n: int
    threshold: float
    rule: str = "add"
    value_range: tuple[float, float] = (0.0, 1.0)
    calibration_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    seed: int = 0
    # scope: only inputs answered with one of these classes can be flagged (empty: every input). A trigger
    # can only succeed through the classes it targets, so the false-rejection budget is spent on them.
    classes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.rule not in BLEND_RULES:
            raise ValueError(f"unknown blend rule '{self.rule}' (one of {', '.join(BLEND_RULES)})")
        if not 1 <= self.n <= len(self.pool):
            raise ValueError(f"STRIP needs 1 <= n <= pool size ({len(self.pool)}), got n={self.n}")
        self._rng = np.random.default_rng(self.seed)
        self._sorted_calibration = np.sort(np.asarray(self.calibration_scores, dtype=np.float64))

    def model_batch(self, x: np.ndarray) -> np.ndarray:
        """One float32 batch for the model: the B inputs, then their n blends each (B + B * n rows).

        Each input is blended with n pool images drawn without replacement.
        """
        b, shape = len(x), x.shape[1:]
        out = np.empty((b * (self.n + 1), *shape), dtype=np.float32)
        out[:b] = x
        # n distinct pool images per input: the first n of a random permutation of the pool
        idx = self._rng.permuted(np.broadcast_to(np.arange(len(self.pool)), (b, len(self.pool))), axis=1)
        blend(out[:b], self.pool[idx[:, :self.n]], self.rule, *self.value_range,
              out=out[b:].reshape(b, self.n, *shape))
        return out

    def perturb(self, x: np.ndarray) -> np.ndarray:
        """The n blends of every input, flattened to one batch of (B * n, C, H, W)."""
        return self.model_batch(x)[len(x):]

    def scores(self, blend_logits: np.ndarray) -> np.ndarray:
        """Average entropy per input from the logits of its n blends, (B * n, K) -> (B,)."""
        per_blend = softmax_entropy(blend_logits.astype(np.float64))
        return per_blend.reshape(-1, self.n).mean(axis=1)

    def judge(self, scores: np.ndarray, predicted: np.ndarray | None = None) -> Verdicts:
        flagged = scores < self.threshold
        if self.classes:
            if predicted is None:
                raise ValueError("a STRIP screen scoped to classes needs the model's answers to judge")
            flagged &= answered_with(predicted, self.classes)
        return Verdicts(scores, flagged, _calibrated_p_values(self._sorted_calibration, scores, True))


@dataclass
class ActivationFilter:
    """Neural Cleanse filter: mean activation of the trigger-excited neurons.

    With ``weights`` the score is their weighted sum instead (a linear
    discriminant between clean and trigger-stamped features, for instance).
    """

    neurons: np.ndarray  # indices into the flattened features
    threshold: float
    calibration_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    weights: np.ndarray | None = None  # one per neuron; None: their mean

    def __post_init__(self) -> None:
        self._sorted_calibration = np.sort(np.asarray(self.calibration_scores, dtype=np.float64))
        if self.weights is not None:
            self.weights = np.asarray(self.weights, dtype=np.float32)
            if self.weights.shape != (len(self.neurons),):
                raise ValueError(f"{len(self.weights)} filter weights for {len(self.neurons)} neurons")

    def scores(self, features: np.ndarray) -> np.ndarray:
        chosen = features.reshape(len(features), -1)[:, self.neurons]
        return chosen.mean(axis=1) if self.weights is None else chosen @ self.weights

    def judge(self, scores: np.ndarray) -> Verdicts:
        return Verdicts(scores, scores > self.threshold, _calibrated_p_values(self._sorted_calibration, scores, False))


@dataclass
class ScreenResult:
    """What the guard decides about a batch of inputs."""

    logits: np.ndarray  # (B, K) the model's answer on the unmodified inputs
    features: np.ndarray  # (B, D)
    strip: Verdicts
    activation: Verdicts

    @property
    def flagged(self) -> np.ndarray:
        return self.strip.flagged | self.activation.flagged


def screen(infer, x: np.ndarray, strip: StripScreen, activation: ActivationFilter) -> ScreenResult:
    """Screen a batch: the inputs and their STRIP blends go to the model as one batch.

    ``infer(batch) -> (logits, features)`` runs the model (an onnxruntime
    session in the guard, the same exported model during calibration).
    """
    logits, features = infer(strip.model_batch(x))
    b = len(x)
    return ScreenResult(
        logits=logits[:b],
        features=features[:b],
        strip=strip.judge(strip.scores(logits[b:]), logits[:b].argmax(axis=1)),
        activation=activation.judge(activation.scores(features[:b])),
    )
