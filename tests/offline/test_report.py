"""The forensic report: what it says about a backdoored model, and that it renders in a real browser."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from offline.attacks import BackdoorResult
from offline.report import trigger_character


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise AssertionError("no headless browser: install the Debian package 'chromium' (make test does)")


def test_trigger_character_tells_a_patch_from_a_spread_trigger() -> None:
    patch = np.zeros((28, 28))
    patch[23:27, 23:27] = 1.0
    assert trigger_character(patch).startswith("patch: a compact region (4x4 px at row 23, column 23)")
    spread = np.random.default_rng(0).random((1, 28, 28)) * 0.2
    assert trigger_character(spread).startswith("blended or invisible")


@pytest.mark.slow
def test_patch_writes_a_report_that_names_the_backdoor(patched: tuple[Path, dict],
                                                       badnets_model: BackdoorResult) -> None:
    report = json.loads((patched[0] / "report" / "report.json").read_text())
    target = badnets_model.target
    assert report["verdict"]["backdoored"] and report["verdict"]["flagged_classes"] == [target]
    assert report["verdict"]["headline"].startswith(f"BACKDOOR FOUND: class {target}")
    assert report["triage"]["model"]["sha256"] and report["triage"]["model"]["parameters"] > 0
    trigger = report["trigger"][0]
    assert trigger["class"] == target and trigger["held_out_asr"] > 0.9
    assert trigger["true_trigger_overlap"] > 0.3  # evaluation mode: the true 4x4 patch is known
    assert trigger["character"].startswith("patch")
    assert report["impact"]["attack_success_rate"] > 0.95
    assert report["repair"]["after"]["true_asr"] < 0.05
    assert {a["id"] for a in report["attribution"]["atlas"]} == {"AML.T0018.000", "AML.T0020", "AML.T0043.004"}


@pytest.mark.slow
def test_the_html_report_renders_in_chromium_with_its_images(patched: tuple[Path, dict], tmp_path: Path,
                                                            badnets_model: BackdoorResult) -> None:
    page = tmp_path / "report.html"
    shutil.copy(patched[0] / "report" / "report.html", page)  # self-contained: nothing else travels with it
    run = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    total = int(dom.split('data-images-total="')[1].split('"')[0])
    loaded = int(dom.split('data-images-loaded="')[1].split('"')[0])
    assert total >= 4 and loaded == total, (loaded, total)
    verdict = dom.split('id="verdict"')[1][:400]
    assert f"BACKDOOR FOUND: class {badnets_model.target}" in verdict


def test_report_command_refuses_what_is_not_a_bundle(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "offline.cli", "report", "--bundle", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "guard.json: missing" in run.stderr


@pytest.mark.slow
def test_without_the_true_trigger_the_report_uses_the_recovered_one(patched: tuple[Path, dict],
                                                                   tmp_path: Path) -> None:
    from offline.report import build_report

    report_dir = Path(shutil.copytree(patched[0] / "report", tmp_path / "report"))
    repair = json.loads((report_dir / "repair.json").read_text())
    for phase in ("before", "after"):
        repair[phase]["true_asr"] = None  # what a patch job without --true-trigger records
    (report_dir / "repair.json").write_text(json.dumps(repair))
    manifest = json.loads((patched[0] / "guard.json").read_text())
    report = build_report(report_dir, manifest)
    assert report["impact"]["asr_measured_with"] == "recovered trigger"
    assert "reversed-trigger ASR" in report["verdict"]["repair"]
    assert "true_trigger_overlap" not in report["trigger"][0]
    assert (report_dir / "report.html").read_text().count("<img") >= 4


def test_report_includes_a_training_data_audit(patched: tuple[Path, dict], tmp_path: Path, capsys,
                                               badnets_model, mnist_splits) -> None:
    """`report --audit` puts the audit's clustering statistics in the detection section and keeps the file."""
    from offline.attacks import apply_poison
    from offline.audit import audit
    from offline.cli import main
    from offline.models import ForensicModel

    train, _ = mnist_splits
    x, y = apply_poison(train.x, train.y, badnets_model.trigger, badnets_model.target, badnets_model.poison_idx)
    rows = np.random.default_rng(0).choice(len(y), 1500, replace=False)  # the training set is sorted by label
    result = audit(ForensicModel(copy.deepcopy(badnets_model.model), "body.8"), x[rows], y[rows])
    (tmp_path / "audit.json").write_text(json.dumps(result))
    bundle = Path(shutil.copytree(patched[0], tmp_path / "bundle"))
    (tmp_path / "bad.json").write_text('{"classes": ')
    assert main(["report", "--bundle", str(bundle), "--audit", str(tmp_path / "bad.json")]) == 2
    assert "not a readable audit.json" in capsys.readouterr().err
    assert not (bundle / "report" / "audit.json").exists()

    assert main(["report", "--bundle", str(bundle), "--audit", str(tmp_path / "audit.json")]) == 0
    report = json.loads((bundle / "report" / "report.json").read_text())
    section = report["detection"]["training_data_audit"]
    assert section["layer"] == "body.6" and section["samples"] == 1500 and len(section["per_class"]) == 10
    assert section["flagged_classes"] == result["flagged_classes"]
    page = (bundle / "report" / "report.html").read_text()
    assert "<h3>Training-data audit</h3>" in page and page.count("<tr") >= 2 * 11
    if result["flagged_classes"]:
        assert "training-data audit" in report["verdict"]["audit"]
    # a later rebuild without --audit keeps the section
    assert main(["report", "--bundle", str(bundle)]) == 0
    assert json.loads((bundle / "report" / "report.json").read_text())["detection"]["training_data_audit"]


