"""Arithmetic the detectors share: softmax, entropy, blending, ranks against calibration scores."""

from __future__ import annotations

from collections.abc import Sequence

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


def class_statistics(scores: np.ndarray, predicted: np.ndarray, num_classes: int,
                     least: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread of clean scores per predicted class (every score pooled for a class with fewer than
    ``least``), to standardise a score within the class the model answered."""
    overall = (float(scores.mean()), float(max(scores.std(ddof=1), 1e-6)))
    stats = [(float(scores[predicted == c].mean()), float(max(scores[predicted == c].std(ddof=1), 1e-6)))
             if (predicted == c).sum() >= least else overall for c in range(num_classes)]
    return np.array([m for m, _ in stats]), np.array([sd for _, sd in stats])


def within_class(scores: np.ndarray, predicted: np.ndarray, mean: np.ndarray | None,
                 std: np.ndarray | None) -> np.ndarray:
    """``scores`` standardised within each input's predicted class (as they are, without class statistics)."""
    return scores if mean is None else (scores - mean[predicted]) / std[predicted]


def answered_with(predicted: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Which inputs the model answered with one of ``classes`` (every input when ``classes`` is empty)."""
    return np.isin(predicted, list(classes)) if len(classes) else np.ones(len(predicted), dtype=bool)
