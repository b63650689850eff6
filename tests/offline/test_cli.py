"""The CLI gives a one-line error and a non-zero exit for bad input, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from offline.cli import main
from offline.models import SmallCNN, save_torchscript


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.pt"
    save_torchscript(SmallCNN(), path)
    return path


def _scan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["scan", "--quiet", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((64, 28, 28), np.float32), np.arange(64) % 10, "(N, C, H, W)"),
        (np.full((64, 1, 28, 28), 200.0, np.float32), np.arange(64) % 10, "must lie in [0, 1]"),
        (np.zeros((64, 1, 28, 28), np.float32), np.zeros(64, int), "at least two classes"),
        (np.zeros((64, 1, 16, 16), np.float32), np.arange(64) % 10, "fails on data of shape"),
        (np.zeros((64, 1, 28, 28), np.float32), np.arange(64) % 12, "only 10 outputs"),
        (np.zeros((10, 1, 28, 28), np.float32), np.arange(10) % 10, "too few"),
    ],
)
def test_bad_data(capsys, tmp_path: Path, model_file: Path, x, y, message: str) -> None:
    np.savez(tmp_path / "d.npz", x=x, y=y)
    code, err = _scan(capsys, "--model", str(model_file), "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path))
    assert code == 2
    assert message in err
    assert err.startswith("trojan-forensics: error: ") and err.count("\n") == 1


def test_bad_model_and_layer(capsys, tmp_path: Path, model_file: Path) -> None:
    code, err = _scan(capsys, "--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path))
    assert code == 2 and "not found" in err
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    code, err = _scan(capsys, "--model", str(tmp_path / "bad.onnx"), "--out", str(tmp_path))
    assert code == 2 and "not a valid ONNX model" in err
    code, err = _scan(capsys, "--model", str(model_file), "--features-layer", "fc9", "--out", str(tmp_path))
    assert code == 2 and "features layer 'fc9' does not exist" in err


def test_no_traceback_from_the_installed_command(tmp_path: Path) -> None:
    (tmp_path / "m.pt").write_bytes(b"\x00\x01 corrupt")
    proc = subprocess.run([sys.executable, "-m", "offline.cli", "scan", "--model", str(tmp_path / "m.pt"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "not a TorchScript model" in proc.stderr


def test_help_lists_commands_and_defaults(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["scan", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--features-layer" in out and "--repeats" in out and "(default: 0.1)" in out


def test_train_arch_resnet18_on_rgb_signs(capsys, tmp_path: Path, tiny_signs) -> None:
    """train --arch resnet18 --width 4 trains a ResNet with BatchNorm on RGB images and says so in
    attack.json; scan --device cuda where torch sees no GPU is a one-line error."""
    import json

    import torch

    tiny_signs.save_npz(tmp_path / "signs.npz")
    code = main(["train", "--data", str(tmp_path / "signs.npz"), "--arch", "resnet18", "--width", "4",
                 "--attack", "badnets", "--target", "5", "--patch-size", "5", "--epochs", "2", "--device", "cpu",
                 "--out", str(tmp_path / "case")])
    assert code == 0
    summary = json.loads((tmp_path / "case" / "attack.json").read_text())
    assert summary["arch"] == "resnet18" and summary["width"] == 4 and summary["target"] == 5
    model = torch.jit.load(str(tmp_path / "case" / "model.pt"))
    assert any(name.endswith("bn1") for name, _ in model.named_modules())
    capsys.readouterr()
    if not torch.cuda.is_available():
        code, err = _scan(capsys, "--model", str(tmp_path / "case" / "model.pt"), "--data",
                          str(tmp_path / "case" / "clean.npz"), "--device", "cuda", "--out", str(tmp_path / "s"))
        assert code == 2 and "sees no GPU" in err and err.count("\n") == 1