def test_deployment_exposure_counts_what_the_guard_kept_and_served(tmp_path: Path) -> None:
    """From an evidence store and a metrics snapshot as the guard writes them: flagged inputs by detector and
    answered class, first and last time, the chain checked, the served counts, a strip of the inputs."""
    from prometheus_client import generate_latest

    from guard.evidence import EvidenceStore
    from guard.metrics import GuardMetrics
    from offline.errors import DataError
    from offline.exposure import deployment_exposure

    store = EvidenceStore(tmp_path / "evidence", 1 << 24, 1 << 20)
    rng = np.random.default_rng(0)
    for i, (detectors, predicted) in enumerate([(["strip"], "7"), (["strip", "knn"], "7"), (["knn"], "3")]):
        store.append(rng.random((1, 8, 8)).astype(np.float32), request_id=f"r{i}", input_index=0, model="m",
                     bundle_sha256="ab" * 32, policy="enforce", detectors=detectors, p_value=0.001, scores={},
                     p_values={}, predicted=predicted)
    metrics = GuardMetrics()
    metrics.requests.labels("m", "clean", "answered").inc(40)
    metrics.requests.labels("m", "flagged", "refused").inc(3)
    metrics.inputs.labels("m", "clean").inc(40)
    metrics.inputs.labels("m", "flagged").inc(3)
    metrics.detections.labels("m", "strip").inc(2)
    (tmp_path / "metrics.txt").write_bytes(generate_latest(metrics.registry))

    summary, strip = deployment_exposure(tmp_path / "evidence", str(tmp_path / "metrics.txt"))
    assert summary["flagged_inputs"] == 3 and summary["requests"] == 3
    assert summary["flagged_by_detector"] == {"strip": 2, "knn": 2}
    assert summary["answered_with"] == {"7": 2, "3": 1}
    assert summary["first_flagged"] <= summary["last_flagged"]
    assert summary["chain"]["altered"] == 0 and not summary["chain"]["problems"]
    m = summary["metrics"]
    assert m["requests_by_action"] == {"answered": 40, "refused": 3} and m["inputs_by_verdict"]["flagged"] == 3
    assert m["flagged_by_detector"] == {"strip": 2}
    assert strip is not None and strip.startswith(b"\x89PNG") and summary["strip"]["inputs"] == 3

    (tmp_path / "other.txt").write_text("# nothing of the guard\nup 1\n")
    with pytest.raises(DataError, match="no trojan_guard_"):
        deployment_exposure(tmp_path / "evidence", str(tmp_path / "other.txt"))
    with pytest.raises(DataError, match="not a directory"):
        deployment_exposure(tmp_path / "missing")


@pytest.mark.slow
def test_the_report_shows_a_real_guard_runs_exposure_in_chromium(guard_only_bundle: Path, tmp_path: Path,
                                                                   traffic: dict[str, np.ndarray]) -> None:
    """The guard serves the unrepaired model with evidence kept; triggered requests are refused; the report
    built from its evidence store and its /metrics endpoint shows the exposure, and renders."""
    import grpc

    from offline.cli import main
    from tests.guard.conftest import GuardProcess, request

    bundle = Path(shutil.copytree(guard_only_bundle, tmp_path / "bundle"))
    server = GuardProcess(bundle, tmp_path, "--evidence-dir", str(tmp_path / "evidence"))
    try:
        server.stub.ModelInfer(request(traffic["clean_x"][:4]))
        refused = 0
        for x in traffic["triggered_x"][:6]:
            try:
                server.stub.ModelInfer(request(x[None]))
            except grpc.RpcError as exc:
                refused += exc.code() == grpc.StatusCode.PERMISSION_DENIED
        assert refused >= 5
        metrics_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        assert main(["report", "--bundle", str(bundle), "--evidence", str(tmp_path / "evidence"),
                     "--metrics", metrics_url]) == 0
    finally:
        server.stop()
    report = json.loads((bundle / "report" / "report.json").read_text())
    exposure = report["impact"]["deployment"]
    assert exposure["flagged_inputs"] >= refused and exposure["metrics"]["requests_by_action"]["refused"] == refused
    assert set(exposure["answered_with"]) == {"3"}  # the backdoor's target: what the model would have answered
    page = tmp_path / "report.html"
    shutil.copy(bundle / "report" / "report.html", page)
    run = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    loaded = int(dom.split('data-images-loaded="')[1].split('"')[0])
    assert loaded == int(dom.split('data-images-total="')[1].split('"')[0])
    section = dom.split('id="exposure"')[1][:3000]
    assert f"flagged inputs kept as evidence: {exposure['flagged_inputs']}" in section
    assert "alt=\"flagged inputs\"" in section and "evidence chain is intact" in section
