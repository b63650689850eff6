"""One verdict from every detector, at one false-rejection budget, with a finite-sample guarantee.

Every detector is scored on the same clean calibration images. For an input
``t`` the guard forms the bag of the n calibration images plus ``t``; within
the bag each point gets, per detector, the rank p-value of its score (the share
of the bag at least as suspicious), and the detectors' p-values are combined
into one statistic (:data:`COMBINE_RULES`: Fisher's -sum log p, the min-p rule
-min log p, or the Cauchy combination of Liu & Xie with p-values clipped at 1/2).
The input's combined p-value is the share of the bag whose statistic is at
least as large as its own. The statistic is a symmetric function of the bag, so
for a clean input (exchangeable with the calibration images) the combined
p-value is uniform on {1/(n+1), ..., 1}: flagging at p <= R refuses at most
floor(R (n + 1)) / (n + 1) <= R of clean traffic in expectation, whatever the
detectors are and however their scores depend on each other. This is full
conformal prediction; the bag's ranks only move by the input's own indicators,
so one input costs O(n D) comparisons and nothing is refitted.

Ranks inside the bag are coarse where it matters: with n = 500 and a 1 % budget
only 5 of the 501 points may be refused, and the top ranks of different
detectors tie, so a detector must put an input among its top two or so on its
own. With ``reference`` scores (each detector's clean scores on images that are
neither calibration images nor traffic: the fit split) the verdict is split
conformal instead: each score becomes a tail probability against the
reference (its empirical survival, with an exponential tail fitted to the top
tenth beyond it, so it does not floor at the reference's maximum), the rule
combines those, and the input's p-value is its statistic's rank among the
calibration images' statistics. Tail probabilities and statistics are computed
as logarithms: far beyond the reference a probability underflows to 0, and a
clean calibration outlier and a triggered input would tie there (the input
then answered); their logarithms keep them apart. The transform depends on the reference alone,
so calibration images and clean traffic stay exchangeable and the guarantee is
the same; no ties, and one input costs O(D log m + log n).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from guard.screens.common import answered_with

# How the detectors' p-values combine into the bag's statistic, each a symmetric function of one point's p-values:
# - fisher: -sum log p. Every detector counts, so an unremarkable p-value dilutes a strong one: a rank p-value
#   bottoms out at 1/(n+1), and one detector at its floor adds at most log(n+1) against the others' share.
# - min: -min log p. One detector is enough; the price is a factor of up to D on each detector's p-value.
# - cauchy: mean of tan((1/2 - p) pi) over p clipped at 1/2 (Liu & Xie, JASA 2020). Its tail is as heavy
#   as the smallest p-value's, so one strong detector is enough as under min, several moderate ones add up as
#   under Fisher, and a p-value above 1/2 (a detector blind to this trigger, or looking at its other tail)
#   adds nothing instead of pulling the sum back.
# - fisher-cauchy (fitted p-values only): the more significant of the two, each statistic first turned into a
#   tail probability among the reference images' own statistics. Fisher wins where several detectors agree a
#   little (adaptive-blend, invisible triggers), Cauchy where one is sure and another looks the other way
#   (WaNet, all-to-all); this pays at most a factor of two for not knowing which.
COMBINE_RULES = ("cauchy", "fisher", "fisher-cauchy", "min")
FITTED_ONLY = ("fisher-cauchy",)
SIDES = ("low", "high")
P_VALUES = ("bag", "fitted")  # ranks inside the bag of calibration images, or tail probabilities against a reference
_CHUNK = 256
TAIL = 0.1  # the share of the reference above which the tail is fitted


def _survival(columns: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Per column, the share (+1 smoothed) of the sorted reference at or above each value: ``columns`` the D
    sorted reference columns (contiguous, m each: a strided column would be copied by every search), x (B, D)."""
    m = len(columns[0])
    below = np.empty(x.shape)
    for j, column in enumerate(columns):
        below[:, j] = column.searchsorted(x[:, j], side="left")
    return (m - below + 1) / (m + 1)


def _cauchy_evidence(p: np.ndarray) -> np.ndarray:
    """Liu & Xie's Cauchy transform of p-values clipped at 1/2: 0 for p >= 1/2, growing as 1/(pi p) near 0."""
    return np.tan((0.5 - np.minimum(p, 0.5)) * np.pi)


_SMALL_LOG_P = np.log(1e-6)  # below it tan((1/2 - p) pi) = 1 / (pi p) to float precision


def _log_cauchy_statistic(log_p: np.ndarray) -> np.ndarray:
    """log of the Cauchy statistic (the sum of :func:`_cauchy_evidence` over the last axis) from log p-values,
    without overflow: a p-value of 1e-400 still counts more than one of 1e-300. -inf when every p >= 1/2."""
    with np.errstate(divide="ignore"):
        body = np.log(_cauchy_evidence(np.exp(np.maximum(log_p, _SMALL_LOG_P))))
    terms = np.where(log_p < _SMALL_LOG_P, -log_p - np.log(np.pi), body)
    top = terms.max(axis=-1, keepdims=True)
    finite = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (finite + np.log(np.exp(terms - finite).sum(axis=-1, keepdims=True)))[..., 0]


