"""MNTD: the jumbo draws, shadows trained as Ray tasks on a two-node cluster (resumed, not mixed with other
settings), the meta-classifier's artefact (arrays and digests, refused when changed), its calibrated threshold,
and ``scan --method mntd`` on a model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from offline.data import Dataset
from offline.errors import ForensicsError
from offline.mntd.meta import MetaClassifier, MetaSettings, conformal_threshold
from offline.mntd.shadows import ShadowSettings, draw_shadow, read_listing, train_shadows

pytest.importorskip("ray", reason="the fleet extra (ray) is not installed")

# seconds, not quality: what the jobs do with their files
TINY_SHADOWS = ShadowSettings(epochs=2)
TINY_META = MetaSettings(meta_epochs=3, calibration_share=0.34, min_shadow_asr=0.0)


def test_jumbo_draws_are_balanced_reproducible_and_within_their_ranges() -> None:
    s = ShadowSettings(min_patch=2, max_patch=5, min_rate=0.05, max_rate=0.5, min_alpha=0.05, max_alpha=0.2)
    recipes = [draw_shadow(i, s, 10, (1, 28, 28)) for i in range(400)]
    assert recipes == [draw_shadow(i, s, 10, (1, 28, 28)) for i in range(400)]
    assert [r["backdoored"] for r in recipes] == [i % 2 == 1 for i in range(400)]
    bad = [r for r in recipes if r["backdoored"]]
    assert all(0.05 <= r["poison_rate"] <= 0.5 for r in bad)
    assert {r["target"] for r in bad} == set(range(10))
    patches = [r["trigger"] for r in bad if r["trigger"]["kind"] == "patch"]
    blends = [r["trigger"] for r in bad if r["trigger"]["kind"] == "blend"]
    assert 60 < len(patches) < 140 and len(patches) + len(blends) == 200
    assert {p["size"] for p in patches} == {2, 3, 4, 5}
    assert {p["pattern"] for p in patches} == {"white", "checker", "random"}
    assert all(p["row"] + p["size"] <= 28 and p["col"] + p["size"] <= 28 for p in patches)
    assert all(0.05 <= b["alpha"] <= 0.2 for b in blends)
    assert draw_shadow(1, ShadowSettings(seed=1), 10, (1, 28, 28)) != recipes[1]


def test_the_conformal_threshold_admits_at_most_the_target_share_of_clean_scores() -> None:
    scores = np.arange(1, 100) / 100  # 99 clean held-out scores
    t = conformal_threshold(scores, 0.05)
    assert t == pytest.approx(0.95) and (scores > t).mean() <= 0.05
    assert conformal_threshold(np.array([0.1, 0.3, 0.2]), 0.05) == 0.3  # too few for 5 %: above them all


@pytest.fixture(scope="module")
def small_clean(mnist_splits: tuple[Dataset, Dataset]) -> Dataset:
    return mnist_splits[1].split(0.2, seed=5)[1]  # 300 images


@pytest.fixture(scope="module")
def trained(two_node_ray, small_clean: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from offline.mntd.job import run_mntd_train

    out = tmp_path_factory.mktemp("mntd")
    run_mntd_train(small_clean, out, 12, TINY_SHADOWS, TINY_META, progress=False, say=lambda _: None)
    return out


def test_shadows_train_on_both_nodes_and_a_rerun_trains_only_the_missing_ones(
        trained: Path, small_clean: Dataset) -> None:
    records = read_listing(trained / "shadows")
    assert sorted(r["index"] for r in records) == list(range(12))
    assert sum(r["backdoored"] for r in records) == 6
    assert len({r["node"] for r in records}) == 2, "both nodes trained shadows"
    before = {p.name: p.stat().st_mtime_ns for p in (trained / "shadows").glob("shadow-*.npz")}
    said: list[str] = []
    again = train_shadows(small_clean, trained / "shadows", 14, TINY_SHADOWS, progress=False, say=said.append)
    assert [r["index"] for r in again] == list(range(14))
    assert said and "training 2 shadow models" in said[0] and "(12 already trained" in said[0]
    assert before == {p.name: p.stat().st_mtime_ns for p in
                                                  (trained / "shadows").glob("shadow-*.npz") if p.name in before}
    # other settings never mix into a directory trained with these
    with pytest.raises(ForensicsError, match="other settings"):
        train_shadows(small_clean, trained / "shadows", 14, ShadowSettings(epochs=3), progress=False)


def test_the_meta_classifier_is_arrays_with_digests_and_scores_as_it_was_trained(trained: Path) -> None:
    manifest = json.loads((trained / "mntd.json").read_text())
    assert manifest["format"] == "trojan-forensics-mntd" and manifest["format_version"] == 1
    assert set(manifest["files"]) == {"queries.npy", "classifier.npz"}
    assert manifest["measured"]["shadows"]["calibration"] >= 4 and 0 <= manifest["threshold"] <= 1
    meta = MetaClassifier.load(trained)
    assert meta.queries.shape == (10, 1, 28, 28) and 0 <= meta.queries.min() and meta.queries.max() <= 1
    assert 0 < meta.probability(np.zeros((10, 10))) < 1
    # a changed file, or a format this version does not read, is refused by name
    tampered = trained.parent / "tampered"
    tampered.mkdir()
    for f in ("mntd.json", "queries.npy", "classifier.npz"):
        (tampered / f).write_bytes((trained / f).read_bytes())
    queries = np.load(tampered / "queries.npy")
    np.save(tampered / "queries.npy", np.clip(queries + 0.1, 0, 1))
    with pytest.raises(ForensicsError, match="queries.npy: its SHA-256 does not match"):
        MetaClassifier.load(tampered)
    (tampered / "mntd.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(ForensicsError, match="format version 2"):
        MetaClassifier.load(tampered)


def test_scan_method_mntd_gives_a_probability_and_a_verdict_at_the_calibrated_threshold(
        trained: Path, case_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "offline.cli", "scan", "--method", "mntd", "--meta", str(trained),
                           "--model", str(case_dir / "model.pt"), "--data", str(case_dir / "clean.npz"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert report["method"] == "mntd" and 0 <= report["backdoor_probability"] <= 1
    assert report["verdict"] == ("backdoored" if report["backdoor_probability"] > report["threshold"] else "clean")
    assert report["model"]["sha256"] and report["meta"]["files"] == json.loads(
        (trained / "mntd.json").read_text())["files"]
    assert proc.stdout.startswith(f"verdict: {report['verdict'].upper()} (MNTD backdoor probability")
    # without --meta: a one-line error
    bad = subprocess.run([sys.executable, "-m", "offline.cli", "scan", "--method", "mntd", "--model",
                          str(case_dir / "model.pt"), "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == "trojan-forensics: error: --method mntd needs --meta DIR, a " \
        "meta-classifier from 'trojan-forensics mntd train'"


def test_a_model_of_another_shape_is_refused(trained: Path, tmp_path: Path, signs_resnet_case: Path) -> None:
    from offline.mntd.job import run_mntd_scan

    with pytest.raises(ForensicsError, match="was trained on shadows of \\(1, 28, 28\\) images and 10 classes"):
        run_mntd_scan(signs_resnet_case / "model.pt", str(signs_resnet_case / "clean.npz"), tmp_path, trained)
