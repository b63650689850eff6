"""The fleet scan on a two-node Ray cluster started on loopback: verdicts as a plain scan gives them, a broken
model and a killed worker reported while the others finish, a rerun that reuses what it finished."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from offline.attacks import BackdoorResult
from offline.data import Dataset
from offline.fleet.scan import FleetScanSettings, run_fleet, scan_task
from offline.models import save_torchscript
from offline.scan.job import run_scan
from offline.scan.settings import NeuralCleanseConfig

ray = pytest.importorskip("ray", reason="the fleet extra (ray) is not installed")
from ray.cluster_utils import Cluster  # noqa: E402  (the two_node_ray fixture's, in tests/offline/conftest.py)

pytestmark = pytest.mark.slow

# two scan steps: seconds a model, for what the fleet does with its results, not how good they are
QUICK = FleetScanSettings(config=NeuralCleanseConfig(max_steps=2, samples_per_step=64, early_stop=False),
                          recover=False)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, tiny_case: Path,
             clean_models: list[BackdoorResult]) -> Path:
    """models/tiny/model.pt (one epoch), models/clean/model.pt, and a file that is not a model."""
    root = tmp_path_factory.mktemp("registry")
    (root / "tiny").mkdir()
    shutil.copy(tiny_case / "model.pt", root / "tiny" / "model.pt")
    (root / "clean").mkdir()
    save_torchscript(clean_models[0].model, root / "clean" / "model.pt")
    (root / "broken.pt").write_bytes(b"not a model at all")
    return root


@pytest.fixture(scope="module")
def clean_data(mnist_splits: tuple[Dataset, Dataset]) -> Dataset:
    return mnist_splits[1].split(0.5, seed=3)[1]


def test_the_fleet_on_two_nodes_gives_the_plain_scans_verdicts_and_reports_the_broken_file(
        two_node_ray: Cluster, registry: Path, clean_data: Dataset, case_dir: Path, tmp_path: Path) -> None:
    # the BadNets model (target 3) listed by path in a text file, beside the registry directory
    (tmp_path / "more.txt").write_text(f"# the suspect\n{case_dir / 'model.pt'}\n")
    fleet = run_fleet([registry, tmp_path / "more.txt"], clean_data, tmp_path / "out", FleetScanSettings(recover=False),
                      progress=False)
    by_name = {e["name"]: e for e in fleet["models"]}
    assert set(by_name) == {"tiny/model.pt", "clean/model.pt", "broken.pt", str(case_dir / "model.pt")}
    suspect = by_name[str(case_dir / "model.pt")]
    assert suspect["verdict"] == "backdoored" and suspect["flagged_classes"] == [3]
    assert suspect["max_anomaly_index"] == suspect["anomaly_indices"][3] > 2
    assert by_name["clean/model.pt"]["verdict"] == "clean"
    broken = by_name["broken.pt"]
    assert broken["verdict"] == "failed" and "broken.pt: not a TorchScript model" in broken["error"]
    assert {k: fleet["summary"][k] for k in ("models", "failed", "pending", "reused")} == \
        {"models": 4, "failed": 1, "pending": 0, "reused": 0}
    assert fleet["cluster"]["nodes"] == 2 and fleet["cluster"]["cpus"] == 2
    assert len({e["node"] for e in fleet["models"]}) == 2, "both nodes ran scans"
    # each model's scan is kept, and is the scan `trojan-forensics scan` writes
    report = json.loads((tmp_path / "out" / suspect["scan"]).read_text())
    assert report["verdict"] == "backdoored" and report["model"]["sha256"] == suspect["sha256"]
    assert report["model"]["path"] == str(case_dir / "model.pt")
    assert (tmp_path / "out" / suspect["scan"]).parent.joinpath("triggers", "overview.png").stat().st_size > 100
    saved = json.loads((tmp_path / "out" / "fleet.json").read_text())
    assert saved["models"] == fleet["models"]
    page = (tmp_path / "out" / "fleet.html").read_text()
    assert page.index("broken.pt") < page.index("clean/model.pt")  # backdoored and failed first
    assert f'href="{suspect["scan"]}"' in page


def test_a_rerun_reuses_finished_scans_and_other_settings_or_a_changed_model_scan_again(
        two_node_ray: Cluster, tiny_case: Path, clean_data: Dataset, tmp_path: Path) -> None:
    registry = tmp_path / "models"
    registry.mkdir()
    shutil.copy(tiny_case / "model.pt", registry / "a.pt")
    shutil.copy(tiny_case / "model.pt", registry / "b.pt")
    first = run_fleet([registry], clean_data, tmp_path / "out", QUICK, progress=False)
    assert [e["reused"] for e in first["models"]] == [False, False]
    # the same verdict and anomaly indices as a plain scan with the same settings, outside Ray
    plain = run_scan(registry / "a.pt", clean_data, tmp_path / "plain", progress=False, **QUICK.scan_kwargs())
    assert first["models"][0]["verdict"] == plain["verdict"]
    assert first["models"][0]["flagged_classes"] == plain["flagged_classes"]
    assert first["models"][0]["anomaly_indices"] == [round(r["anomaly_index"], 4) for r in plain["per_class"]]
    again = run_fleet([registry], clean_data, tmp_path / "out", QUICK, progress=False)
    assert [e["reused"] for e in again["models"]] == [True, True]
    assert [e["anomaly_indices"] for e in again["models"]] == [e["anomaly_indices"] for e in first["models"]]
    # another model under the same name is scanned again, the unchanged one is not
    (registry / "b.pt").write_bytes((registry / "b.pt").read_bytes() + b"\0")
    changed = run_fleet([registry], clean_data, tmp_path / "out", QUICK, progress=False)
    assert [e["reused"] for e in changed["models"]] == [True, False]
    assert changed["models"][1]["sha256"] != changed["models"][0]["sha256"]
    # other settings are another result
    other = FleetScanSettings(config=QUICK.config, recover=False, threshold=3.0)
    assert [e["reused"] for e in run_fleet([registry], clean_data, tmp_path / "out", other,
                                           progress=False)["models"]] == [False, False]


def _dies_on_b(name: str, *args):
    if name == "b.pt":
        os._exit(1)  # the worker process dies, as one killed by the kernel's OOM killer would
    return scan_task(name, *args)


def test_a_killed_worker_is_reported_for_its_model_and_the_others_finish(
        two_node_ray: Cluster, tiny_case: Path, clean_data: Dataset, tmp_path: Path) -> None:
    registry = tmp_path / "models"
    registry.mkdir()
    for name in ("a.pt", "b.pt", "c.pt"):
        shutil.copy(tiny_case / "model.pt", registry / name)
    fleet = run_fleet([registry], clean_data, tmp_path / "out", QUICK, progress=False, task=_dies_on_b)
    by_name = {e["name"]: e for e in fleet["models"]}
    assert by_name["b.pt"]["verdict"] == "failed" and "the Ray task scanning this model failed" in \
        by_name["b.pt"]["error"]
    assert by_name["a.pt"]["verdict"] != "failed" and by_name["c.pt"]["verdict"] != "failed"


def test_the_cli_refuses_a_missing_registry_before_starting_ray(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "offline.cli", "fleet", "--models", str(tmp_path / "nowhere"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"trojan-forensics: error: --models {tmp_path / 'nowhere'}: no such file or " \
                                  f"directory"
