"""Class-conditional density of the features layer, fitted on clean data: no trigger, no extra pass.

A backdoor makes the model answer the target class from features that clean
inputs of that class do not have, so a triggered input lands where the clean
inputs of its predicted class are sparse. Both detectors score the distance from
an input's features to the clean features of the class the model answered with;
the high tail is suspicious.

- :class:`KnnDensity`: cosine distance to the k-th nearest clean reference of
  the predicted class (Sun et al., ICML 2022, for out-of-distribution inputs).
- :class:`MahalanobisDensity`: Mahalanobis distance to the predicted class's
  clean mean under one shared, shrunk covariance (Lee et al., NeurIPS 2018).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _normalise(features: np.ndarray) -> np.ndarray:
    f = features.reshape(len(features), -1).astype(np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


@dataclass
class KnnDensity:
    reference: np.ndarray  # (M, D) clean features
    labels: np.ndarray  # (M,) the class the model answered each reference with
    k: int = 5

    name = "knn"
    score_name = "knn_distance"
    side = "high"
    adds_rows = False

    def __post_init__(self) -> None:
        self.reference = _normalise(np.asarray(self.reference))
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.reference):
            raise ValueError(f"{len(self.labels)} labels for {len(self.reference)} k-NN references")
        counts = np.bincount(self.labels)
        if self.k < 1 or (counts[counts > 0] < self.k).any():
            raise ValueError(f"k-NN needs 1 <= k <= the references of every class present (k={self.k}, "
                             f"smallest class {int(counts[counts > 0].min())})")

    def features_error(self, width: int) -> str | None:
        d = self.reference.shape[1]
        return None if width == d else f"the k-NN detector was fitted on {d}"

    def feature_scores(self, features: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        sims = _normalise(features) @ self.reference.T  # (B, M)
        sims[self.labels[None, :] != predicted[:, None]] = -np.inf
        kth = -np.partition(-sims, self.k - 1, axis=1)[:, self.k - 1]
        # a class with no clean reference at all: as far as a distance can be
        return np.where(np.isfinite(kth), 1.0 - kth, 2.0)

    def scores(self, view) -> np.ndarray:
        return self.feature_scores(view.features, view.predicted)

    def reference_scores(self, chunk: int = 1024) -> np.ndarray:
        """Each reference's own score, leaving itself out (its distance to itself is 0): what a clean input
        of the reference's kind scores, for the verdict's fitted p-values."""
        out = np.empty(len(self.reference))
        for lo in range(0, len(self.reference), chunk):
            sims = self.reference[lo:lo + chunk] @ self.reference.T
            rows = np.arange(len(sims))
            sims[rows, lo + rows] = -np.inf
            sims[self.labels[None, :] != self.labels[lo:lo + chunk, None]] = -np.inf
            k = self.k - 1
            kth = -np.partition(-sims, k, axis=1)[:, k]
            out[lo:lo + chunk] = np.where(np.isfinite(kth), 1.0 - kth, 2.0)
        return out


@dataclass
class MahalanobisDensity:
    means: np.ndarray  # (K, D) clean class means
    precision: np.ndarray  # (D, D) inverse of the shared shrunk covariance

    name = "mahalanobis"
    score_name = "mahalanobis_distance"
    side = "high"
    adds_rows = False

    def __post_init__(self) -> None:
        self.means = np.asarray(self.means, dtype=np.float64)
        self.precision = np.asarray(self.precision, dtype=np.float64)
        d = self.means.shape[1]
        if self.precision.shape != (d, d):
            raise ValueError(f"Mahalanobis precision is {self.precision.shape}, means have {d} features")

    def features_error(self, width: int) -> str | None:
        d = self.means.shape[1]
        return None if width == d else f"the Mahalanobis detector was fitted on {d}"

    def feature_scores(self, features: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        diff = features.reshape(len(features), -1).astype(np.float64) - self.means[predicted]
        return np.sqrt(np.maximum(np.einsum("bd,de,be->b", diff, self.precision, diff), 0.0))

    def scores(self, view) -> np.ndarray:
        return self.feature_scores(view.features, view.predicted)
