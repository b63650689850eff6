"""IBD-PSC (Hou et al., ICML 2024): parameter-oriented scaling consistency.

The bundle's model carries, beside ``logits`` and ``features``, the logits of a few variants of itself whose last
BatchNorm layers are amplified (``offline.patch.ibdpsc`` writes them into the same ONNX graph). A clean input's answer
drifts under amplification; a triggered one keeps the backdoor's. The score is the mean probability of the
answered class over the variants, standardised within that class on clean fit images: the high tail is
suspicious. It costs no extra rows, only the variants' share of the graph, computed in the same model call; it
needs a model with BatchNorm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from guard.screens.common import class_statistics, softmax, within_class
from guard.screens.spec import ByClassSpec, FitData, Fitted


class IbdPscSpec(ByClassSpec):
    section: ClassVar[str] = "ibd_psc"
    outputs: list[str] = Field(min_length=1, description="the model's outputs holding the amplified variants' logits")
    counts: list[int] = Field(min_length=1, description="BatchNorm layers each variant amplifies, from the logits back")
    omega: float = Field(gt=1, description="the amplification of the BatchNorm weights and biases")

    def check(self, num_classes: int) -> None:
        if len(self.outputs) != len(self.counts):
            raise ValueError("ibd_psc.outputs and counts must pair up")
        super().check(num_classes)

    def describe(self, bundle: Any) -> str:
        return f"{len(self.outputs)} variants amplifying the last {self.counts} BatchNorm layers x{self.omega:g}"


@dataclass
class IbdPscScreen:
    outputs: tuple[str, ...]
    class_mean: np.ndarray | None = None
    class_std: np.ndarray | None = None

    name = section = "ibd_psc"
    Spec = IbdPscSpec
    score_name = "ibd_psc_consistency"
    score_help = ("IBD-PSC score of each input: mean probability of the predicted class over the amplified-BatchNorm "
                  "variants, standardised within the predicted class")
    side = "high"
    adds_rows = False
    trigger_free = True

    @property
    def model_outputs(self) -> tuple[str, ...]:
        """The model outputs this detector reads besides logits and features."""
        return self.outputs

    @classmethod
    def from_spec(cls, spec: IbdPscSpec, arrays: dict[str, np.ndarray], bundle: Any, seed: int = 0,
                  sequential: bool = True) -> IbdPscScreen:
        return cls(tuple(spec.outputs), **spec.class_arrays())

    @classmethod
    def fit(cls, data: FitData, settings: Any) -> Fitted:
        """The variants come with the exported model (``data.model_outputs['ibd_psc']``); the per-class clean
        statistics come from the fit split."""
        variants = data.model_outputs.get("ibd_psc")
        if not variants:
            raise ValueError("the exported model has no amplified-BatchNorm outputs: ibd_psc needs a model with "
                             "BatchNorm, exported by a patch job that chose ibd_psc")
        raw = cls(tuple(variants["outputs"]))
        predicted = data.fit_predicted
        scores = raw.consistency(data.infer(data.x_fit)[2], predicted)
        mean, std = class_statistics(scores, predicted, data.num_classes)
        section = {"outputs": list(variants["outputs"]), "counts": list(variants["counts"]),
                   "omega": variants["omega"], "class_mean": mean.tolist(), "class_std": std.tolist()}
        return Fitted(cls(raw.outputs, mean, std), section, {k: v for k, v in variants.items() if k != "outputs"})

    def features_error(self, width: int) -> str | None:
        return None

    def consistency(self, extra: dict[str, np.ndarray], predicted: np.ndarray) -> np.ndarray:
        """Mean probability of each input's predicted class over the variants' logits."""
        rows = np.arange(len(predicted))
        return np.mean([softmax(extra[o].astype(np.float64))[rows, predicted] for o in self.outputs], axis=0)

    def scores(self, view) -> np.ndarray:
        return within_class(self.consistency(view.extra_outputs, view.predicted), view.predicted,
                            self.class_mean, self.class_std)
