"""The tiny patch job: a clean LeNet trained for one epoch, scanned for 2 steps, no repair, STRIP n=5.

For tests of what the job does with its files, not how well; ``tests/fixtures/make_fixtures.py`` commits its
bundle for the fast tier. Imports torch (through the offline job).
"""

from __future__ import annotations

from pathlib import Path

from offline.attacks import train_backdoored_model
from offline.data import load_mnist
from offline.models import save_torchscript
from offline.patch.calibrate import CalibrationSettings
from offline.patch.job import PatchSettings, run_patch
from offline.patch.repair import RepairSettings
from offline.scan.settings import NeuralCleanseConfig


def write_tiny_case(root: Path) -> Path:
    """A clean CNN trained for one epoch on 500 digits, and 500 others as clean data."""
    root.mkdir(parents=True, exist_ok=True)
    train, clean = load_mnist().split(0.2, seed=0)[1].split(0.5, seed=0)
    save_torchscript(train_backdoored_model(train, clean, None, epochs=1, seed=0).model, root / "model.pt")
    clean.save_npz(root / "clean.npz")
    return root


def tiny_settings(**changes) -> PatchSettings:
    """The tiny patch job's settings (``changes``: PatchSettings fields)."""
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
