"""Classifiers under investigation: the project's own CNN and the user's models.

A suspicious model comes as TorchScript (``.pt``/``.pth``) or ONNX (``.onnx``).
ONNX is converted to a differentiable torch module with onnx2torch and checked
against onnxruntime on real inputs before it is used. Either way the result is a
:class:`ForensicModel`: ``model(x)`` gives logits and ``model.features(x)`` the
activations of the features (penultimate) layer.
"""

from __future__ import annotations

import io
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from offline.errors import ModelLoadError

ONNX_VERIFY_TOL = 1e-4


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


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with BatchNorm and a shortcut (a 1x1 convolution where the shape changes)."""

    def __init__(self, channels_in: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR-style ResNet-18 (He et al. 2016; a 3x3 stem, no max-pool, four stages of two blocks), with
    BatchNorm after every convolution. ``width`` is the first stage's channel count: 64 is the network the
    literature reports on; 16 trains at ~540 images/s on two CPU cores (64: ~45).

    Like :class:`SmallCNN`, ``body`` ends in the features (the pooled last stage) and ``head`` is the
    final linear layer.
    """

    def __init__(self, input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10,
                 width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU()]
        channels = width
        for stage in range(4):
            out = width * 2 ** stage
            for block in range(2):
                layers.append(BasicBlock(channels, out, 2 if stage and not block else 1))
                channels = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


ARCHITECTURES = ("cnn", "resnet18")
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when torch sees one (CUDA), else the CPU; ``cuda`` (or ``cuda:N``) fails clearly
    where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ModelLoadError(f"--device {name}: torch {torch.__version__} ({build}) sees no GPU; use --device cpu "
                             "or auto, or install a CUDA build of torch on a machine with a GPU")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ModelLoadError(f"--device {name}: {exc}; choose one of {', '.join(DEVICES)}") from exc


def build_architecture(arch: str, input_shape: tuple[int, int, int], num_classes: int,
                       width: int | None = None) -> nn.Module:
    """A fresh ``arch`` network: ``cnn`` (:class:`SmallCNN`; ``width`` = its features' size, 64) or ``resnet18``
    (:class:`ResNet18`; ``width`` = its first stage's channels, 64)."""
    if arch == "cnn":
        return SmallCNN(input_shape, num_classes, width or 64)
    if arch == "resnet18":
        return ResNet18(input_shape, num_classes, width or 64)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def module_kind(module: nn.Module) -> str:
    """Class name of a module, also for TorchScript modules (``Linear``, ``Conv2d`` ...)."""
    return getattr(module, "original_name", None) or type(module).__name__


def is_linear(module: nn.Module) -> bool:
    return module_kind(module) in ("Linear", "Gemm") or isinstance(module, nn.Linear)


def is_conv(module: nn.Module) -> bool:
    return module_kind(module) in ("Conv2d", "Conv") or isinstance(module, nn.Conv2d)