class TailProbability:
    """Per detector, a score's probability of being matched or exceeded by a clean one, from reference scores.

    Empirical survival (with +1 smoothing) in the body; above the reference's top ``TAIL`` share an
    exponential tail with the mean excess of the scores there, so that scores beyond every reference keep
    getting smaller probabilities instead of all sharing the floor 1/(m+1). ``reference`` is (m, D),
    oriented so that high is suspicious. :meth:`log` gives the log-probabilities, which never floor: far out
    in the tail the probabilities underflow (a clean outlier and a triggered input would both read 0 and tie),
    their logarithms keep their order.
    """

    def __init__(self, reference: np.ndarray) -> None:
        self.sorted = np.sort(np.asarray(reference, dtype=np.float64), axis=0)
        m = len(self.sorted)
        if m < 20:
            raise ValueError(f"fitted p-values need at least 20 reference scores per detector, got {m}")
        self.columns = [np.ascontiguousarray(self.sorted[:, j]) for j in range(self.sorted.shape[1])]
        self.knee = self.sorted[int(np.floor((1 - TAIL) * m))]  # (D,)
        self.knee_p = _survival(self.columns, self.knee[None])[0]
        above = self.sorted > self.knee
        excess = np.where(above, self.sorted - self.knee, 0.0).sum(axis=0) / np.maximum(above.sum(axis=0), 1)
        self.scale = np.maximum(excess, 1e-12)

    def log(self, oriented: np.ndarray) -> np.ndarray:
        body = np.log(_survival(self.columns, oriented))
        tail = np.log(self.knee_p) - np.maximum(oriented - self.knee, 0.0) / self.scale
        return np.where(oriented > self.knee, np.minimum(body, tail), body)

    def __call__(self, oriented: np.ndarray) -> np.ndarray:
        return np.exp(self.log(oriented))


def guarantee(n: int, rate: float) -> dict[str, float | int]:
    """What ``n`` calibration images can promise at budget ``rate``.

    ``flag_rank``: how many of the n+1 bag ranks refuse (0: the guard can never
    refuse anything); ``expected_frr``: the clean refusal rate it guarantees in
    expectation over the calibration draw; ``smallest_frr``: the smallest
    non-zero budget this n can express.
    """
    k = int(math.floor(rate * (n + 1) + 1e-9))
    return {"calibration_images": int(n), "flag_rank": k, "expected_frr": k / (n + 1), "smallest_frr": 1 / (n + 1)}


@dataclass
class Judgement:
    """The verdict on a batch: combined p-value, each detector's p-value, and which inputs are refused."""

    names: tuple[str, ...]
    p_value: np.ndarray  # (B,)
    p_values: np.ndarray  # (B, D)
    flagged: np.ndarray  # (B,)
    rate: float

    def detectors_of(self, i: int) -> tuple[str, ...]:
        """The detectors behind a flagged input: those at or below the budget on their own, else the strongest."""
        p = self.p_values[i]
        own = tuple(n for n, v in zip(self.names, p, strict=True) if v <= self.rate)
        return own or (self.names[int(np.argmin(p))],)


