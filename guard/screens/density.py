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
from typing import Any

import numpy as np
from pydantic import Field

from guard.screens.spec import BundleReader, DetectorSpec, FitData, Fitted


class KnnSpec(DetectorSpec):
    reference_file: str = Field(description=".npy (M, D) float32: clean features-layer outputs")
    reference_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    labels: list[int] = Field(min_length=1, description="the class the model answered each reference with")
    k: int = Field(ge=1)

    def files(self) -> list[tuple[str, str]]:
        return [(self.reference_file, self.reference_sha256)]

    def check(self, num_classes: int) -> None:
        if any(not 0 <= c < num_classes for c in self.labels):
            raise ValueError(f"knn.labels name classes outside 0..{num_classes - 1}")

    def load(self, read: BundleReader) -> dict[str, np.ndarray]:
        m = len(self.labels)
        return {"reference": read.array(self.reference_file, "k-NN reference", lambda a: a.ndim == 2 and len(a) == m
                                        and a.dtype == np.float32, f"float32 ({m}, D), one row per label")}

    def describe(self, bundle: Any) -> str:
        return f"k={self.k} over {len(self.labels)} clean features"


class MahalanobisSpec(DetectorSpec):
    file: str = Field(description=".npz with means (K, D) and precision (D, D), float64")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    def files(self) -> list[tuple[str, str]]:
        return [(self.file, self.sha256)]

    def load(self, read: BundleReader) -> dict[str, np.ndarray]:
        k = read.num_classes
        return read.npz(self.file, "Mahalanobis statistics", {
            "means": lambda a: a.ndim == 2 and len(a) == k,
            "precision": lambda a: a.ndim == 2 and a.shape[0] == a.shape[1]})

    def describe(self, bundle: Any) -> str:
        return f"{bundle.arrays['mahalanobis']['means'].shape[1]} features, shared shrunk covariance"


def _normalise(features: np.ndarray) -> np.ndarray:
    f = features.reshape(len(features), -1).astype(np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


@dataclass
class KnnDensity:
    reference: np.ndarray  # (M, D) clean features
    labels: np.ndarray  # (M,) the class the model answered each reference with
    k: int = 5

    name = section = "knn"
    Spec = KnnSpec
    score_name = "knn_distance"
    score_help = "k-NN detector score of each input: cosine distance to the k-th nearest clean features of its class"
    side = "high"
    adds_rows = False
    trigger_free = True

    @classmethod
    def from_spec(cls, spec: KnnSpec, arrays: dict[str, np.ndarray], bundle: Any, seed: int = 0,
                  sequential: bool = True) -> KnnDensity:
        return cls(arrays["reference"], np.asarray(spec.labels), spec.k)

    @classmethod
    def fit(cls, data: FitData, settings: Any) -> Fitted:
        """References: the fit split's features, labelled with the class the model answers each with."""
        predicted = data.fit_predicted
        counts = np.bincount(predicted, minlength=data.num_classes)
        k = max(1, min(settings.knn_k, int(counts[counts > 0].min())))
        features = data.fit_features.reshape(len(data.fit_features), -1).astype(np.float32)
        section = {"reference_file": "knn_reference.npy", "reference_sha256": data.save("knn_reference.npy", features),
                   "labels": [int(v) for v in predicted], "k": k}
        return Fitted(cls(features, predicted, k), section)

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

    name = section = "mahalanobis"
    Spec = MahalanobisSpec
    score_name = "mahalanobis_distance"
    score_help = "Mahalanobis distance of each input's features to its class's clean mean"
    side = "high"
    adds_rows = False
    trigger_free = True

    @classmethod
    def from_spec(cls, spec: MahalanobisSpec, arrays: dict[str, np.ndarray], bundle: Any, seed: int = 0,
                  sequential: bool = True) -> MahalanobisDensity:
        return cls(arrays["means"], arrays["precision"])

    @classmethod
    def fit(cls, data: FitData, settings: Any) -> Fitted:
        """Class means and the precision of one shared Ledoit-Wolf covariance of the fit split's features."""
        from sklearn.covariance import LedoitWolf  # offline only

        f = data.fit_features.reshape(len(data.fit_features), -1).astype(np.float64)
        predicted, overall = data.fit_predicted, f.mean(axis=0)
        means = np.stack([f[predicted == k].mean(axis=0) if (predicted == k).any() else overall
                          for k in range(data.num_classes)])
        precision = LedoitWolf().fit(f - means[predicted]).precision_
        section = {"file": "mahalanobis.npz", "sha256": data.save("mahalanobis.npz",
                                                                  {"means": means, "precision": precision})}
        return Fitted(cls(means, precision), section)

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
