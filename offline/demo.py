"""The demo's last act: serve the bundle with ``trojan-guard serve`` and send it traffic over gRPC."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from guard.transport.client import Answer, free_port, local_guard
from offline.errors import ForensicsError


def _rate(part: int, whole: int) -> str:
    return f"{part}/{whole} ({part / whole:.1%})" if whole else "0/0"


def serve_and_send(bundle: Path, out: Path, clean_x: np.ndarray, clean_y: np.ndarray, triggered_x: np.ndarray,
                   triggered_y: np.ndarray, target: int, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Start the guard on the bundle, send clean and triggered images one request each, stop the guard."""
    port, metrics_port = free_port(8001), free_port(8002)
    log_path = out / "guard.log"
    evidence = out / "evidence"
    say(f"trojan-guard serve --bundle {bundle} --port {port} --metrics-port {metrics_port} "
        f"--evidence-dir {evidence}   (log: {log_path})")
    try:
        with local_guard(bundle, "--evidence-dir", str(evidence), port=port, metrics_port=metrics_port,
                         log_path=log_path) as client:
            clean = [client.infer(x[None], request_id=f"demo-clean-{i}") for i, x in enumerate(clean_x)]
            triggered = [client.infer(x[None], request_id=f"demo-triggered-{i}")
                         for i, x in enumerate(triggered_x)]
            metrics_url = client.metrics_url
            counts = [line for line in urllib.request.urlopen(metrics_url, timeout=5).read().decode().splitlines()
                      if line.startswith("trojan_guard_requests_total")]
    except RuntimeError as exc:
        raise ForensicsError(str(exc)) from exc

    def answered(answers: list[Answer], labels: np.ndarray, cls: int | None = None) -> int:
        return sum(a.answered and int(a.classes[0]) == (int(y) if cls is None else cls)
                   for a, y in zip(answers, labels, strict=True))

    latencies = np.array([a.latency_s for a in clean + triggered]) * 1000
    failed = [a for a in clean + triggered if not (a.answered or a.refused)]
    summary = {
        "clean": {"sent": len(clean), "answered": sum(a.answered for a in clean),
                  "answered_correctly": answered(clean, clean_y), "refused": sum(a.refused for a in clean)},
        "triggered": {"sent": len(triggered), "refused": sum(a.refused for a in triggered),
                      "answered_true_class": answered(triggered, triggered_y),
                      "answered_attacker_target": answered(triggered, triggered_y, target)},
        "latency_ms": {"p50": round(float(np.percentile(latencies, 50)), 2),
                       "p99": round(float(np.percentile(latencies, 99)), 2)},
        "errors": len(failed), "metrics_url": metrics_url, "evidence": str(evidence),
    }
    c, t = summary["clean"], summary["triggered"]
    say(f"clean images:     answered {_rate(c['answered'], c['sent'])}, with the right class "
        f"{_rate(c['answered_correctly'], c['sent'])}; refused {_rate(c['refused'], c['sent'])}")
    say(f"triggered images: refused {_rate(t['refused'], t['sent'])}; answered with the true class "
        f"{_rate(t['answered_true_class'], t['sent'])}; with the attacker's class {target} "
        f"{_rate(t['answered_attacker_target'], t['sent'])}")
    say(f"latency per request through gRPC: p50 {summary['latency_ms']['p50']} ms, p99 "
        f"{summary['latency_ms']['p99']} ms; {len(failed)} error(s)"
        + (f" (first: {failed[0].code} {failed[0].message})" if failed else ""))
    say(f"metrics were at {metrics_url} (the guard has stopped); its request counters:")
    for line in counts:
        say("  " + line)
    return summary
