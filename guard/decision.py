"""What the guard decided about a request: the types the data plane returns and the transport encodes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from guard.errors import GuardError


@dataclass
class InputVerdict:
    """The verdict on one input: the combined p-value, and each detector's score and p-value."""

    flagged: bool
    detectors: tuple[str, ...]  # the evidence behind a refusal (empty when not flagged)
    p_value: float
    scores: dict[str, float]  # by score name (strip_entropy, knn_distance, ...)
    p_values: dict[str, float]  # by detector name


@dataclass
class Decision:
    """What the guard decided about one request."""

    logits: np.ndarray  # (B, K)
    features: np.ndarray  # (B, D)
    inputs: list[InputVerdict] = field(default_factory=list)  # empty when unscreened
    screened: bool = True
    action: str = "answered"  # answered | refused
    policy: str = "enforce"
    bundle_sha256: str = ""
    columns: tuple[str, ...] = ()  # of the guard_scores output: the combined p-value, scores, p-values


    @property
    def flagged(self) -> bool:
        return any(v.flagged for v in self.inputs)

    @property
    def verdict(self) -> str:
        return "unscreened" if not self.screened else "flagged" if self.flagged else "clean"

    @property
    def detectors(self) -> tuple[str, ...]:
        return tuple(sorted({d for v in self.inputs for d in v.detectors}))


class Refused(GuardError):
    """A flagged request under the ``enforce`` policy."""

    code = "PERMISSION_DENIED"
    reason = "refused"

    def __init__(self, decision: Decision, expose_scores: bool = False) -> None:
        by = f" by {' and '.join(decision.detectors)}" if expose_scores else ""  # which detector: an oracle too
        super().__init__(f"refused by trojan-guard: input flagged as triggered{by} (policy enforce, bundle "
                         f"{decision.bundle_sha256[:12]})")
        self.decision = decision
