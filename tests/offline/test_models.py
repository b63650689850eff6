from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from offline.attacks import BackdoorResult
from offline.errors import ModelLoadError
from offline.models import SmallCNN, load_model, save_torchscript


def _export_onnx(net: torch.nn.Module, path: Path) -> None:
    torch.onnx.export(net.eval(), (torch.zeros(1, 1, 28, 28),), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)


def test_torchscript_round_trip_with_default_features(tmp_path: Path, badnets_model: BackdoorResult,
                                                      mnist_splits) -> None:
    x = mnist_splits[1].x[:32]
    save_torchscript(badnets_model.model, tmp_path / "m.pt")
    model = load_model(tmp_path / "m.pt", x)
    assert model.features_layer == "body.8"
    feats, logits = model.features_and_logits(torch.from_numpy(x))
    assert feats.shape == (32, 64)
    with torch.no_grad():
        expected = badnets_model.model(torch.from_numpy(x))
    torch.testing.assert_close(logits, expected)


def test_a_net_a_forensic_model_hooked_still_saves_without_its_hooks(tmp_path: Path, mnist_splits) -> None:
    """Auditing or scanning a net in memory taps its layers with forward hooks; saving it afterwards works,
    the file carries no hook, and the net keeps its taps."""
    from offline.models import ForensicModel

    net = SmallCNN().eval()
    model = ForensicModel(net, "body.8")
    x = torch.from_numpy(mnist_splits[1].x[:4])
    before = model.layer_output("body.6", x)
    save_torchscript(net, tmp_path / "m.pt")
    assert any(m._forward_hooks for m in net.modules())
    torch.testing.assert_close(model.layer_output("body.6", x), before)
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    assert not any(m._forward_hooks for m in loaded.modules())
    torch.testing.assert_close(loaded(x), net(x))


def test_onnx_is_converted_and_matches_onnxruntime(tmp_path: Path, badnets_model: BackdoorResult,
                                                  mnist_splits) -> None:
    x = mnist_splits[1].x[:64]
    _export_onnx(badnets_model.model, tmp_path / "m.onnx")
    model = load_model(tmp_path / "m.onnx", x)
    reference = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x})[0]
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - reference).max() < 1e-4
    # gradients reach the input: Neural Cleanse needs a differentiable model
    xin = torch.from_numpy(x[:4]).requires_grad_(True)
    model(xin).sum().backward()
    assert xin.grad is not None and xin.grad.abs().sum() > 0
    assert model.features(torch.from_numpy(x[:4])).shape == (4, 64)


def test_named_features_layer(tmp_path: Path, mnist_splits) -> None:
    net = SmallCNN()
    _export_onnx(net, tmp_path / "m.onnx")
    x = mnist_splits[1].x[:8]
    model = load_model(tmp_path / "m.onnx", x, features_layer="body/body/6/Flatten")
    assert model.features(torch.from_numpy(x)).shape == (8, 256)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "m.onnx", x, features_layer="no_such_layer")
    save_torchscript(net, tmp_path / "m.pt")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "m.pt", x, features_layer="no_such_layer")
    scripted = load_model(tmp_path / "m.pt", x, features_layer="body.6")  # inside a Sequential
    assert scripted.features(torch.from_numpy(x)).shape == (8, 256)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_a_model_file_carrying_code_is_refused_before_it_is_loaded(tmp_path: Path, mnist_splits) -> None:
    x = mnist_splits[1].x[:8]
    marker = tmp_path / "pwned"
    torch.save({"weights": torch.zeros(3), "extra": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match=r"carries code .* CRITICAL posix\.system in .*evil\.pt"):
        load_model(tmp_path / "evil.pt", x)
    assert not marker.exists()
    torch.save(torch.nn.Linear(784, 10).state_dict(), tmp_path / "weights.pt")  # no code, but a pickle
    with pytest.raises(ModelLoadError, match=r"torch\.save pickle.*torch\.jit\.script\(model\)\.save"):
        load_model(tmp_path / "weights.pt", x)


def test_bad_model_files(tmp_path: Path, mnist_splits) -> None:
    x = mnist_splits[1].x[:8]
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "missing.pt", x)
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match="not a TorchScript model"):
        load_model(tmp_path / "corrupt.pt", x)
    (tmp_path / "corrupt.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        load_model(tmp_path / "corrupt.onnx", x)
    (tmp_path / "model.h5").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="unsupported model format"):
        load_model(tmp_path / "model.h5", x)


def test_model_and_data_that_do_not_fit(tmp_path: Path) -> None:
    save_torchscript(SmallCNN(), tmp_path / "m.pt")
    with pytest.raises(ModelLoadError, match="fails on data of shape"):
        load_model(tmp_path / "m.pt", np.zeros((4, 3, 28, 28), np.float32))


