"""The evidence store keeps flagged inputs durably, bounded, and shows tampering: a chain of records, HMAC-keyed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from guard.cli import main as guard_main
from guard.evidence import EvidenceStore, audit_evidence, read_evidence


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
    assert audit_evidence(tmp_path).problems == []  # rotation said so in the chain: nothing reported missing


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
    assert guard_main(["evidence", str(tmp_path / "ev"), "--export", str(tmp_path / "out.npz")]) == 1
    out, err = capsys.readouterr()
    assert "ALTERED" in out and "2 record(s), 1 ALTERED" in err
    exported = np.load(tmp_path / "out.npz")
    assert exported["x"].shape == (1, 1, 28, 28) and list(exported["request_id"]) == ["a"]
    assert guard_main(["evidence", str(tmp_path / "nowhere")]) == 2


# --- the chain: rewritten, removed and reordered records are named (issue 33, item 7) ---------------------------

KEY = b"k" * 40


def _store(root: Path, n: int, key: bytes | None = KEY, **kwargs) -> Path:
    store = EvidenceStore(root, key=key, **kwargs)
    for i in range(n):
        store.append(_x(i), request_id=f"r{i}", detectors=["strip"], p_value=0.001, scores={"strip_entropy": 0.1})
    store.close()
    return root


def _lines(root: Path) -> tuple[Path, list[str]]:
    segment = next(root.glob("evidence-*.jsonl"))
    return segment, segment.read_text().splitlines()


def _audit_cli(root: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str, str]:
    code = guard_main(["evidence", str(root), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_an_intact_keyed_chain_is_authenticated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _store(tmp_path, 3)
    (tmp_path.parent / "key").write_bytes(KEY + b"\n")
    code, out, err = _audit_cli(tmp_path, capsys, "--key-file", str(tmp_path.parent / "key"))
    assert code == 0 and out.count(" ok") == 3, (out, err)
    assert "records authenticated" in err
    # a guard that starts again continues the chain
    _store(tmp_path, 2)
    audit = audit_evidence(tmp_path, KEY)
    assert audit.authenticated and [r["seq"] for r in audit.records] == [1, 2, 3, 4, 5]
    # the wrong key: nothing verifies, and it says so
    wrong = audit_evidence(tmp_path, b"w" * 40)
    assert not wrong.authenticated and any("is it the key" in p for p in wrong.problems)


def test_a_rewritten_record_with_regenerated_checksums_is_named(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Whoever can write the volume rewrites record 2's verdict and recomputes every checksum it can."""
    import hashlib

    _store(tmp_path, 3)
    segment, lines = _lines(tmp_path)
    record = json.loads(lines[1])
    record["request_id"], record["p_value"] = "innocent", 0.9
    original_link = record.pop("link")
    record["alg"] = "sha256"  # the unkeyed link anyone can compute
    body = json.dumps(record, separators=(",", ":")).encode()
    link = hashlib.sha256(record["prev"].encode() + b"\n" + body).hexdigest()
    lines[1] = (body[:-1] + f',"link":"{link}"}}'.encode()).decode()
    segment.write_text("\n".join(lines) + "\n")
    key = tmp_path.parent / "key"
    key.write_bytes(KEY)
    code, out, err = _audit_cli(tmp_path, capsys, "--key-file", str(key))
    assert code == 1
    assert "seq 2, request innocent): not authenticated" in err, err
    assert "records NOT authenticated" in err
    # the HMAC link kept as it was (no key to compute a new one): named as rewritten
    record["alg"] = "hmac-sha256"
    body = json.dumps(record, separators=(",", ":")).encode()
    lines[1] = (body[:-1] + f',"link":"{original_link}"}}'.encode()).decode()
    segment.write_text("\n".join(lines) + "\n")
    audit = audit_evidence(tmp_path, KEY)
    bad = [r for r in audit.records if not r["intact"]]
    assert [r["seq"] for r in bad] == [2] and bad[0]["problem"].startswith("rewritten: its HMAC")
    # record 3 still follows the record 2 that was written: the chain is fine around it
    assert [r["problem"] for r in audit.records if r["seq"] == 3] == [""]


