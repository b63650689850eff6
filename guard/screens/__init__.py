"""The guard's run-time detectors and the one verdict they feed.

numpy only. The offline calibration calls exactly this code on the exported
model, so a calibrated score means the same thing when the guard serves it.

Each detector (:mod:`.strip`, :mod:`.activation`, :mod:`.density`), listed once
in :mod:`.registry`, is a small class with one shape (:mod:`.spec`: its
``guard.json`` section, ``from_spec``, the offline ``fit``): ``adds_rows`` / ``extra_rows(x)`` (what it adds to the
model batch: STRIP's blends, nothing for the others), ``features_error(width)``,
``scores(view)`` (one number per input, from the
model's outputs on the batch) and ``side`` (which tail is suspicious). None owns a
false-rejection budget: :class:`.verdict.OneBudget` turns their scores into
conformal p-values against the same clean calibration images and combines them
into one p-value per input, flagged at the bundle's single budget.
"""

from guard.screens.activation import ActivationFilter
from guard.screens.common import (
    BLEND_RULES,
    answered_with,
    blend,
    entropy,
    softmax,
    softmax_entropy,
)
from guard.screens.density import KnnDensity, MahalanobisDensity
from guard.screens.screen import ModelView, Screen, ScreenResult
from guard.screens.strip import StripScreen
from guard.screens.verdict import COMBINE_RULES, Judgement, OneBudget, guarantee

__all__ = [
    "BLEND_RULES", "COMBINE_RULES", "ActivationFilter", "Judgement", "KnnDensity", "MahalanobisDensity",
    "ModelView", "OneBudget", "Screen", "ScreenResult", "StripScreen", "answered_with", "blend", "entropy",
    "guarantee", "softmax", "softmax_entropy",
]
