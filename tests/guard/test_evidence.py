"""The evidence store keeps flagged inputs durably, bounded, and shows tampering."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from guard.cli import main as guard_main
from guard.evidence import EvidenceStore, read_evidence


def _x(i: int) -> np.ndarray:
    return np.full((1, 28, 28), i / 100, dtype=np.float32)


def test_records_round_trip_with_checksums(tmp_path: Path) -> None:
    store = EvidenceStore(tmp_path)
    digests = [store.append(_x(i), request_id=f"r{i}", strip_entropy=0.01 * i) for i in range(3)]
    store.close()
    records = list(read_evidence(tmp_path))
    assert [r["request_id"] for r in records] == ["r0", "r1", "r2"]
    assert [r["sha256"] for r in records] == digests
    assert all(r["intact"] for r in records)
    np.testing.assert_array_equal(records[2]["x"], _x(2))


def test_a_torn_tail_is_skipped_and_a_restart_never_appends_to_it(tmp_path: Path) -> None:
    store = EvidenceStore(tmp_path)
    store.append(_x(1), request_id="kept")
    store.close()
    segment = next(tmp_path.glob("evidence-*.jsonl"))
    with open(segment, "ab") as fh:  # a crash in the middle of a write
        fh.write(b'{"time":"2026-01-01T00:00:00Z","request_id":"torn","tensor_b64":"AAAA')
    again = EvidenceStore(tmp_path)
    again.append(_x(2), request_id="after-restart")
    again.close()
    assert len(list(tmp_path.glob("evidence-*.jsonl"))) == 2
    assert [r["request_id"] for r in read_evidence(tmp_path)] == ["kept", "after-restart"]


def test_rotation_keeps_the_store_within_its_budget(tmp_path: Path) -> None:
    record_bytes = len(json.dumps({"x": "A" * 4200}))
    store = EvidenceStore(tmp_path, max_bytes=6 * record_bytes, segment_bytes=2 * record_bytes)
    for i in range(30):
        store.append(_x(i), request_id=f"r{i}")
    store.close()
    assert store.total_bytes <= 6 * record_bytes + 2 * record_bytes
    kept = [r["request_id"] for r in read_evidence(tmp_path)]
    assert kept[-1] == "r29" and "r0" not in kept  # the oldest went first


def test_altered_records_are_reported_by_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = EvidenceStore(tmp_path / "ev")
    store.append(_x(1), request_id="a", detectors=["strip"], strip_entropy=0.01, activation_score=0.5)
    store.append(_x(2), request_id="b", detectors=["strip"], strip_entropy=0.02, activation_score=0.6)
    store.close()
    segment = next((tmp_path / "ev").glob("evidence-*.jsonl"))
    lines = segment.read_text().splitlines()
    record = json.loads(lines[1])
    record["sha256"] = "0" * 64
    segment.write_text(lines[0] + "\n" + json.dumps(record) + "\n")
    assert guard_main(["evidence", str(tmp_path / "ev"), "--export", str(tmp_path / "out.npz")]) == 0
    out, err = capsys.readouterr()
    assert "ALTERED" in out and "2 record(s), 1 ALTERED" in err
    exported = np.load(tmp_path / "out.npz")
    assert exported["x"].shape == (1, 1, 28, 28) and list(exported["request_id"]) == ["a"]
    assert guard_main(["evidence", str(tmp_path / "nowhere")]) == 2
