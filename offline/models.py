"""Classifiers under investigation: the project's own CNN and the user's models.

A suspicious model comes as TorchScript (``.pt``/``.pth``) or ONNX (``.onnx``).
ONNX is converted to a differentiable torch module with onnx2torch and checked
against onnxruntime on real inputs before it is used. Either way the result is a
:class:`ForensicModel`: ``model(x)`` gives logits and ``model.features(x)`` the
activations of the features (penultimate) layer.
"""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from offline.errors import ModelLoadError

ONNX_VERIFY_TOL = 1e-4


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class SmallCNN(nn.Module):
    """The project's reference classifier for MNIST-sized images.

    ``body`` ends in the features layer (a ReLU over a 64-unit linear layer);
    ``head`` is the final linear layer.
    """

    def __init__(self, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10,
                 feature_dim: int = 64) -> None:
        super().__init__()
        channels, height, width = input_shape
        small = min(height, width) < 20
        k, pad = (3, 1) if small else (5, 0)
        self.body = nn.Sequential(
            nn.Conv2d(channels, 8, k, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, k, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.body(torch.zeros(1, *input_shape)).shape[1]
        self.body.append(nn.Linear(flat, feature_dim))
        self.body.append(nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ForensicModel(nn.Module):
    """Logits plus the activations of one named layer (the features layer).

    Eager and onnx2torch (torch.fx) modules are split with a forward hook, so
    any topology works. TorchScript runs compiled code that ignores hooks, so it
    is split by running its top-level children in order; the split is verified
    to reproduce the model's own output.
    """

    def __init__(self, net: nn.Module, features_layer: str, *, sequential: bool = False,
                 output_index: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.features_layer = features_layer
        self.sequential = sequential
        self.output_index = output_index
        self._captured: torch.Tensor | None = None
        modules = dict(net.named_modules())
        if features_layer not in modules or features_layer == "":
            names = [n for n in modules if n]
            raise ModelLoadError(
                f"features layer '{features_layer}' does not exist; layers are: {', '.join(names[:40])}"
                + (" ..." if len(names) > 40 else "")
            )
        if not sequential:
            modules[features_layer].register_forward_hook(self._capture)
        for p in self.net.parameters():
            p.requires_grad_(False)

    def _capture(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        self._captured = output

    def _select(self, out: object) -> torch.Tensor:
        if isinstance(out, (tuple, list)):
            return out[self.output_index or 0]
        return out  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._select(self.net(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sequential:
            feats = None
            h = x
            for name, child in self.net.named_children():
                h = child(h)
                if name == self.features_layer:
                    feats = h
            assert feats is not None
            return feats.flatten(1), self._select(h)
        self._captured = None
        logits = self.forward(x)
        if self._captured is None:
            raise ModelLoadError(f"features layer '{self.features_layer}' is not used by the forward pass")
        return self._captured.flatten(1), logits

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[0]

    @torch.no_grad()
    def predict(self, x: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Predicted class indices for a numpy or torch batch."""
        self.eval()
        xt = torch.as_tensor(x, dtype=torch.float32)
        return torch.cat([self(xt[i:i + batch_size]).argmax(1) for i in range(0, len(xt), batch_size)]).numpy()


def default_features_layer(net: nn.Module) -> str:
    """The module whose output feeds the last linear layer: the penultimate layer."""
    names = [name for name, _ in net.named_modules()]
    linear = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ModelLoadError("cannot find a linear output layer; name the features layer with --features-layer")
    last = names.index(linear[-1])
    # walk back to the nearest preceding leaf module (a ReLU, Flatten, Linear ...)
    modules = dict(net.named_modules())
    for name in reversed(names[:last]):
        if name and not list(modules[name].children()):
            return name
    raise ModelLoadError("the model has no layer before its output layer; name one with --features-layer")


def _does_not_fit(sample: torch.Tensor, exc: Exception) -> ModelLoadError:
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
    return ModelLoadError(
        f"the model fails on data of shape {tuple(sample.shape)} ({first_line}); "
        "check that the data matches the model's input"
    )


def _script_children_split(net: torch.jit.ScriptModule, features_layer: str | None,
                           sample: torch.Tensor) -> str:
    """Pick and verify a top-level child of a TorchScript model as the features layer."""
    children = [name for name, _ in net.named_children()]
    if len(children) < 2:
        raise ModelLoadError(
            "this TorchScript model cannot be split into features and output layers "
            "(fewer than two top-level modules); export it to ONNX instead"
        )
    layer = features_layer or children[-2]
    if layer not in children:
        if layer in dict(net.named_modules()):
            raise ModelLoadError(
                f"features layer '{layer}' is nested inside a TorchScript module; name one of its "
                f"top-level modules ({', '.join(children)}) or export the model to ONNX"
            )
        raise ModelLoadError(f"features layer '{layer}' does not exist; top-level layers are: {', '.join(children)}")
    with torch.no_grad():
        try:
            full = net(sample)
        except Exception as exc:
            raise _does_not_fit(sample, exc) from exc
        h = sample
        for _, child in net.named_children():
            h = child(h)
    full = full[0] if isinstance(full, (tuple, list)) else full
    if h.shape != full.shape or not torch.allclose(h, full, atol=1e-5):
        raise ModelLoadError(
            "this TorchScript model does not run its top-level modules in order, so its features "
            "layer cannot be isolated; export it to ONNX instead"
        )
    return layer


def _import_onnx2torch() -> types.ModuleType:
    """Import onnx2torch even where torchvision cannot load.

    onnx2torch imports torchvision only for the NMS and RoIAlign operators,
    which classifiers do not use. The PyPI torchvision wheel fails to load beside
    a CPU-only torch build, so fall back to a placeholder that raises on use.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or present but broken ("operator torchvision::nms does not exist")
        placeholder = types.ModuleType("torchvision")
        ops = types.ModuleType("torchvision.ops")

        def _unavailable(*_args: object, **_kwargs: object) -> None:
            raise ModelLoadError("this model uses NMS/RoIAlign, which need a working torchvision")

        ops.roi_align = ops.nms = ops.box_convert = _unavailable  # type: ignore[attr-defined]
        placeholder.ops = ops  # type: ignore[attr-defined]
        sys.modules["torchvision"] = placeholder
        sys.modules["torchvision.ops"] = ops
    import onnx2torch

    return onnx2torch


def _load_onnx(path: Path, sample: np.ndarray) -> tuple[nn.Module, int, list[str]]:
    """Convert ONNX to torch and verify it against onnxruntime on ``sample``."""
    import onnx
    import onnxruntime as ort

    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX model ({str(exc).splitlines()[0]})") from exc
    outputs = [o.name for o in proto.graph.output]
    output_index = outputs.index("logits") if "logits" in outputs else 0
    try:
        net = _import_onnx2torch().convert(proto)
    except Exception as exc:
        raise ModelLoadError(f"{path}: onnx2torch cannot convert this model ({exc})") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    try:
        expected = session.run([outputs[output_index]], {input_name: sample.astype(np.float32)})[0]
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: onnxruntime cannot run the model on data of shape {sample.shape} ({exc}); "
            "check that the data matches the model's input"
        ) from exc
    with torch.no_grad():
        got = net(torch.from_numpy(sample))
    got = got[output_index] if isinstance(got, (tuple, list)) else got
    err = float(np.abs(got.numpy() - expected).max())
    if not err <= ONNX_VERIFY_TOL:
        raise ModelLoadError(
            f"{path}: the torch conversion disagrees with onnxruntime (max abs error {err:.2e} > "
            f"{ONNX_VERIFY_TOL:g}); the model uses an operator onnx2torch does not reproduce"
        )
    return net, output_index, outputs


def load_model(path: str | Path, sample: np.ndarray, features_layer: str | None = None) -> ForensicModel:
    """Load a TorchScript or ONNX classifier as a :class:`ForensicModel`.

    Parameters
    ----------
    path:
        ``.pt``/``.pth`` (TorchScript) or ``.onnx`` file.
    sample:
        A few real inputs (N, C, H, W) used to verify the model runs on the data
        and, for ONNX, that the conversion matches onnxruntime.
    features_layer:
        Name of the layer whose output is the features representation; by
        default the layer that feeds the last linear layer.

    Raises
    ------
    ModelLoadError
        Missing, corrupt or unsupported model; unknown features layer; a model
        whose input does not match the data.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file '{path}' not found")
    sample_t = torch.from_numpy(np.ascontiguousarray(sample[:8], dtype=np.float32))
    if path.suffix.lower() == ".onnx":
        net, output_index, outputs = _load_onnx(path, sample_t.numpy())
        if "features" in outputs and features_layer in (None, "features"):
            model: ForensicModel = _DualOutputModel(net, output_index, outputs.index("features"))
        else:
            layer = features_layer or default_features_layer(net)
            model = ForensicModel(net, layer, output_index=output_index)
    elif path.suffix.lower() in (".pt", ".pth", ".ts"):
        try:
            net = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(
                f"{path}: not a TorchScript model ({str(exc).splitlines()[0]}); save it with "
                "torch.jit.script(model).save(path) or export it to ONNX"
            ) from exc
        net.eval()
        layer = _script_children_split(net, features_layer, sample_t)
        model = ForensicModel(net, layer, sequential=True)
    else:
        raise ModelLoadError(f"{path}: unsupported model format '{path.suffix}'; use .pt (TorchScript) or .onnx")
    model.eval()
    try:
        with torch.no_grad():
            feats, logits = model.features_and_logits(sample_t)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise _does_not_fit(sample_t, exc) from exc
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ModelLoadError(f"{path}: expected logits of shape (N, classes>=2), got {tuple(logits.shape)}")
    return model


class _DualOutputModel(ForensicModel):
    """An ONNX bundle model whose graph itself outputs ``logits`` and ``features``."""

    def __init__(self, net: nn.Module, output_index: int, features_index: int) -> None:
        nn.Module.__init__(self)
        self.net = net
        self.features_layer = "features"
        self.sequential = False
        self.output_index = output_index
        self.features_index = features_index
        for p in self.net.parameters():
            p.requires_grad_(False)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x)
        return out[self.features_index].flatten(1), out[self.output_index]


def save_torchscript(net: nn.Module, path: str | Path) -> None:
    """Save an eager module as TorchScript (what ``load_model`` reads back)."""
    net.eval()
    torch.jit.script(net).save(str(path))
