"""Deployment exposure, the forensic report's impact in production: what the guard saw while it served the model.

From the guard's evidence store (``serve --evidence-dir``) and, optionally, a Prometheus snapshot of its metrics
(a file saved from ``/metrics`` or the endpoint's URL): how many requests and inputs the model served since the
bundle was loaded, how many were flagged and by which detector, the first and last flagged time, the classes
the flagged inputs were answered with, whether the evidence chain is intact, and the flagged inputs themselves
(``exposure_inputs.png``). ``trojan-forensics report --evidence DIR [--metrics FILE_OR_URL]`` writes it into the
report as ``exposure.json``.
"""

from __future__ import annotations

import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from guard.evidence import audit_evidence
from offline.errors import DataError
from offline.plots import image_strip_png

PREFIX = "trojan_guard_"
STRIP_INPUTS = 10  # flagged inputs shown in the report


def read_metrics(source: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """Counts from a Prometheus text exposition (a file, or an http(s) URL such as the guard's /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=timeout_s) as response:  # noqa: S310 (the user's URL)
                text = response.read().decode()
        else:
            text = Path(source).read_text()
        families = list(text_string_to_metric_families(text))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"--metrics {source}: not a readable Prometheus text exposition ({exc})") from exc
    samples = [s for f in families for s in f.samples]
    if not any(s.name.startswith(PREFIX) for s in samples):
        raise DataError(f"--metrics {source}: no trojan_guard_* metrics in it; give the guard's /metrics "
                        f"(serve --metrics-port) or a file saved from it")

    def total(name: str, by: str | None = None) -> Any:
        rows = [s for s in samples if s.name == PREFIX + name]
        if by is None:
            return sum(s.value for s in rows)
        out: Counter[str] = Counter()
        for s in rows:
            out[s.labels.get(by, "")] += s.value
        return {k: int(v) for k, v in sorted(out.items())}

    info = next((s.labels for s in samples if s.name == PREFIX + "build_info"), {})
    loaded = next((s.value for s in samples if s.name == PREFIX + "bundle_loaded_timestamp_seconds"), None)
    return {
        "source": source,
        "requests_by_action": total("requests_total", "action"),
        "requests_by_verdict": total("requests_total", "verdict"),
        "inputs_by_verdict": total("inputs_total", "verdict"),
        "flagged_by_detector": total("detections_total", "detector"),
        "answered_classes": total("predictions_total", "class_name"),
        "bundle_sha256": info.get("bundle_sha256"),
        "policy": info.get("policy"),
        "bundle_loaded_unix_time": loaded,
    }


def deployment_exposure(evidence_dir: str | Path, metrics: str | None = None, key: bytes | None = None
                        ) -> tuple[dict[str, Any], bytes | None]:
    """(the exposure summary, a PNG strip of flagged inputs or None) for the report.

    Every record of the store counts; ``bundles`` says how many came from each bundle the guard served (a
    report rebuilt into the bundle changes its guard.json, so its identity too).
    """
    root = Path(evidence_dir)
    if not root.is_dir():
        raise DataError(f"--evidence {root}: not a directory (give the guard's --evidence-dir)")
    found = audit_evidence(root, key)
    records = found.records  # flagged inputs, oldest first, tensors decoded (rotation records left out)
    by_detector: Counter[str] = Counter(d for r in records for d in r.get("detectors", []))
    answered: Counter[str] = Counter(str(r.get("predicted", "?")) for r in records)
    times = sorted(str(r["time"]) for r in records if r.get("time"))
    summary: dict[str, Any] = {
        "evidence_dir": str(root),
        "flagged_inputs": len(records),
        "bundles": dict(Counter(str(r.get("bundle_sha256", "?"))[:12] for r in records).most_common()),
        "requests": len({r.get("request_id") or f"#{r.get('seq')}" for r in records}),
        "flagged_by_detector": dict(by_detector.most_common()),
        "answered_with": dict(answered.most_common()),
        "first_flagged": times[0] if times else None,
        "last_flagged": times[-1] if times else None,
        "chain": {"altered": sum(not r.get("intact", True) for r in records), "problems": found.problems[:5],
                  "authenticated": found.authenticated, "keyed": found.keyed},
    }
    if metrics:
        summary["metrics"] = read_metrics(metrics)
    shown = [(r["x"], f"{r.get('predicted', '?')} ({'+'.join(r.get('detectors', [])) or '-'})")
             for r in records[-STRIP_INPUTS:] if r.get("x") is not None and r["x"].ndim == 3]
    if not shown:
        return summary, None
    summary["strip"] = {"file": "exposure_inputs.png", "inputs": len(shown)}
    return summary, image_strip_png([x for x, _ in shown], [c for _, c in shown])
