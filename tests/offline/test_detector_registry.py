"""Every registered detector goes the whole way: fitted by the calibration, written, loaded, screened, measured."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from guard.bundle import MANIFEST, BundleError, GuardBundle, GuardManifest, sha256_file, write_bundle
from guard.dataplane import make_metrics
from guard.screens.registry import BY_NAME, DETECTORS, TRIGGER_FREE
from offline.patch.calibrate import CalibrationSettings, calibrate
from tests.toy import TOY_VARIANTS
from tests.toy import toy_images as _images
from tests.toy import toy_infer_with_variants as _infer


@pytest.fixture(scope="module")
def every_detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A bundle whose verdict combines every registered detector, calibrated on the toy model."""
    rng = np.random.default_rng(3)
    fit, calib, test = _images(rng, 300), _images(rng, 300), _images(rng, 60)
    pool = _images(rng, 60)
    work = tmp_path_factory.mktemp("calibrate")
    mask, pattern = np.zeros((4, 4), np.float32), np.zeros((1, 4, 4), np.float32)
    mask[0, 0], pattern[0, 0, 0] = 1.0, 1.0
    settings = CalibrationSettings(detectors=TRIGGER_FREE, filter="always")
    backend = SimpleNamespace(infer=_infer)
    result = calibrate(backend, pool, calib, np.ones(len(calib), int), fit, np.ones(len(fit), int), 3, work,
                       flagged=[0], target=0, mask=mask, pattern=pattern, settings=settings,
                       model_outputs={"ibd_psc": TOY_VARIANTS})
    np.save(work / "clean_pool.npy", pool)
    (work / "model.onnx").write_bytes(b"not parsed by these tests")
    manifest = GuardManifest.model_validate({
        "model": {"file": "model.onnx", "sha256": sha256_file(work / "model.onnx"), "opset": 17},
        "input": {"name": "input", "shape": [-1, 1, 4, 4]},
        "class_names": ["target", "dim", "bright"],
        "clean_pool": {"file": "clean_pool.npy", "sha256": sha256_file(work / "clean_pool.npy")},
        **{k: result[k] for k in ("verdict", *(d.section for d in DETECTORS)) if k in result},
        "scan": {"method": "toy", "anomaly_index": [3.0, 0.1, 0.2], "flagged_classes": [0], "threshold": 2.0},
        "provenance": {"source_model": "toy", "source_model_sha256": "0" * 64, "tool_version": "test",
                       "created": "2026-12-04T00:00:00+00:00"}})
    out = write_bundle(tmp_path_factory.mktemp("bundle") / "b", manifest,
                       {name: work / name for name, _ in manifest.files()})
    triggered = test.copy()
    triggered[:, 0, 0, 0] = 1.0
    return out, test, triggered


def test_every_registered_detector_is_fitted_written_loaded_and_screens(every_detector) -> None:
    out, clean, triggered = every_detector
    bundle = GuardBundle.load(out)
    assert set(bundle.manifest.verdict.detectors) == set(BY_NAME)
    for d in DETECTORS:
        spec = getattr(bundle.manifest, d.section)
        assert spec is not None and len(spec.calibration_scores) == 300 and len(spec.reference_scores) == 300
        assert d.name in bundle.describe()
    screen = bundle.screen()
    assert screen.names == tuple(bundle.manifest.verdict.detectors)
    assert screen.run(_infer, clean).flagged.mean() <= 0.05  # a 1 % budget over 60 clean inputs
    assert screen.run(_infer, triggered).flagged.all()
    # the metrics carry one score histogram per detector, its buckets around the bundle's clean tail
    metrics = make_metrics(bundle)
    names = {m.name for m in metrics.registry.collect()}
    assert {f"trojan_guard_{d.score_name}" for d in DETECTORS} <= names


def test_a_detectors_arrays_are_checked_when_the_bundle_loads(every_detector, tmp_path: Path) -> None:
    out, _, _ = every_detector
    raw = json.loads((out / MANIFEST).read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("model.onnx", "clean_pool.npy", raw["knn"]["reference_file"]):
        (bad / name).write_bytes((out / name).read_bytes())
    # Mahalanobis statistics for the wrong number of classes, with a checksum regenerated to match
    np.savez(bad / raw["mahalanobis"]["file"], means=np.zeros((2, 3)), precision=np.eye(3))
    raw["mahalanobis"]["sha256"] = sha256_file(bad / raw["mahalanobis"]["file"])
    (bad / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="mahalanobis.npz: Mahalanobis statistics 'means'"):
        GuardBundle.load(bad)
    raw["verdict"]["detectors"] = ["strip", "sobel"]
    (bad / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="verdict.detectors"):
        GuardBundle.load(bad)
