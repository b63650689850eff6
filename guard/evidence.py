"""Evidence of flagged inputs: an append-only store on local disk, durable and bounded.

Records are JSON lines in segment files ``evidence-00000001.jsonl``. Each holds
the input tensor (base64 of its float32 bytes, with shape), the SHA-256 of those
bytes, the scores, the verdict, the time and the request id. Every record is
written with one ``write`` on a file opened for appending and ``fsync``-ed
before the guard answers, so a record the guard reported survives a crash. A
process that starts again never appends after a possibly torn tail: it opens a
new segment. When the store exceeds its byte budget the oldest segments go.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

PREFIX = "evidence-"
SUFFIX = ".jsonl"


def _segments(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(f"{PREFIX}*{SUFFIX}") if p.stem[len(PREFIX):].isdigit())


class EvidenceStore:
    def __init__(self, root: str | Path, max_bytes: int = 1 << 30, segment_bytes: int = 64 << 20) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        existing = _segments(self.root)
        self._seq = int(existing[-1].stem[len(PREFIX):]) if existing else 0
        self._fd: int | None = None
        self._size = 0
        self._total = sum(p.stat().st_size for p in existing)

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

    def _enforce_budget(self) -> None:
        for old in _segments(self.root)[:-1]:  # never the segment being written
            if self._total <= self.max_bytes:
                break
            self._total -= old.stat().st_size
            old.unlink()

    def append(self, x: np.ndarray, **fields: Any) -> str:
        """Write one record durably; returns the input's SHA-256."""
        data = np.ascontiguousarray(x, dtype=np.float32)
        raw = data.tobytes()
        digest = hashlib.sha256(raw).hexdigest()
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "unix_time": time.time(),
                  **fields, "shape": list(data.shape), "datatype": "FP32", "sha256": digest,
                  "tensor_b64": base64.b64encode(raw).decode("ascii")}
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd is None or self._size + len(line) > self.segment_bytes:
                self._open_next()
                self._enforce_budget()
            os.write(self._fd, line)
            os.fsync(self._fd)
            self._size += len(line)
            self._total += len(line)
        return digest

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_evidence(root: str | Path) -> Iterator[dict[str, Any]]:
    """Every intact record, oldest first, with ``x`` decoded; torn or tampered lines are skipped.

    A record whose tensor no longer matches its SHA-256 is yielded with
    ``"intact": False`` so an investigator sees it was altered.
    """
    for segment in _segments(Path(root)):
        with open(segment, "rb") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                    raw = base64.b64decode(record.pop("tensor_b64"), validate=True)
                except (ValueError, KeyError, TypeError):
                    continue  # a tail torn by a crash
                record["intact"] = hashlib.sha256(raw).hexdigest() == record.get("sha256")
                try:
                    record["x"] = np.frombuffer(raw, dtype=np.float32).reshape(record["shape"])
                except ValueError:
                    record["intact"], record["x"] = False, None
                record["segment"] = segment.name
                yield record
