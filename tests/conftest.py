"""Shared fixtures: the embedded MNIST digits and models trained on them in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from offline.attacks import BackdoorResult, PatchTrigger, train_backdoored_model
from offline.data import Dataset, load_mnist
from offline.models import save_torchscript
from offline.patch import PatchSettings, run_patch
from offline.repair import RepairSettings

BADNETS_TARGET = 3


@pytest.fixture(scope="session")
def mnist_splits() -> tuple[Dataset, Dataset]:
    """(train 70 %, held-out clean 30 %) of the real MNIST 5k subset."""
    return load_mnist().split(0.3, seed=0)


@pytest.fixture(scope="session")
def badnets_model(mnist_splits: tuple[Dataset, Dataset]) -> BackdoorResult:
    """BadNets: 4x4 white patch, bottom-right, 10 % poison, target class 3."""
    train, test = mnist_splits
    return train_backdoored_model(train, test, PatchTrigger(4), BADNETS_TARGET, 0.1, seed=0)


@pytest.fixture(scope="session")
def clean_models(mnist_splits: tuple[Dataset, Dataset]) -> list[BackdoorResult]:
    """Three clean models from different seeds."""
    train, test = mnist_splits
    return [train_backdoored_model(train, test, None, seed=s) for s in (11, 12, 13)]


@pytest.fixture(scope="session")
def case_dir(tmp_path_factory: pytest.TempPathFactory, badnets_model: BackdoorResult,
             mnist_splits: tuple[Dataset, Dataset]) -> Path:
    """What `trojan-forensics train` writes: model.pt, clean.npz, attack.json."""
    root = tmp_path_factory.mktemp("case")
    save_torchscript(badnets_model.model, root / "model.pt")
    mnist_splits[1].save_npz(root / "clean.npz")
    (root / "attack.json").write_text(json.dumps(badnets_model.summary()))
    return root


@pytest.fixture(scope="session")
def patched(case_dir: Path) -> tuple[Path, dict]:
    """The default patch job (scan, unlearning, calibration) on the BadNets model, with one fresh start
    for trigger recovery instead of three (time)."""
    out = case_dir / "bundle"
    summary = run_patch(case_dir / "model.pt", str(case_dir / "clean.npz"), out,
                        settings=PatchSettings(recover_restarts=1),
                        true_trigger_file=case_dir / "attack.json", progress=False, say=lambda _: None)
    return out, summary


@pytest.fixture(scope="session")
def guard_only_bundle(patched: tuple[Path, dict], case_dir: Path) -> Path:
    """The same job without repair (it reuses the scan): the model still obeys the trigger."""
    lines: list[str] = []
    run_patch(case_dir / "model.pt", str(case_dir / "clean.npz"), case_dir / "guard-only",
              settings=PatchSettings(recover_restarts=1, repair=RepairSettings(method="none")),
              true_trigger_file=case_dir / "attack.json", work_dir=case_dir / "bundle.work",
              progress=False, say=lines.append)
    assert any(line.startswith("[1/6] scan: reused") for line in lines)
    return case_dir / "guard-only"


@pytest.fixture(scope="session")
def traffic(mnist_splits, badnets_model) -> dict[str, np.ndarray]:
    """Held-out clean images with labels, and the same kind of images carrying the true trigger
    (non-target classes only)."""
    _, test = mnist_splits
    keep = test.y != badnets_model.target
    return {"clean_x": test.x[:60], "clean_y": test.y[:60],
            "triggered_x": badnets_model.trigger.apply(test.x[keep][:60]).astype(np.float32),
            "triggered_y": test.y[keep][:60]}


@pytest.fixture(scope="session")
def tiny_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean CNN trained for one epoch on 500 digits, and 500 others as clean data: the patch job on it takes
    seconds (2 scan steps, no repair, STRIP n=5), for tests of what the job does with its files, not how well."""
    root = tmp_path_factory.mktemp("tiny-case")
    train, clean = load_mnist().split(0.2, seed=0)[1].split(0.5, seed=0)
    save_torchscript(train_backdoored_model(train, clean, None, epochs=1, seed=0).model, root / "model.pt")
    clean.save_npz(root / "clean.npz")
    return root


@pytest.fixture(scope="session")
def tiny_signs() -> Dataset:
    """24 images of each of the 43 sign classes (32x32 RGB)."""
    from offline.signs import load_signs

    return load_signs(per_class=24)


@pytest.fixture(scope="session")
def signs_resnet_case(tiny_signs: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-18 (width 4, BatchNorm) trained for two epochs on half the tiny signs, the other half as clean
    data: the RGB, many-class, BatchNorm case of the job in seconds."""
    from offline.attacks import training_setup

    root = tmp_path_factory.mktemp("signs-resnet")
    train, clean = tiny_signs.split(0.5, seed=0)
    with training_setup("resnet18", 4):
        save_torchscript(train_backdoored_model(train, clean, None, epochs=2, seed=0).model, root / "model.pt")
    clean.save_npz(root / "clean.npz")
    return root


def tiny_settings(**changes) -> PatchSettings:
    """The tiny patch job's settings (``changes``: PatchSettings fields)."""
    from offline.calibrate import CalibrationSettings
    from offline.neural_cleanse import NeuralCleanseConfig

    return PatchSettings(**{"scan": NeuralCleanseConfig(max_steps=2, samples_per_step=64, early_stop=False),
                            "recover_restarts": 1, "repair": RepairSettings(method="none"),
                            "calibration": CalibrationSettings(strip_n=5, pool_size=40, strip_group=0),
                            **changes})


def run_tiny_patch(case: Path, out: Path, work: Path | None = None, **changes) -> tuple[list[str], list[str]]:
    """The tiny patch job writing ``out``; returns (its progress lines, its warnings)."""
    said: list[str] = []
    warned: list[str] = []
    run_patch(case / "model.pt", str(case / "clean.npz"), out, settings=tiny_settings(**changes),
              work_dir=work, progress=False, say=said.append, warn=warned.append)
    return said, warned


@pytest.fixture(scope="session")
def tiny_bundle(tiny_case: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny patch job's bundle (unsigned); its work directory is beside it."""
    out = tmp_path_factory.mktemp("tiny") / "bundle"
    run_tiny_patch(tiny_case, out)
    return out


def other_model(onnx_file: Path) -> bytes:
    """The same ONNX graph with its first weight negated: a valid model, not the one that was written."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_file))
    first = model.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(first), first.name))
    return model.SerializeToString()