def test_output_mask_prunes_units_and_channels(mnist_splits) -> None:
    from offline.models import ForensicModel

    x = torch.from_numpy(mnist_splits[1].x[:4])
    model = ForensicModel(SmallCNN(), "body.8")
    mask = torch.ones(64)
    mask[:10] = 0
    model.set_output_mask("body.8", mask)
    feats, _ = model.features_and_logits(x)
    assert torch.all(feats[:, :10] == 0) and feats[:, 10:].abs().sum() > 0
    before = model(x)
    channels = torch.zeros(16)  # every channel of the second conv layer silenced
    model.set_output_mask("body.3", channels)
    silenced = model(x)
    assert not torch.allclose(before, silenced)
    assert torch.allclose(silenced, silenced[:1].expand_as(silenced))  # input no longer matters
    model.set_output_mask("body.3", None)
    torch.testing.assert_close(model(x), before)
    with pytest.raises(ModelLoadError, match="does not exist"):
        model.set_output_mask("nope", channels)


# --- TorchScript code is inspected before it runs (issue 33) ---------------------------------------------------

class _ReadsAFile(torch.nn.Module):
    """A classifier whose forward reads any file the job can read (its bytes leak into the logits)."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret
        self.fc = torch.nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leaked = torch.from_file(self.secret, size=4, dtype=torch.uint8).float()
        return self.fc(x.flatten(1)) + leaked.sum() * 0.0


@torch.jit.script
def _peek(x: torch.Tensor, secret: str) -> torch.Tensor:
    return x + torch.from_file(secret, size=1, dtype=torch.uint8).float()


class _Inner(torch.nn.Module):
    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 1e9):  # never taken on real data: the op hides in a branch of a called function
            return _peek(x, self.secret)
        return x


class _HidesItDeeper(torch.nn.Module):
    def __init__(self, secret: str) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), _Inner(secret), torch.nn.Linear(784, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _SetsState(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))

    @torch.jit.export
    def __getstate__(self) -> tuple[int, bool]:
        return (0, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[int, bool]) -> None:
        self.training = state[1]


def test_torchscript_that_reads_files_is_refused_before_it_runs(tmp_path: Path, mnist_splits,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from offline.cli import main as forensics_main
    from offline.triage import check_torchscript_ops, triage_model

    x = mnist_splits[1].x[:8]
    secret = tmp_path / "signing.key"
    secret.write_bytes(b"-----BEGIN PRIVATE KEY-----")
    torch.jit.script(_ReadsAFile(str(secret))).save(str(tmp_path / "reads.pt"))
    assert triage_model(tmp_path / "reads.pt")["findings"] == []  # the pickle scanner sees nothing
    with pytest.raises(ModelLoadError, match=r"reads\.pt: refused, the TorchScript code of forward\(\) calls "
                                             r"aten::from_file, a file or storage op"):
        load_model(tmp_path / "reads.pt", x)
    mnist_splits[1].save_npz(tmp_path / "clean.npz")
    assert forensics_main(["scan", "--model", str(tmp_path / "reads.pt"), "--data", str(tmp_path / "clean.npz"),
                           "--out", str(tmp_path / "scan"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "aten::from_file" in err, err

    torch.jit.script(_HidesItDeeper(str(secret))).save(str(tmp_path / "deeper.pt"))
    with pytest.raises(ModelLoadError, match=r"code of forward\(\) calls aten::from_file"):
        load_model(tmp_path / "deeper.pt", x)

    torch.jit.script(_SetsState()).save(str(tmp_path / "setstate.pt"))
    with pytest.raises(ModelLoadError, match=r"defines __setstate__ .*which torch\.jit\.load would run"):
        load_model(tmp_path / "setstate.pt", x)

    net = SmallCNN()
    save_torchscript(net, tmp_path / "clean.pt")
    checked = check_torchscript_ops(torch.jit.load(str(tmp_path / "clean.pt")), tmp_path / "clean.pt")
    assert checked["methods"] >= 2 and "aten::from_file" not in checked["ops"]
    load_model(tmp_path / "clean.pt", x)


class ThirdPartyLeNet(torch.nn.Module):
    """A classifier as other training pipelines write it: functions between the modules (F.relu, view), which a
    traced export cannot run module by module."""

    def __init__(self, source: torch.nn.Module | None = None) -> None:
        super().__init__()
        src = source or SmallCNN()
        self.conv1, self.conv2 = src.body[0], src.body[3]
        self.fc1, self.fc2 = src.body[7], src.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.view(x.size(0), -1)))
        return self.fc2(x)


def save_traced(net: torch.nn.Module, path: Path) -> None:
    """``torch.jit.trace``, the most common TorchScript export."""
    torch.jit.trace(net.eval(), torch.zeros(2, 1, 28, 28)).save(str(path))


def test_a_traced_model_is_rebuilt_from_its_graph_with_its_features_layer(tmp_path: Path, mnist_splits) -> None:
    x = mnist_splits[1].x[:16]
    net = ThirdPartyLeNet().eval()
    save_traced(net, tmp_path / "traced.pt")
    model = load_model(tmp_path / "traced.pt", x)
    with torch.no_grad():
        expected = net(torch.from_numpy(x))
        feats, logits = model.features_and_logits(torch.from_numpy(x))
        hidden = F.relu(net.fc1(F.max_pool2d(F.relu(net.conv2(F.max_pool2d(F.relu(net.conv1(torch.from_numpy(x))),
                                                                              2))), 2).flatten(1)))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # the features layer is what feeds the last linear layer, found in the graph
    torch.testing.assert_close(feats, hidden, atol=1e-4, rtol=1e-4)
    xin = torch.from_numpy(x[:4]).requires_grad_(True)
    model(xin).sum().backward()
    assert xin.grad is not None and xin.grad.abs().sum() > 0


class _GlobalPoolHead(torch.nn.Module):
    """Logits from a convolution and a global average: no linear layer whose input could be the features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def test_a_model_without_a_features_layer_gives_logits_and_a_clear_error_for_features(tmp_path: Path,
                                                                                      mnist_splits) -> None:
    x = mnist_splits[1].x[:8]
    _export_onnx(_GlobalPoolHead(), tmp_path / "m.onnx")
    model = load_model(tmp_path / "m.onnx", x)  # the scan needs only the logits
    assert model.features_layer is None
    assert model(torch.from_numpy(x)).shape == (8, 10)
    with pytest.raises(ModelLoadError, match="--features-layer"):
        model.features(torch.from_numpy(x))


