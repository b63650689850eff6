"""Repair a backdoored model in place, and measure it before and after.

Each method changes a :class:`~offline.models.ForensicModel` in place and
:func:`repair` returns a :class:`RepairReport` with clean accuracy, the share
of clean answers left unchanged, and the success rate of the reversed trigger
(and of the true trigger, in evaluation mode) before and after. Every method
stops by the same rules on the selection split: the reversed trigger's success
rate below ``asr_bound``, clean accuracy within ``accuracy_budget``.

- ``unlearn``, ``prune``, ``fine-prune``: :mod:`offline.patch.repair.classic`;
- ``anp``: adversarial neuron pruning, :mod:`offline.patch.repair.anp`;
- ``i-bau``: implicit backdoor adversarial unlearning, :mod:`offline.patch.repair.ibau`;
- ``nad``: neural attention distillation, :mod:`offline.patch.repair.nad`;
- ``auto`` (the default): the method :func:`default_method` picks for the
  number of images repair gets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from offline.errors import ForensicsError
from offline.models import ForensicModel
from offline.patch.repair.anp import anp
from offline.patch.repair.classic import fine_prune, last_conv_layer, prune, trigger_neuron_ranking, unlearn
from offline.patch.repair.core import Evaluator, Measure, RepairReport, grow_mask
from offline.patch.repair.ibau import ibau
from offline.patch.repair.nad import nad
from offline.patch.settings import ACCURACY_RULES, CLEAN_TARGETS, METHODS, OPTIMIZERS, RepairSettings

__all__ = ["ACCURACY_RULES", "CLEAN_TARGETS", "METHODS", "OPTIMIZERS", "Evaluator", "Measure", "RepairReport",
           "RepairSettings", "default_method", "grow_mask", "last_conv_layer", "repair", "trigger_neuron_ranking"]

Method = Callable[[ForensicModel, np.ndarray, np.ndarray, Evaluator, RepairSettings, Measure], dict[str, Any]]

_METHODS: dict[str, Method] = {
    "unlearn": unlearn,
    "anp": anp,
    "i-bau": ibau,
    "nad": nad,
    "prune": lambda model, x, _y, select, s, baseline: prune(model, x, select, s, baseline),
    "fine-prune": fine_prune,
    "none": lambda *_: {},
}
assert {*_METHODS, "auto"} == set(METHODS), "every method of core.METHODS needs its entry here"

# (fewest repair images, method): bench/bench_repair.py --clean-images 250,500,1000 (docs/lab/repair.md)
DEFAULT_BY_SIZE: tuple[tuple[int, str], ...] = ((0, "unlearn"),)


def default_method(images: int) -> tuple[str, str]:
    """The method ``auto`` runs with ``images`` repair images, and why."""
    method = next(m for least, m in sorted(DEFAULT_BY_SIZE, reverse=True) if images >= least)
    return method, f"the default for {images} repair images (docs/lab/repair.md: best measured at that size)"


def repair(model: ForensicModel, x_train: np.ndarray, y_train: np.ndarray, select: Evaluator,
           report: Evaluator | None = None, settings: RepairSettings | None = None) -> RepairReport:
    """Run the chosen repair on ``model`` (in place).

    ``select`` is the validation data the methods stop on; ``report``
    (default: ``select``) is where accuracy and ASR before and after are measured,
    so the reported figures can come from data no decision was made on.
    """
    s = settings or RepairSettings()
    checks = (("optimizer", s.optimizer, OPTIMIZERS), ("accuracy rule", s.accuracy_rule, ACCURACY_RULES),
              ("clean targets", s.unlearn_clean_targets, CLEAN_TARGETS), ("repair method", s.method, METHODS))
    for what, value, allowed in checks:
        if value not in allowed:
            raise ForensicsError(f"unknown {what} '{value}' (one of {', '.join(allowed)})")
    chosen = {}
    if s.method == "auto":
        method, why = default_method(len(x_train))
        s = replace(s, method=method)
        chosen = {"chosen_by": why}
    report = report or select
    select.remember(model)
    if report is not select:
        report.remember(model)
    before = report(model)
    details = _METHODS[s.method](model, x_train, y_train, select, s, select(model))
    return RepairReport(s.method, before, report(model), {"settings": asdict(s), **chosen, **details})
