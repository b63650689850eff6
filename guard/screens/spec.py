"""What every detector shares: its section of ``guard.json`` and what the offline fit hands it.

A detector (:mod:`guard.screens.registry` lists them) is one class with

- ``name`` (in the verdict, ``--detectors``, metrics labels), ``section`` (its
  ``guard.json`` key), ``Spec`` (that section's schema, a :class:`DetectorSpec`),
  ``score_name``, ``side`` (which tail is suspicious), ``adds_rows``,
  ``trigger_free`` (fitted from clean data alone; otherwise it needs the scan's
  reversed trigger);
- ``from_spec(spec, arrays, bundle, seed, sequential)``: the run-time detector
  from its section and the arrays ``spec.load`` read from the bundle;
- ``fit(data, settings)`` (offline only, lazily importing what it needs): the
  detector fitted on the fit split, its section (without calibration scores)
  and the arrays to save in the bundle;
- ``extra_rows(x)`` when ``adds_rows``, ``scores(view)``, ``features_error(width)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CleanStats(Strict):
    count: int
    mean: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, scores: np.ndarray) -> CleanStats:
        return cls(count=len(scores), mean=float(scores.mean()), std=float(scores.std()),
                   min=float(scores.min()), max=float(scores.max()))


class DetectorSpec(Strict):
    calibration_scores: list[float] = Field(description="the detector's scores on the clean calibration images, "
                                            "in the verdict's order; its p-values are ranks among them")
    alone_frr: float | None = Field(None, gt=0, lt=1, description="expert override: the detector also refuses "
                                    "on its own at this rate, a budget outside the verdict's")
    reference_scores: list[float] = Field(default_factory=list, description="the detector's scores on clean "
                                          "images that are not calibration images (the fit split; k-NN leaving "
                                          "each reference out): its p-values are tail probabilities against them "
                                          "when the verdict's p_values is 'fitted'")

    @model_validator(mode="after")
    def _finite(self) -> DetectorSpec:
        if not all(math.isfinite(v) for v in self.calibration_scores + self.reference_scores):
            raise ValueError("calibration and reference scores must be finite numbers")
        return self

    def files(self) -> list[tuple[str, str]]:
        """The files of the bundle this detector reads, with their SHA-256."""
        return []

    def check(self, num_classes: int) -> None:
        """Raise ValueError where the section does not fit a model of ``num_classes`` classes."""

    def load(self, read: BundleReader) -> dict[str, np.ndarray]:
        """The detector's arrays, read from the bundle and checked."""
        return {}

    def describe(self, bundle: Any) -> str:
        """One line for ``trojan-guard inspect`` (``bundle``: the loaded ``guard.bundle.GuardBundle``)."""
        return ""

    @classmethod
    def finish(cls, calibration_scores: np.ndarray) -> dict[str, Any]:
        """Fields derived from the calibration scores (the calibration writes them into the section)."""
        return {}


class ByClassSpec(DetectorSpec):
    """A detector section whose score is standardised within the predicted class (SCALE-UP, IBD-PSC)."""

    section: ClassVar[str] = "detector"  # its guard.json key, for error messages

    class_mean: list[float] = Field(default_factory=list, description="clean score per predicted class on the fit "
                                    "split: the score is standardised within the class; empty: the raw score")
    class_std: list[float] = Field(default_factory=list)

    def check(self, num_classes: int) -> None:
        if len(self.class_mean) != len(self.class_std) or (self.class_mean and len(self.class_mean) != num_classes):
            raise ValueError(f"{self.section}.class_mean and class_std need one entry per class ({num_classes})")
        if any(not v > 0 for v in self.class_std):
            raise ValueError(f"{self.section}.class_std must be positive")

    def class_arrays(self) -> dict[str, np.ndarray]:
        """``class_mean`` and ``class_std`` as the detector's keyword arguments (none when empty)."""
        return {"class_mean": np.asarray(self.class_mean), "class_std": np.asarray(self.class_std)} \
            if self.class_mean else {}


class BundleReader:
    """Reads a bundle's arrays for the detectors' ``Spec.load``: checked, or a ``BundleError`` naming the file."""

    def __init__(self, array: Callable[..., np.ndarray], npz: Callable[..., dict[str, np.ndarray]],
                 num_classes: int) -> None:
        self.array, self.npz, self.num_classes = array, npz, num_classes


@dataclass
class FitData:
    """What the offline calibration gives every detector's ``fit``: the model and the clean fit split."""

    infer: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    pool: np.ndarray  # STRIP's clean overlays
    x_fit: np.ndarray
    y_fit: np.ndarray
    fit_logits: np.ndarray
    fit_features: np.ndarray
    num_classes: int
    n_calibration: int  # how many calibration images will be scored
    save: Callable[[str, Any], str]  # (file name, an array or a dict of arrays) -> its SHA-256 in the bundle
    features_layer: str = "features"  # the model layer behind the ONNX graph's features output
    target: int | None = None  # the scan's suspect class and its reversed trigger (trigger-bound detectors)
    stamp: Callable[[np.ndarray], np.ndarray] | None = None
    # what the export added to the model for a detector, by detector name (ibd_psc: its variants' outputs);
    # ``infer`` then returns (logits, features, {output name: array})
    model_outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def fit_predicted(self) -> np.ndarray:
        return self.fit_logits.argmax(axis=1)


@dataclass
class Fitted:
    """A fitted detector and its ``guard.json`` section (calibration scores still to come)."""

    detector: Any
    section: dict[str, Any]
    selection: dict[str, Any] | list[Any] | None = None  # how its settings were chosen, for the report