@dataclass
class OneBudget:
    names: tuple[str, ...]
    sides: tuple[str, ...]
    calibration: np.ndarray  # (n, D) raw clean calibration scores, one column per detector
    frr: float
    rule: str = "fisher"
    # scope: only inputs answered with one of these classes can be refused (empty: every input); the budget
    # is then spent on the calibration images answered with them, at the rate that costs ``frr`` overall
    classes: tuple[int, ...] = ()
    calibration_classes: np.ndarray | None = None  # (n,) the class the model answered each calibration image with
    alone: tuple[float | None, ...] = ()  # expert override: a detector that also refuses on its own at this rate
    # (m, D) raw clean scores on images other than the calibration ones: p-values become tail probabilities
    # against them and the verdict split conformal (see the module's docstring); None: ranks inside the bag
    reference: np.ndarray | None = None
    _c: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.rule not in COMBINE_RULES:
            raise ValueError(f"unknown combination rule '{self.rule}' (one of {', '.join(COMBINE_RULES)})")
        bad = [s for s in self.sides if s not in SIDES]
        if bad or len(self.sides) != len(self.names):
            raise ValueError(f"each detector needs a side, one of {SIDES} (got {list(self.sides)})")
        cal = np.asarray(self.calibration, dtype=np.float64).reshape(-1, len(self.names))
        if not 0 < self.frr < 1:
            raise ValueError(f"the false-rejection budget must lie in (0, 1), got {self.frr}")
        self.rate = self.frr
        if self.classes:
            if self.calibration_classes is None or len(self.calibration_classes) != len(cal):
                raise ValueError("a budget scoped to classes needs the class of every calibration image")
            inside = answered_with(np.asarray(self.calibration_classes), self.classes)
            if not inside.any():
                raise ValueError(f"no calibration image is answered with class(es) {list(self.classes)}")
            self.rate = min(1.0, self.frr * len(cal) / int(inside.sum()))
            cal = cal[inside]
        if not len(cal):
            raise ValueError("the verdict needs at least one calibration image")
        self.alone = tuple(self.alone) or (None,) * len(self.names)
        self._c = self._orient(cal)
        self.n = len(self._c)
        self.guarantee = guarantee(self.n, self.rate)
        self._tail = None if self.reference is None else TailProbability(self._orient(self.reference))
        if self._tail is None:
            if self.rule in FITTED_ONLY:
                raise ValueError(f"the {self.rule} rule needs fitted p-values (reference scores)")
            self._sorted = np.sort(self._c, axis=0)
            self_counts = self._at_least(self._c)  # (n, D), each image counts itself
            # each calibration image's per-detector evidence in the bag, without and with the input above it
            self._e_without = self._evidence(self_counts / (self.n + 1))
            self._e_with = self._evidence((self_counts + 1) / (self.n + 1))
        else:
            if self.rule in FITTED_ONLY:  # each rule's statistic as a tail probability among the reference's
                self._rule_tail = TailProbability(self._log_rules(self._tail.log(self._orient(self.reference))))
            # the calibration images' statistics, sorted: the input's rank among them
            self._cal_stat = np.sort(self._fitted_statistic(self._tail.log(self._c)))

    def _orient(self, scores: np.ndarray) -> np.ndarray:
        """Scores with high = suspicious for every detector."""
        sign = np.array([-1.0 if s == "low" else 1.0 for s in self.sides])
        return np.asarray(scores, dtype=np.float64).reshape(-1, len(self.names)) * sign

    def _at_least(self, oriented: np.ndarray) -> np.ndarray:
        """Per detector, how many calibration scores are at least as suspicious as each score."""
        return np.stack([self.n - np.searchsorted(self._sorted[:, d], oriented[:, d], side="left")
                         for d in range(len(self.names))], axis=1).astype(np.float64)

    def _evidence(self, p: np.ndarray) -> np.ndarray:
        """Each p-value as the rule's evidence against a clean input (larger: more suspicious)."""
        return _cauchy_evidence(p) if self.rule == "cauchy" else -np.log(p)

    def _statistic(self, evidence: np.ndarray) -> np.ndarray:
        return evidence.max(axis=-1) if self.rule == "min" else evidence.sum(axis=-1)

    @staticmethod
    def _log_rules(log_p: np.ndarray) -> np.ndarray:
        """Fisher's statistic and the log of Cauchy's, of each row of log p-values: (B, 2) (both increasing in
        the evidence, so their tail probabilities are those of the statistics themselves)."""
        return np.stack([-log_p.sum(axis=-1), _log_cauchy_statistic(log_p)], axis=-1)

    def _fitted_statistic(self, log_p: np.ndarray) -> np.ndarray:
        """The rule's statistic from fitted log p-values, computed so that none saturates."""
        if self.rule in FITTED_ONLY:
            return -self._rule_tail.log(self._log_rules(log_p)).min(axis=-1)
        if self.rule == "cauchy":
            return _log_cauchy_statistic(log_p)
        return self._statistic(-log_p)  # Fisher's and min's evidence is -log p itself

    def judge(self, scores: np.ndarray, predicted: np.ndarray | None = None) -> Judgement:
        """The verdict on raw scores (B, D); ``predicted`` (B,) is needed when the budget is scoped."""
        s = self._orient(scores)
        if self._tail is not None:
            log_p = self._tail.log(s)
            p_each = np.exp(log_p)
            own = self._fitted_statistic(log_p)
            combined = (1 + self.n - np.searchsorted(self._cal_stat, own - 1e-9, side="left")) / (self.n + 1)
            return self._flag(combined, p_each, predicted)
        p_each = (self._at_least(s) + 1) / (self.n + 1)
        combined = np.empty(len(s))
        for lo in range(0, len(s), _CHUNK):
            part = s[lo:lo + _CHUNK]
            # the calibration images' statistics in the bag that holds this input: (b, n)
            bag = self._statistic(np.where(part[:, None, :] >= self._c[None], self._e_with, self._e_without))
            own = self._statistic(self._evidence(p_each[lo:lo + _CHUNK]))
            combined[lo:lo + _CHUNK] = (1 + (bag >= own[:, None] - 1e-9).sum(axis=1)) / (self.n + 1)
        return self._flag(combined, p_each, predicted)

    def _flag(self, combined: np.ndarray, p_each: np.ndarray, predicted: np.ndarray | None) -> Judgement:
        flagged = combined <= self.rate + 1e-12
        if self.classes:
            if predicted is None:
                raise ValueError("a verdict scoped to classes needs the model's answers")
            flagged &= answered_with(predicted, self.classes)
        for d, rate in enumerate(self.alone):
            if rate is not None:
                flagged |= p_each[:, d] <= rate + 1e-12
        return Judgement(self.names, combined, p_each, flagged, self.rate)

