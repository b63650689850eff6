"""The guard's detectors, listed once.

The bundle schema (one ``guard.json`` section each), loading a bundle, the
offline calibration (``fit``), the patch job's bundle files, the CLIs'
``--detectors`` and the metrics (one score histogram each) all loop over
:data:`DETECTORS`. Adding a detector is one class (see :mod:`guard.screens.spec`
for its shape) and one line here.
"""

from __future__ import annotations

from guard.screens.activation import ActivationFilter
from guard.screens.density import KnnDensity, MahalanobisDensity
from guard.screens.ibdpsc import IbdPscScreen
from guard.screens.scaleup import ScaleUpScreen
from guard.screens.strip import StripScreen

# in the order of the manifest's sections
DETECTORS: tuple[type, ...] = (StripScreen, ActivationFilter, KnnDensity, MahalanobisDensity, ScaleUpScreen,
                               IbdPscScreen)
BY_NAME: dict[str, type] = {d.name: d for d in DETECTORS}
# fitted from clean data alone: what --detectors chooses from (the others need the scan's reversed trigger)
TRIGGER_FREE: tuple[str, ...] = tuple(d.name for d in DETECTORS if d.trigger_free)


def detector(name: str) -> type:
    """The detector class named ``name``; ValueError naming the choices otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown detector '{name}' (one of {', '.join(BY_NAME)})") from None
