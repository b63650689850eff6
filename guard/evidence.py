"""Evidence of flagged inputs: an append-only store on local disk, durable, bounded and chained.

Records are JSON lines in segment files ``evidence-00000001.jsonl``. Each holds
the input tensor (base64 of its float32 bytes, with shape), the SHA-256 of those
bytes, the scores, the verdict, the time and the request id. Every record is
written with one ``write`` on a file opened for appending and ``fsync``-ed
before the guard answers, so a record the guard reported survives a crash. A
process that starts again never appends after a possibly torn tail: it opens a
new segment. When the store exceeds its byte budget the oldest segments go.

The records form a chain: each carries its sequence number ``seq``, the
``link`` of the record before it (``prev``) and its own ``link``, computed
over ``prev`` and the record's exact bytes. With a key (``serve
--evidence-key-file``, kept off the evidence volume) the link is an
HMAC-SHA256, so whoever can write the volume but does not hold the key cannot
rewrite a record, remove one from the middle or reorder them without
:func:`audit_evidence` saying which. Without a key the link is a plain SHA-256:
it catches accidents, not people (anyone can recompute it). Rotation writes a
``rotation`` record into the chain naming the first record it kept, so a
legitimate rotation is told apart from records removed at the start. What no
chain can show is the newest records cut off the end; the guard's
``trojan_guard_evidence_records_total`` counter, kept off the volume, counts
what it wrote.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PREFIX = "evidence-"
SUFFIX = ".jsonl"
GENESIS = "0" * 64  # the ``prev`` of the first record
HMAC_ALG, HASH_ALG = "hmac-sha256", "sha256"
MIN_KEY_BYTES = 32


def _segments(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(f"{PREFIX}*{SUFFIX}") if p.stem[len(PREFIX):].isdigit())


def load_key(path: str | Path) -> bytes:
    """The evidence key from a file (e.g. a mounted Secret): at least 32 bytes, surrounding whitespace dropped."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise OSError(f"cannot read the evidence key file {path} ({exc.strerror or exc})") from exc
    if len(key) < MIN_KEY_BYTES:
        raise OSError(f"evidence key file {path}: the key must be at least {MIN_KEY_BYTES} bytes (e.g. "
                      f"'openssl rand -hex 32'), it has {len(key)}")
    return key


def _link(key: bytes | None, prev: str, body: bytes) -> str:
    message = prev.encode("ascii") + b"\n" + body
    if key is None:
        return hashlib.sha256(message).hexdigest()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _split(line: bytes) -> tuple[dict[str, Any], bytes | None, str | None]:
    """(record, the bytes its link covers, link) of a line; no bytes when the link is not the last field.

    Raises ValueError for a line that is not a JSON object (a tail torn by a crash).
    """
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    link = record.pop("link", None)
    suffix = f',"link":"{link}"}}'.encode()
    if not isinstance(link, str) or not line.endswith(suffix):
        return record, None, link if isinstance(link, str) else None
    return record, line[:-len(suffix)] + b"}", link


def _chained(segment: Path) -> Iterator[tuple[int, str]]:
    """(seq, link) of each complete chained record of a segment, in order; torn lines skipped."""
    with open(segment, "rb") as fh:
        for line in fh:
            try:
                record, body, link = _split(line.rstrip(b"\n"))
            except ValueError:
                continue  # a torn tail
            if body is not None and isinstance(record.get("seq"), int):
                yield record["seq"], str(link)


