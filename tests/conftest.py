"""Shared fixtures: the embedded MNIST digits and models trained on them in seconds, and the committed bundle.

Nothing here imports torch until a fixture that trains is used: the fast tier (``make test-fast``) runs the
tests that need no trained model with torch blocked (``TROJAN_GUARD_NO_TORCH=1``), on the bundle committed in
``tests/fixtures/tiny-bundle`` (``python tests/fixtures/make_fixtures.py`` writes it again).
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from offline.attacks import BackdoorResult
    from offline.data import Dataset

BADNETS_TARGET = 3
FIXTURES = Path(__file__).resolve().parent / "fixtures"
COMMITTED_BUNDLE = FIXTURES / "tiny-bundle"


class _NoTorch(importlib.abc.MetaPathFinder):
    """Refuses torch: a fast-tier test that reaches for it fails, naming the module."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"'{name}': the fast tier runs without torch (TROJAN_GUARD_NO_TORCH is set); mark "
                              f"the test slow or keep it off torch")
        return None


if os.environ.get("TROJAN_GUARD_NO_TORCH"):
    sys.meta_path.insert(0, _NoTorch())


@pytest.fixture(scope="session")
def committed_bundle() -> Path:
    """The committed tiny bundle (a clean LeNet, STRIP n=5 and k-NN on 40 pool images): read it, copy it before
    changing anything."""
    return COMMITTED_BUNDLE


@pytest.fixture(scope="session")
def mnist_splits() -> tuple[Dataset, Dataset]:
    """(train 70 %, held-out clean 30 %) of the real MNIST 5k subset."""
    from offline.data import load_mnist

    return load_mnist().split(0.3, seed=0)


@pytest.fixture(scope="session")
def badnets_model(mnist_splits: tuple[Dataset, Dataset]) -> BackdoorResult:
    """BadNets: 4x4 white patch, bottom-right, 10 % poison, target class 3."""
    from offline.attacks import PatchTrigger, train_backdoored_model

    train, test = mnist_splits
    return train_backdoored_model(train, test, PatchTrigger(4), BADNETS_TARGET, 0.1, seed=0)


@pytest.fixture(scope="session")
def clean_models(mnist_splits: tuple[Dataset, Dataset]) -> list[BackdoorResult]:
    """Three clean models from different seeds."""
    from offline.attacks import train_backdoored_model

    train, test = mnist_splits
    return [train_backdoored_model(train, test, None, seed=s) for s in (11, 12, 13)]


@pytest.fixture(scope="session")
def case_dir(tmp_path_factory: pytest.TempPathFactory, badnets_model: BackdoorResult,
             mnist_splits: tuple[Dataset, Dataset]) -> Path:
    """What `trojan-forensics train` writes: model.pt, clean.npz, attack.json."""
    from offline.models import save_torchscript

    root = tmp_path_factory.mktemp("case")
    save_torchscript(badnets_model.model, root / "model.pt")
    mnist_splits[1].save_npz(root / "clean.npz")
    (root / "attack.json").write_text(json.dumps(badnets_model.summary()))
    return root


@pytest.fixture(scope="session")
def patched(case_dir: Path) -> tuple[Path, dict]:
    """The default patch job (scan, unlearning, calibration) on the BadNets model, with one fresh start
    for trigger recovery instead of three (time)."""
    from offline.patch.job import PatchSettings, run_patch

    out = case_dir / "bundle"
    summary = run_patch(case_dir / "model.pt", str(case_dir / "clean.npz"), out,
                        settings=PatchSettings(recover_restarts=1),
                        true_trigger_file=case_dir / "attack.json", progress=False, say=lambda _: None)
    return out, summary


@pytest.fixture(scope="session")
def guard_only_bundle(patched: tuple[Path, dict], case_dir: Path) -> Path:
    """The same job without repair (it reuses the scan): the model still obeys the trigger."""
    from offline.patch.job import PatchSettings, run_patch
    from offline.patch.repair import RepairSettings

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
    from tests.tiny import write_tiny_case

    return write_tiny_case(tmp_path_factory.mktemp("tiny-case"))


@pytest.fixture(scope="session")
def tiny_signs() -> Dataset:
    """24 images of each of the 43 sign classes (32x32 RGB)."""
    from offline.data import load_signs

    return load_signs(per_class=24)


@pytest.fixture(scope="session")
def signs_resnet_case(tiny_signs: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-18 (width 4, BatchNorm) trained for two epochs on half the tiny signs, the other half as clean
    data: the RGB, many-class, BatchNorm case of the job in seconds."""
    from offline.attacks import train_backdoored_model, training_setup
    from offline.models import save_torchscript

    root = tmp_path_factory.mktemp("signs-resnet")
    train, clean = tiny_signs.split(0.5, seed=0)
    with training_setup("resnet18", 4):
        save_torchscript(train_backdoored_model(train, clean, None, epochs=2, seed=0).model, root / "model.pt")
    clean.save_npz(root / "clean.npz")
    return root


@pytest.fixture(scope="session")
def tiny_bundle(tiny_case: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny patch job's bundle (unsigned); its work directory is beside it."""
    from tests.tiny import run_tiny_patch

    out = tmp_path_factory.mktemp("tiny") / "bundle"
    run_tiny_patch(tiny_case, out)
    return out