def test_a_record_removed_from_the_middle_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _store(tmp_path, 4)
    segment, lines = _lines(tmp_path)
    segment.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    code, out, err = _audit_cli(tmp_path, capsys)
    assert code == 1
    assert "seq 3, request r2): seq 2 removed before it" in err, err


def test_reordered_records_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _store(tmp_path, 4)
    segment, lines = _lines(tmp_path)
    lines[1], lines[2] = lines[2], lines[1]
    segment.write_text("\n".join(lines) + "\n")
    audit = audit_evidence(tmp_path, KEY)
    assert [r["seq"] for r in audit.records] == [1, 3, 2, 4]
    problems = {r["seq"]: r["problem"] for r in audit.records}
    assert problems[3] == "out of order: seq 2 should come before it"
    assert problems[2] == "out of order: seq 2 comes after seq 3"
    assert problems[1] == problems[4] == ""
    assert _audit_cli(tmp_path, capsys)[0] == 1


def test_records_removed_from_the_start_are_told_from_rotation(tmp_path: Path) -> None:
    record_bytes = len(json.dumps({"x": "A" * 4400}))
    _store(tmp_path, 12, segment_bytes=2 * record_bytes, max_bytes=100 * record_bytes)
    segments = sorted(tmp_path.glob("evidence-*.jsonl"))
    assert len(segments) >= 3 and audit_evidence(tmp_path, KEY).problems == []
    segments[0].unlink()  # someone removes the oldest records; no rotation record says so
    audit = audit_evidence(tmp_path, KEY)
    first = int(segments[1].read_text().split('"seq":')[1].split(",")[0])
    assert audit.problems == [f"{segments[1].name}:1 (seq {first}, request r{first - 1}): "
                              f"{'seq 1' if first == 2 else f'seq 1-{first - 1}'} removed before it (the first "
                              f"record kept by rotation is seq 1)"], audit.problems


def test_without_a_key_evidence_says_records_are_checksummed_not_authenticated(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _store(tmp_path, 2, key=None)
    code, out, err = _audit_cli(tmp_path, capsys)
    assert code == 0 and "checksummed but not authenticated" in err
    # keyed records read without the key: chained, but not verified
    _store(tmp_path / "keyed", 2)
    code, out, err = _audit_cli(tmp_path / "keyed", capsys)
    assert code == 0 and "not verified: give --key-file" in err


def test_a_short_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "key").write_text("short")
    _store(tmp_path / "ev", 1)
    code, _, err = _audit_cli(tmp_path / "ev", capsys, "--key-file", str(tmp_path / "key"))
    assert code == 2 and "at least 32 bytes" in err


def test_the_chains_of_workers_are_read_together_and_a_gap_in_one_is_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``serve --workers 2`` writes a chain per worker in worker-N/; an earlier one-process guard's beside them."""
    _store(tmp_path, 2)  # the guard before it ran with workers
    _store(tmp_path / "worker-0", 3)
    _store(tmp_path / "worker-1", 3)
    audit = audit_evidence(tmp_path, KEY)
    assert audit.authenticated and not audit.problems and len(audit.records) == 8
    assert sorted({r["worker"] for r in audit.records}) == ["", "worker-0", "worker-1"]
    times = [r["unix_time"] for r in audit.records]
    assert times == sorted(times)
    segment, lines = _lines(tmp_path / "worker-1")
    segment.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # one record of worker 1 removed
    code, out, err = _audit_cli(tmp_path, capsys, "--key-file", str(_key_file(tmp_path.parent)))
    assert code == 1 and "worker-1/evidence-" in err and "seq 2 removed before it" in err, err
    assert out.count(" ok") == 6 and out.count("CHAIN: seq 2 removed") == 1  # 7 records, the one after the gap named


def _key_file(root: Path) -> Path:
    (root / "key").write_bytes(KEY)
    return root / "key"
