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
