"""The scan on real backdoored and clean MNIST models, with the default settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from offline.attacks import BackdoorResult, PatchTrigger
from offline.data import Dataset
from offline.models import load_model, save_torchscript
from offline.scan.neural_cleanse import scan

pytestmark = pytest.mark.slow


def _scan(result: BackdoorResult, clean: Dataset, tmp_path: Path):
    save_torchscript(result.model, tmp_path / "m.pt")
    model = load_model(tmp_path / "m.pt", clean.x[:8])
    fit, held_out = clean.split(0.2, seed=0)
    return scan(model, fit.x, held_out.x, held_out.y, 10)


def test_scan_cli_flags_exactly_the_badnets_target(tmp_path: Path, badnets_model: BackdoorResult,
                                                   mnist_splits) -> None:
    _, clean = mnist_splits
    _, clean = clean.split(0.5, seed=3)  # 750 images, stratified: half the time of the whole split
    target = badnets_model.target
    save_torchscript(badnets_model.model, tmp_path / "model.pt")
    clean.save_npz(tmp_path / "clean.npz")
    proc = subprocess.run(
        [sys.executable, "-m", "offline.cli", "scan", "--model", str(tmp_path / "model.pt"),
         "--data", str(tmp_path / "clean.npz"), "--out", str(tmp_path / "out"), "--recover-restarts", "1", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "verdict: BACKDOORED (flagged class 3)" in proc.stdout
    report = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert report["flagged_classes"] == [target]
    row = report["per_class"][target]
    assert row["anomaly_index"] > 2
    assert row["reversed_trigger_asr"] > 0.9
    others = [r["anomaly_index"] for r in report["per_class"] if r["class"] != target]
    assert max(others) < 2
    assert len(report["model"]["sha256"]) == 64
    assert report["settings"]["lr"] == 0.1 and report["settings"]["samples_per_step"] == 1000
    assert report["method"] == "neural-cleanse" and report["settings"]["anomaly_scale"] == "log"
    # the recovered trigger sits on the true patch and still works on held-out data
    (recovered,) = report["recovered_triggers"]
    assert recovered["class"] == target and recovered["held_out_asr"] > 0.9
    # the scan's trigger and a fresh start; the smallest that works was refined
    candidates = recovered["candidates"]
    assert [c["start"] for c in candidates] == ["scan", "restart 1"]
    (kept,) = [c for c in candidates if c.get("kept")]
    assert kept["mask_l1_norm"] == min(c["mask_l1_norm"] for c in candidates if c["reached"])
    assert kept["refined_mask_l1_norm"] == recovered["mask_l1_norm"] <= kept["mask_l1_norm"] * 1.25
    assert "the smallest of 2 starts" in proc.stdout
    mask = np.load(tmp_path / "out" / recovered["mask_file"])
    overlap = mask[PatchTrigger(4).region(28, 28)].sum() / mask.sum()
    assert overlap > 0.5, f"only {overlap:.0%} of the mask mass lies on the true patch"
    for name in ("overview.png", f"class_{target}_mask.png", f"class_{target}_pattern.png"):
        assert (tmp_path / "out" / "triggers" / name).stat().st_size > 100
    assert (tmp_path / "out" / recovered["examples_image"]).is_file()


@pytest.mark.parametrize("index", [0, 1, 2])
def test_scan_flags_nothing_on_clean_models(index: int, tmp_path: Path, clean_models: list[BackdoorResult],
                                            mnist_splits) -> None:
    result = _scan(clean_models[index], mnist_splits[1], tmp_path)
    assert result.flagged == [], f"clean model flagged {result.flagged}: {result.median_anomaly_index}"


def test_tabor_scan_cli_flags_the_badnets_target(tmp_path: Path, case_dir: Path) -> None:
    """A shortened TABOR scan (15 steps) through the CLI: right class, trigger quality reported."""
    proc = subprocess.run(
        [sys.executable, "-m", "offline.cli", "scan", "--model", str(case_dir / "model.pt"),
         "--data", str(case_dir / "clean.npz"), "--out", str(tmp_path / "out"), "--quiet", "--method", "tabor",
         "--max-steps", "15", "--no-recover"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert report["method"] == report["settings"]["method"] == "tabor"
    assert len(report["settings"]["tabor_weights"]) == 6
    assert report["flagged_classes"] == [3]
    quality = report["per_class"][3]["trigger_quality"]
    assert set(quality) == {"mask_l2", "pattern_outside_mask", "mask_smoothness", "trigger_smoothness",
                            "blocking", "overlay"}
    assert quality["blocking"] < 1.0  # cutting the recovered patch out leaves the digit recognisable


def test_bad_tabor_weights_are_refused(tmp_path: Path, case_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "offline.cli", "scan", "--model", str(case_dir / "model.pt"),
         "--data", str(case_dir / "clean.npz"), "--out", str(tmp_path / "out"), "--method", "tabor",
         "--tabor-weights", "1,2,x"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "six comma-separated numbers" in proc.stderr and "Traceback" not in proc.stderr


def test_traced_and_single_output_onnx_models_are_scanned_end_to_end(tmp_path: Path, badnets_model: BackdoorResult,
                                                                    mnist_splits) -> None:
    """The scan needs only logits: the BadNets model as torch.jit.trace and as an ONNX file with one output."""
    from tests.offline.test_models import ThirdPartyLeNet, _export_onnx, save_traced

    _, clean = mnist_splits
    _, clean = clean.split(0.5, seed=3)
    save_traced(ThirdPartyLeNet(badnets_model.model), tmp_path / "traced.pt")
    _export_onnx(badnets_model.model, tmp_path / "logits.onnx")
    fit, held_out = clean.split(0.2, seed=0)
    for name in ("traced.pt", "logits.onnx"):
        model = load_model(tmp_path / name, clean.x[:8])
        result = scan(model, fit.x, held_out.x, held_out.y, 10)
        assert result.flagged == [badnets_model.target], (name, result.median_anomaly_index)
        assert result.runs[0].triggers.steps.max() <= result.config.candidate_steps


def test_tabor_metric_scores_the_true_trigger_low_and_a_trigger_over_the_digit_high(badnets_model: BackdoorResult,
                                                                                   mnist_splits) -> None:
    from offline.scan.neural_cleanse import tabor_metric

    _, clean = mnist_splits
    model = badnets_model.model.eval()
    mask, pattern = PatchTrigger(4).mask_and_pattern((1, 28, 28))
    true = tabor_metric(model, clean.x, clean.y, mask[0], pattern, badnets_model.target)
    assert true["attack"] > 0.9 and true["crop"] > 0.8  # the digit is left whole once the patch is cut out
    assert true["area"] == pytest.approx(16 / 784, abs=1e-5)
    assert true["smoothness"] == pytest.approx(16 / (28 * 27), abs=1e-5)  # a square's boundary: 4 sides of 4 pixels
    # a false trigger: a large block over the middle of the image, where the digit is
    blob = np.zeros((28, 28), np.float32)
    blob[6:22, 6:22] = 1.0
    other = tabor_metric(model, clean.x, clean.y, blob, np.zeros((1, 28, 28), np.float32), badnets_model.target)
    assert other["crop"] < 0.5 and other["metric"] > true["metric"] + 3
    empty = tabor_metric(model, clean.x, clean.y, np.zeros((28, 28), np.float32), pattern, badnets_model.target)
    assert empty["metric"] == float("inf")