def shaped_mask(mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A unit or channel mask reshaped to broadcast against a layer output ``out``."""
    if mask.numel() == out[0].numel():  # one value per output unit
        return mask.reshape(out.shape[1:])
    return mask.reshape(-1, *([1] * (out.dim() - 2)))  # one value per channel


class ForensicModel(nn.Module):
    """Logits plus the activations of one named layer (the features layer).

    Eager and onnx2torch (torch.fx) modules are split with forward hooks, so any
    topology works. TorchScript runs compiled code that ignores hooks, so it is
    run leaf by leaf: its top-level modules in order, descending into
    ``Sequential`` containers; the split is verified to reproduce the model's
    own output at load time. One that cannot be split so (a ``torch.jit.trace``
    export with functions between its modules) is rebuilt from its graph through
    ONNX by :func:`load_model`. Without a features layer (none can be found and
    none was named) the model still gives logits; features raise.

    :meth:`set_output_mask` multiplies a layer's output by a mask, which is how
    repair prunes neurons or channels; the mask is part of the forward pass and
    so of the exported model.
    """

    def __init__(self, net: nn.Module, features_layer: str | None, *,
                 leaves: list[tuple[str, nn.Module]] | None = None,
                 output_index: int | None = None, no_features: str = "") -> None:
        super().__init__()
        self.net = net
        self.features_layer = features_layer
        self.leaves = leaves
        self.output_index = output_index
        # why there is no features layer (a model whose penultimate layer cannot be found): the scan needs only
        # the logits, the phases that need features (filter, pruning, audit, export) raise this
        self.no_features = no_features
        self._captured: torch.Tensor | None = None
        self._masks: dict[str, torch.Tensor] = {}
        self._hooked: set[str] = set()
        self._taps: dict[str, torch.Tensor | None] = {}
        if features_layer is not None:
            self._check_layer(features_layer)
            self._hook(features_layer)
        self.freeze()

    @property
    def layer_names(self) -> list[str]:
        if self.leaves is not None:
            return [name for name, _ in self.leaves]
        return [name for name, _ in self.net.named_modules() if name]

    def leaf_modules(self) -> list[tuple[str, nn.Module]]:
        """The named modules without children, in order (for TorchScript, the verified top-level leaves)."""
        named = self.leaves if self.leaves is not None else list(self.net.named_modules())
        return [(n, m) for n, m in named if n and not list(m.children())]

    def _check_layer(self, name: str) -> None:
        names = self.layer_names
        if name not in names:
            nested = self.leaves is not None and name in dict(self.net.named_modules())
            if nested:
                raise ModelLoadError(
                    f"features layer '{name}' is nested inside a compiled TorchScript module; name one of "
                    f"{', '.join(names)} or export the model to ONNX"
                )
            raise ModelLoadError(
                f"features layer '{name}' does not exist; layers are: {', '.join(names[:40])}"
                + (" ..." if len(names) > 40 else "")
            )

    def _hook(self, name: str) -> None:
        if self.leaves is None and name not in self._hooked:
            dict(self.net.named_modules())[name].register_forward_hook(
                lambda _m, _i, out, name=name: self._after(name, out))
            self._hooked.add(name)

    @property
    def device(self) -> torch.device:
        first = next(self.net.parameters(), None)
        return torch.device("cpu") if first is None else first.device

    def to_device(self, device: str | torch.device) -> ForensicModel:
        """Run the network on ``device``. Callers keep passing CPU tensors: each forward pass moves its input
        there and its outputs (logits, features, tapped layers) back, in the autograd graph, so a phase written
        for the CPU runs its heavy part on a GPU unchanged; the scan keeps its data on the device itself."""
        self.net.to(device)
        return self

    def _after(self, name: str, out: torch.Tensor) -> torch.Tensor:
        mask = self._masks.get(name)
        if mask is not None:
            out = out * shaped_mask(mask.to(out.device), out)
        if name == self.features_layer:
            self._captured = out
        if name in self._taps:
            self._taps[name] = out
        return out

    @torch.no_grad()
    def layer_output(self, layer: str, x: torch.Tensor) -> torch.Tensor:
        """The output of any named layer (after its mask, if one is set)."""
        return self.tapped(x, [layer])[1][layer]

    def tapped(self, x: torch.Tensor, layers: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the outputs of ``layers`` (after their masks), in the autograd graph when grad is on."""
        for layer in layers:
            self._check_layer(layer)
            self._hook(layer)
        self._taps = dict.fromkeys(layers)
        try:
            logits = self._run(x)
            outputs = {name: None if out is None else out.to(logits.device) for name, out in self._taps.items()}
        finally:
            self._taps = {}
        unused = [name for name, out in outputs.items() if out is None]
        if unused:
            raise ModelLoadError(f"layer '{unused[0]}' is not used by the forward pass")
        return logits, outputs  # type: ignore[return-value]

    def set_output_mask(self, layer: str, mask: torch.Tensor | None) -> None:
        """Multiply ``layer``'s output by ``mask``: one value per channel, or per output unit."""
        self._check_layer(layer)
        if mask is None:
            self._masks.pop(layer, None)
            return
        self._masks[layer] = torch.as_tensor(mask, dtype=torch.float32)
        self._hook(layer)

    @property
    def output_masks(self) -> dict[str, torch.Tensor]:
        return dict(self._masks)

    def freeze(self) -> None:
        for p in self.net.parameters():
            p.requires_grad_(False)

    def unfreeze(self) -> None:
        for p in self.net.parameters():
            p.requires_grad_(True)

    def _select(self, out: object) -> torch.Tensor:
        if isinstance(out, (tuple, list)):
            return out[self.output_index or 0]
        return out  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        self._captured = None
        home = x.device
        x = x.to(self.device)
        if self.leaves is not None:
            h = x
            for name, leaf in self.leaves:
                h = self._after(name, leaf(h))
            return self._select(h).to(home)
        return self._select(self.net(x)).to(home)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.features_layer is None:
            raise ModelLoadError(f"{self.no_features or 'the model has no features layer'}; "
                                 "name the layer before the output layer with --features-layer")
        logits = self._run(x)
        if self._captured is None:
            raise ModelLoadError(f"features layer '{self.features_layer}' is not used by the forward pass")
        return self._captured.flatten(1).to(logits.device), logits

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[0]

    @torch.no_grad()
    def predict(self, x: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Predicted class indices for a numpy or torch batch."""
        self.eval()
        xt = torch.as_tensor(x, dtype=torch.float32)
        return torch.cat([self(xt[i:i + batch_size]).argmax(1) for i in range(0, len(xt), batch_size)]).numpy()


def default_features_layer(named: list[tuple[str, nn.Module]]) -> str:
    """The leaf module just before the last linear layer: the penultimate layer."""
    leaves = [(n, m) for n, m in named if n and not list(m.children())]
    linear = [i for i, (_, m) in enumerate(leaves) if is_linear(m)]
    if not linear or linear[-1] == 0:
        raise ModelLoadError("cannot find the layer before the output layer; name it with --features-layer")
    return leaves[linear[-1] - 1][0]


def _script_leaves(net: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Top-level modules of a TorchScript model in order, descending into Sequential containers."""
    leaves: list[tuple[str, nn.Module]] = []
    for name, child in net.named_children():
        full = f"{prefix}{name}"
        if module_kind(child) == "Sequential":
            leaves.extend(_script_leaves(child, f"{full}."))
        else:
            leaves.append((full, child))
    return leaves


def _does_not_fit(sample: torch.Tensor, exc: Exception) -> ModelLoadError:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return ModelLoadError(
        f"the model fails on data of shape {tuple(sample.shape)} ({lines[-1]}); "
        "check that the data matches the model's input"
    )


def _script_output(net: nn.Module, sample: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        try:
            full = net(sample)
        except Exception as exc:
            raise _does_not_fit(sample, exc) from exc
    return full[0] if isinstance(full, (tuple, list)) else full


def _verified_script_leaves(net: nn.Module, sample: torch.Tensor,
                            full: torch.Tensor) -> list[tuple[str, nn.Module]] | None:
    """Leaves of a TorchScript model if running them in order reproduces its output ``full``, else None.

    Scripted ``nn.Sequential``-style models pass; a traced model (``torch.jit.trace``) whose forward calls
    functions between its modules (``F.relu``, ``x.view``) does not.
    """
    leaves = _script_leaves(net)
    try:
        with torch.no_grad():
            h = sample
            for _, leaf in leaves:
                h = leaf(h)
    except Exception:
        return None
    if len(leaves) < 2 or h.shape != full.shape or not torch.allclose(h, full, atol=1e-5):
        return None
    return leaves


def _script_as_onnx(net: nn.Module, sample: torch.Tensor, path: Path) -> bytes:
    """The TorchScript graph exported to ONNX in memory, so that onnx2torch rebuilds it module by module."""
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (sample,), buffer, input_names=["input"], opset_version=17, dynamo=False,
                              dynamic_axes={"input": {0: "batch"}})
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: this TorchScript model does not run its modules in order and cannot be exported to ONNX "
            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
            "export it to ONNX yourself"
        ) from exc
    return buffer.getvalue()


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


def _load_onnx(path: Path, sample: np.ndarray, content: bytes | None = None) -> tuple[nn.Module, int, list[str]]:
    """Convert ONNX (the file, or ``content`` in memory) to torch and verify it against onnxruntime on ``sample``."""
    import onnx
    import onnxruntime as ort

    try:
        proto = onnx.load(str(path)) if content is None else onnx.load_from_string(content)
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX model ({str(exc).splitlines()[0]})") from exc
    outputs = [o.name for o in proto.graph.output]
    output_index = outputs.index("logits") if "logits" in outputs else 0
    try:
        net = _import_onnx2torch().convert(proto)
    except Exception as exc:
        raise ModelLoadError(f"{path}: onnx2torch cannot convert this model ({exc})") from exc
    session = ort.InferenceSession(str(path) if content is None else content, providers=["CPUExecutionProvider"])
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
        model = _onnx_model(path, sample_t, features_layer)
    elif path.suffix.lower() in (".pt", ".pth", ".ts"):
        from offline.triage import check_torchscript_ops, triage_model

        triage_model(path)  # before torch sees the file: a pickle carrying code is refused here
        try:
            net = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(
                f"{path}: not a TorchScript model ({str(exc).splitlines()[0]}); save it with "
                "torch.jit.script(model).save(path) or export it to ONNX"
            ) from exc
        check_torchscript_ops(net, path)  # before anything runs: file, storage and foreign ops are refused
        net.eval()
        full = _script_output(net, sample_t)
        leaves = _verified_script_leaves(net, sample_t, full)
        if leaves is not None:
            model = _with_features(net, features_layer, leaves, leaves=leaves)
        else:  # a traced model: rebuilt from its graph through ONNX, checked against the TorchScript output
            model = _onnx_model(path, sample_t, features_layer, _script_as_onnx(net, sample_t, path))
            with torch.no_grad():
                err = float((model(sample_t) - full).abs().max())
            if not err <= ONNX_VERIFY_TOL:
                raise ModelLoadError(f"{path}: the model rebuilt from its TorchScript graph disagrees with it "
                                     f"(max abs error {err:.2e}); export it to ONNX yourself")
    else:
        raise ModelLoadError(f"{path}: unsupported model format '{path.suffix}'; use .pt (TorchScript) or .onnx")
    model.eval()
    try:
        with torch.no_grad():
            logits = model(sample_t) if model.features_layer is None else model.features_and_logits(sample_t)[1]
    except ModelLoadError:
        raise
    except Exception as exc:
        raise _does_not_fit(sample_t, exc) from exc
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ModelLoadError(f"{path}: expected logits of shape (N, classes>=2), got {tuple(logits.shape)}")
    return model


def _with_features(net: nn.Module, features_layer: str | None, named: list[tuple[str, nn.Module]],
                   **kwargs: object) -> ForensicModel:
    """A ForensicModel on the named layer, or on the default one; without one where none can be found."""
    if features_layer is not None:
        return ForensicModel(net, features_layer, **kwargs)  # type: ignore[arg-type]
    try:
        return ForensicModel(net, default_features_layer(named), **kwargs)  # type: ignore[arg-type]
    except ModelLoadError as exc:
        return ForensicModel(net, None, no_features=str(exc).split(";")[0], **kwargs)  # type: ignore[arg-type]


def _onnx_model(path: Path, sample: torch.Tensor, features_layer: str | None,
                content: bytes | None = None) -> ForensicModel:
    net, output_index, outputs = _load_onnx(path, sample.numpy(), content)
    if "features" in outputs and features_layer in (None, "features"):
        return _DualOutputModel(net, output_index, outputs.index("features"))
    return _with_features(net, features_layer, list(net.named_modules()), output_index=output_index)


class _DualOutputModel(ForensicModel):
    """An ONNX bundle model whose graph itself outputs ``logits`` and ``features``."""

    def __init__(self, net: nn.Module, output_index: int, features_index: int) -> None:
        nn.Module.__init__(self)
        self.net = net
        self.features_layer = "features"
        self.leaves = None
        self.output_index = output_index
        self.features_index = features_index
        self._captured = None
        self._masks = {}
        self._hooked = set()
        self._taps = {}
        self.no_features = ""
        self.freeze()

    @property
    def layer_names(self) -> list[str]:
        return ["features", *super().layer_names]

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x)
        return out[self.features_index].flatten(1), out[self.output_index]


def save_torchscript(net: nn.Module, path: str | Path) -> None:
    """Save an eager module as TorchScript (what ``load_model`` reads back). Forward hooks (a
    :class:`ForensicModel`'s taps) are left out of the saved model and kept on ``net``: TorchScript cannot
    compile them, and the model file should not carry them."""
    net.eval()
    hooked = {m: dict(m._forward_hooks) for m in net.modules() if m._forward_hooks}
    try:
        for m in hooked:
            m._forward_hooks.clear()
        torch.jit.script(net).save(str(path))
    finally:
        for m, hooks in hooked.items():
            m._forward_hooks.update(hooks)
