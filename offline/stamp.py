"""Trigger stamping, the one function the attacks and the defences share.

``stamp(x, mask, pattern)`` applies a trigger given as a mask and a pattern:
BadNets patches, blended triggers and TrojanNN's optimised patch stamp this
way (:mod:`offline.attacks.triggers`), and so do Neural Cleanse's reversed
triggers in the scan, the repair, the calibration and the report's figures.
"""

from __future__ import annotations

from typing import TypeVar

Array = TypeVar("Array")  # numpy arrays and torch tensors alike


def stamp(x: Array, mask: Array, pattern: Array) -> Array:
    """Apply a trigger: ``(1 - mask) * x + mask * pattern``.

    ``x`` is (N, C, H, W); ``mask`` broadcasts against it ((1, H, W) or (H, W)
    shared by all channels) and ``pattern`` is (C, H, W). Works on numpy and
    torch alike, so attacks, the scan and repair stamp triggers the same way.
    """
    return (1 - mask) * x + mask * pattern
