"""Neural attention distillation (NAD; Li et al., ICLR 2021).

A teacher, the backdoored model fine-tuned on the clean images for
``nad_teacher_epochs``, has weakened the backdoor but lost some accuracy. The
student, the backdoored model again, is fine-tuned on the same images with
cross-entropy plus ``nad_beta`` times the distance between its attention maps
and the teacher's at every convolutional layer (the mean over channels of
the squared activation, normalised), which pulls the trigger's neurons back
to what clean inputs call for while the labels keep the accuracy. The student
stops by the job's rule on the selection split. Models without a convolution
distill at their features layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from offline.models import ForensicModel
from offline.patch.repair.core import EpochKeeper, Evaluator, Measure, RepairSettings, conv_layers, fine_tune


def attention(out: torch.Tensor) -> torch.Tensor:
    """A layer's attention map: the mean over channels of the squared activation, flattened, unit length."""
    a = out.pow(2).mean(1) if out.dim() > 2 else out.pow(2)
    return F.normalize(a.flatten(1), dim=1)


def attention_layers(model: ForensicModel) -> list[str]:
    return conv_layers(model) or [model.features_layer]


def nad(model: ForensicModel, x: np.ndarray, y: np.ndarray, select: Evaluator, s: RepairSettings,
        baseline: Measure) -> dict[str, Any]:
    layers = attention_layers(model)
    keeper = EpochKeeper(model, select, s, baseline, s.unlearn_accuracy_tolerance)  # holds the weights to start from
    fine_tune(model, x, y, s.nad_teacher_epochs, s)
    teacher = select(model)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        maps = {layer: [] for layer in layers}
        for i in range(0, len(x), 256):
            for layer, out in model.tapped(xt[i:i + 256], layers)[1].items():
                maps[layer].append(attention(out))
        targets = {layer: torch.cat(parts) for layer, parts in maps.items()}
    model.load_state_dict(keeper.start)  # the student starts from the backdoored model

    def loss(student: ForensicModel, xb: torch.Tensor, yb: torch.Tensor, b: np.ndarray) -> torch.Tensor:
        logits, outputs = student.tapped(xb, layers)
        index = torch.from_numpy(b)
        distill = sum((attention(out) - targets[layer][index]).pow(2).mean() for layer, out in outputs.items())
        return F.cross_entropy(logits, yb) + s.nad_beta * distill

    fine_tune(model, x, y, s.nad_epochs, s, stop=keeper, loss_fn=loss)
    return {"layers": layers, "teacher": {"accuracy": teacher.accuracy, "reversed_asr": teacher.reversed_asr},
            **keeper.finish()}
