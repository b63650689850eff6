"""Export the (patched) model as ONNX with two outputs, ``logits`` and ``features``."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from offline.errors import ForensicsError
from offline.models import ForensicModel, shaped_mask

OPSET = 17
INPUT_NAME = "input"
EXPORT_TOLERANCE = 1e-4


class _TwoOutputs(nn.Module):
    def __init__(self, model: ForensicModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.model.features_and_logits(x)
        return logits, features


class _ScriptedLeaves(nn.Module):
    """TorchScript leaves run in order, masks applied, as a scripted module.

    Tracing cannot step into TorchScript submodules called one by one, so a
    TorchScript model is exported through this scripted wrapper instead.
    """

    def __init__(self, model: ForensicModel, sample: torch.Tensor) -> None:
        super().__init__()
        assert model.leaves is not None
        names = [name for name, _ in model.leaves]
        self.mods = nn.ModuleList([leaf for _, leaf in model.leaves])
        self.features_index = names.index(model.features_layer)
        masks, has_mask = [], []
        with torch.no_grad():
            h = sample
            for name, leaf in model.leaves:
                h = leaf(h)
                mask = model.output_masks.get(name)
                has_mask.append(mask is not None)
                masks.append(shaped_mask(mask, h).clone() if mask is not None else torch.ones(1))
                if mask is not None:
                    h = h * masks[-1]
        self.masks: list[torch.Tensor] = masks
        self.has_mask: list[bool] = has_mask

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        features = x
        for i, leaf in enumerate(self.mods):
            h = leaf(h)
            if self.has_mask[i]:
                h = h * self.masks[i]
            if i == self.features_index:
                features = h
        return h, features.flatten(1)


def export_onnx(model: ForensicModel, path: str | Path, x_check: np.ndarray) -> float:
    """Write ``model`` (with its pruning masks) to ``path`` and check it against torch.

    Returns the max absolute logits difference between onnxruntime and torch on
    ``x_check``; raises :class:`ForensicsError` if it exceeds 1e-4.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    model.eval()
    sample = torch.from_numpy(np.ascontiguousarray(x_check[:2], dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # eval() before scripting: a fresh wrapper is in training mode, and scripted BatchNorm leaves would export
        # with batch statistics
        wrapper = (_TwoOutputs(model) if model.leaves is None
                   else torch.jit.script(_ScriptedLeaves(model, sample).eval()))
        torch.onnx.export(
            wrapper, (sample,), str(path), input_names=[INPUT_NAME],
            output_names=["logits", "features"], opset_version=OPSET, dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
        )
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        feats, logits = model.features_and_logits(torch.from_numpy(x_check))
    got_logits, got_feats = session.run(["logits", "features"], {INPUT_NAME: x_check})
    err = float(np.abs(got_logits - logits.numpy()).max())
    feat_err = float(np.abs(got_feats - feats.numpy()).max())
    if not (err <= EXPORT_TOLERANCE and feat_err <= EXPORT_TOLERANCE * max(1.0, float(feats.abs().max()))):
        raise ForensicsError(
            f"the ONNX export disagrees with torch (max abs error {err:.2e} on logits, {feat_err:.2e} on "
            f"features; tolerance {EXPORT_TOLERANCE:g}); the model uses an operator that does not export"
        )
    return err