class EvidenceStore:
    """Appends chained records; ``key`` (bytes) makes the links HMAC-SHA256, authenticated."""

    def __init__(self, root: str | Path, max_bytes: int = 1 << 30, segment_bytes: int = 64 << 20,
                 key: bytes | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.key = key
        self._lock = threading.Lock()
        existing = _segments(self.root)
        self._seq = int(existing[-1].stem[len(PREFIX):]) if existing else 0
        self._fd: int | None = None
        self._size = 0
        self._total = sum(p.stat().st_size for p in existing)
        self._last_seq, self._last_link = self._chain_head(existing)
        self._dropped = 0

    @staticmethod
    def _chain_head(segments: list[Path]) -> tuple[int, str]:
        """(seq, link) of the newest complete chained record: a restarted guard continues its chain."""
        for segment in reversed(segments):
            last = deque(_chained(segment), maxlen=1)
            if last:
                return last[0]
        return 0, GENESIS

    @property
    def total_bytes(self) -> int:
        """Bytes the store holds (kept up to date by appends and rotation; no disk scan)."""
        return self._total

    def _open_next(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._seq += 1
        path = self.root / f"{PREFIX}{self._seq:08d}{SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._size = 0
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _enforce_budget(self) -> list[str]:
        """Delete the oldest segments beyond the budget; returns their names."""
        deleted = []
        for old in _segments(self.root)[:-1]:  # never the segment being written
            if self._total <= self.max_bytes:
                break
            self._total -= old.stat().st_size
            old.unlink()
            deleted.append(old.name)
        return deleted

    def _write(self, record: dict[str, Any]) -> None:
        """Write ``record`` durably, in a new segment when it would overflow this one (the lock held)."""
        estimate = len(json.dumps(record, separators=(",", ":"))) + 256  # plus the chain's fields
        if self._fd is None or self._size + estimate > self.segment_bytes:
            self._open_next()
            deleted = self._enforce_budget()
            if deleted:  # said in the chain, so a reader tells rotation from records removed by someone
                # the first record kept, or the next one when the kept segment is the new, empty one
                kept = next((seq for seq, _ in _chained(_segments(self.root)[0])), self._last_seq + 1)
                self._chain({"time": _now(), "unix_time": time.time(), "kind": "rotation",
                             "deleted_segments": deleted, "kept_from": kept})
        self._chain(record)

    def _chain(self, record: dict[str, Any]) -> None:
        """Link ``record`` to the one before it, append it and fsync."""
        assert self._fd is not None
        record.update(seq=self._last_seq + 1, prev=self._last_link, alg=HMAC_ALG if self.key else HASH_ALG)
        body = json.dumps(record, separators=(",", ":")).encode()
        link = _link(self.key, self._last_link, body)
        line = body[:-1] + f',"link":"{link}"}}\n'.encode()
        os.write(self._fd, line)
        os.fsync(self._fd)
        self._size += len(line)
        self._total += len(line)
        self._last_seq, self._last_link = record["seq"], link

    def note_dropped(self) -> None:
        """A record the guard could not keep (backlog full): the next record written says how many."""
        with self._lock:
            self._dropped += 1

    def append(self, x: np.ndarray, **fields: Any) -> str:
        """Write one record durably; returns the input's SHA-256."""
        data = np.ascontiguousarray(x, dtype=np.float32)
        raw = data.tobytes()
        digest = hashlib.sha256(raw).hexdigest()
        record = {"time": _now(), "unix_time": time.time(), **fields, "shape": list(data.shape),
                  "datatype": "FP32", "sha256": digest, "tensor_b64": base64.b64encode(raw).decode("ascii")}
        with self._lock:
            if self._dropped:
                record["dropped_before"], self._dropped = self._dropped, 0
            self._write(record)
        return digest

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class EvidenceAudit:
    """What :func:`audit_evidence` found: the records (oldest first) and what is wrong with the chain."""

    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    authenticated: bool = False  # every chained record's HMAC verified with the key given
    keyed: bool = False  # records carry HMAC links
    unchained: int = 0  # legacy records without a link

    @property
    def altered(self) -> int:
        return sum(not r["intact"] for r in self.records)


def _span(lo: int, hi: int) -> str:
    return f"seq {lo}" if lo == hi else f"seq {lo}-{hi}"


def _spans(seqs: list[int]) -> str:
    """``seq 3-5`` for a run, ``seq 3,7`` otherwise."""
    if seqs == list(range(seqs[0], seqs[-1] + 1)):
        return _span(seqs[0], seqs[-1])
    return "seq " + ",".join(map(str, seqs))


def audit_evidence(root: str | Path, key: bytes | None = None) -> EvidenceAudit:
    """Read every record and check the chain; a directory of ``serve --workers`` (one chain per worker in
    ``worker-N/``, records of an earlier one-process guard beside them) is read chain by chain, records merged
    in time order with ``worker`` set and ``segment`` naming the worker's directory."""
    root = Path(root)
    workers = sorted(p for p in root.glob("worker-*") if p.is_dir() and p.name[len("worker-"):].isdigit())
    if not workers:
        return _audit_chain(root, key)
    chains = ([("", _audit_chain(root, key))] if _segments(root) else []) + [(p.name, _audit_chain(p, key))
                                                                            for p in workers]
    audit = EvidenceAudit(keyed=any(a.keyed for _, a in chains), unchained=sum(a.unchained for _, a in chains))
    for name, chain in chains:
        for record in chain.records:
            record["worker"] = name
            record["segment"] = f"{name}/{record['segment']}" if name else record["segment"]
        audit.records.extend(chain.records)
        audit.problems.extend(f"{name}/{p}" if name else p for p in chain.problems)
    audit.records.sort(key=lambda r: float(r.get("unix_time") or 0.0))
    written = [a for _, a in chains if a.records]
    audit.authenticated = key is not None and bool(written) and all(a.authenticated for a in written)
    return audit


def _audit_chain(root: Path, key: bytes | None) -> EvidenceAudit:
    """Read every record of one chain (one directory of segments) and check it.

    Each flagged-input record gets ``intact`` (its tensor matches its SHA-256
    and its link matches its bytes) and ``problem`` (empty, or what is wrong:
    rewritten, records removed before it, out of order). Torn lines (a crash
    mid-write) are skipped.
    """
    audit = EvidenceAudit()
    lines: list[tuple[str, int, dict[str, Any], bytes | None, str | None]] = []
    for segment in _segments(Path(root)):
        with open(segment, "rb") as fh:
            content = fh.read().split(b"\n")
        for number, line in enumerate(content, 1):
            if not line:
                continue
            try:
                record, body, link = _split(line)
                if record.get("kind") != "rotation":
                    base64.b64decode(record["tensor_b64"], validate=True)
            except (ValueError, KeyError, TypeError):
                if number < len(content):  # a whole line: not a tail torn by a crash (one write, no newline)
                    audit.problems.append(f"{segment.name}:{number}: unreadable record")
                continue
            lines.append((segment.name, number, record, body, link))
    seqs = {r["seq"] for _, _, r, _, _ in lines if isinstance(r.get("seq"), int)}
    kept_from = 1
    for _, _, r, body, _ in lines:
        if body is not None and r.get("kind") == "rotation" and isinstance(r.get("kept_from"), int):
            kept_from = r["kept_from"]  # the latest rotation's word counts
    last_seq, last_link = None, None
    verified = failed = 0
    for name, number, record, body, link in lines:
        where = f"{name}:{number}"
        problems = []
        seq, prev, alg = record.get("seq"), record.get("prev"), record.get("alg")
        if body is None and "seq" not in record:
            audit.unchained += 1  # written before records were chained
        else:
            audit.keyed |= alg == HMAC_ALG
            if body is None:  # chained once; its bytes changed since (re-serialised, fields added or removed)
                problems.append("rewritten: its bytes are not those its link was computed over")
            elif alg == HASH_ALG or (alg == HMAC_ALG and key is not None):
                if hmac.compare_digest(_link(key if alg == HMAC_ALG else None, str(prev), body), str(link)):
                    verified += alg == HMAC_ALG
                else:
                    failed += alg == HMAC_ALG
                    problems.append("rewritten: its " + ("HMAC" if alg == HMAC_ALG else "SHA-256 link")
                                    + " does not match its content")
                if alg == HASH_ALG and key is not None:
                    problems.append("not authenticated: written without the key (or forged)")
            elif alg != HMAC_ALG:
                problems.append(f"unknown link algorithm {alg!r}")
            if not isinstance(seq, int):
                problems.append("no sequence number")
            elif last_seq is None:
                if seq > kept_from:
                    problems.append(f"{_span(kept_from, seq - 1)} removed before it (the first record kept "
                                    f"by rotation is seq {kept_from})")
            elif seq <= last_seq:
                problems.append(f"out of order: seq {seq} comes after seq {last_seq}")
            elif seq > last_seq + 1:
                gone = [s for s in range(last_seq + 1, seq) if s not in seqs]
                if gone:
                    problems.append(f"{_spans(gone)} removed before it")
                if len(gone) < seq - last_seq - 1:
                    later = [s for s in range(last_seq + 1, seq) if s in seqs]
                    problems.append(f"out of order: {_spans(later)} should come before it")
            elif prev != last_link:
                problems.append(f"does not follow seq {last_seq}: the record before it was replaced")
            if isinstance(seq, int) and (last_seq is None or seq > last_seq):
                last_seq, last_link = seq, link
        if record.get("kind") == "rotation":
            audit.problems.extend(f"{where} (rotation record): {p}" for p in problems)
            continue
        raw = base64.b64decode(record.pop("tensor_b64"))
        if hashlib.sha256(raw).hexdigest() != record.get("sha256"):
            problems.insert(0, "rewritten: the tensor does not match its SHA-256")
        record["intact"] = not any(p.startswith(("rewritten", "not authenticated")) for p in problems)
        try:
            record["x"] = np.frombuffer(raw, dtype=np.float32).reshape(record["shape"])
        except (ValueError, KeyError, TypeError):
            record["intact"], record["x"] = False, None
        record["segment"], record["line"] = name, number
        record["problem"] = "; ".join(problems)
        audit.problems.extend(f"{where} (seq {record.get('seq', '?')}, request {record.get('request_id') or '-'}): "
                              f"{p}" for p in problems)
        audit.records.append(record)
    audit.authenticated = key is not None and verified > 0 and failed == 0 and not audit.problems
    if key is not None and verified == 0 and failed:
        audit.problems.append("no record verifies with this key: is it the key the guard was given?")
    return audit


def read_evidence(root: str | Path, key: bytes | None = None) -> Iterator[dict[str, Any]]:
    """Every flagged-input record, oldest first, with ``x`` decoded; torn lines are skipped.

    A record that no longer matches its SHA-256 or its link is yielded with
    ``"intact": False`` so an investigator sees it was altered; ``problem``
    says what :func:`audit_evidence` found.
    """
    yield from audit_evidence(root, key).records