def test_resnet18_with_batchnorm_round_trips_as_torchscript(tmp_path: Path) -> None:
    """train --arch resnet18: a CIFAR-style ResNet-18 with BatchNorm; saved as TorchScript it loads with its
    pooled last stage as the features layer, and its logits match the eager network's."""
    from offline.models import ResNet18, build_architecture

    net = build_architecture("resnet18", (3, 32, 32), 43, 4).eval()
    assert isinstance(net, ResNet18)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 20  # 1 stem + 16 blocks + 3 shortcuts
    save_torchscript(net, tmp_path / "r.pt")
    x = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
    model = load_model(tmp_path / "r.pt", x)
    feats, logits = model.features_and_logits(torch.from_numpy(x))
    assert feats.shape == (8, 32) and logits.shape == (8, 43)  # 8 x width channels in the last stage
    with torch.no_grad():
        torch.testing.assert_close(logits, net(torch.from_numpy(x)), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_architecture("vgg", (3, 32, 32), 10)


def test_training_setup_chooses_what_attacks_train(tiny_signs) -> None:
    """Inside training_setup every attack's new model is the chosen network; outside, the small CNN."""
    from offline.attacks import new_model, training_setup
    from offline.models import ResNet18, SmallCNN

    with training_setup("resnet18", 4):
        assert isinstance(new_model(tiny_signs, 0), ResNet18)
    assert isinstance(new_model(tiny_signs, 0), SmallCNN)
    with pytest.raises(ValueError, match="unknown architecture"), training_setup("vgg"):
        pass


def test_device_auto_is_the_cpu_here_and_cuda_fails_clearly() -> None:
    from offline.models import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="sees no GPU; use --device cpu"):
            resolve_device("cuda")


def test_ibd_psc_variants_are_the_model_with_its_last_batchnorm_layers_amplified(tmp_path: Path) -> None:
    """The amplified-BatchNorm variants live in the exported graph as extra outputs: the variant of count c gives
    the logits of the torch network whose last c BatchNorm layers have weight and bias times omega; the plain
    outputs stay the model's."""
    import copy

    from offline.patch.export import INPUT_NAME, export_onnx
    from offline.patch.ibdpsc import add_variants, amplifiable_layers, choose_variants

    net = build_resnet_with_statistics()
    save_torchscript(net, tmp_path / "r.pt")
    x = np.random.default_rng(1).random((16, 3, 32, 32), dtype=np.float32)
    export_onnx(load_model(tmp_path / "r.pt", x), tmp_path / "r.onnx", x)
    plain = (tmp_path / "r.onnx").read_bytes()
    assert amplifiable_layers(plain) == 20  # every BatchNorm, folded into its convolution
    with_variants, names = add_variants(plain, [1, 4], omega=1.5)
    session = ort.InferenceSession(with_variants)
    logits, v1, v4 = session.run(["logits", *names], {INPUT_NAME: x})
    for count, got in ((1, v1), (4, v4)):
        amplified = copy.deepcopy(net)
        bns = [m for m in amplified.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        with torch.no_grad():
            for bn in bns[-count:]:
                bn.weight.mul_(1.5)
                bn.bias.mul_(1.5)
            want = amplified(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(logits, net(torch.from_numpy(x)).numpy(), atol=1e-4)
    chosen = choose_variants(plain, x, INPUT_NAME)
    counts = chosen["counts"]
    assert len(counts) == 5 and counts == list(range(counts[0], counts[0] + 5)) and counts[-1] <= 20
    assert len(chosen["clean_error_by_count"]) == 20


def build_resnet_with_statistics() -> torch.nn.Module:
    """A width-4 ResNet-18 whose BatchNorm running statistics are not the defaults."""
    from offline.models import build_architecture

    torch.manual_seed(0)
    net = build_architecture("resnet18", (3, 32, 32), 10, 4).train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(32, 3, 32, 32) * 2)
    return net.eval()
