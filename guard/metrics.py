"""Prometheus metrics of the guard (prefix ``trojan_guard_``, base units, bounded labels).

Labels take values from small fixed sets (model name, verdict, action,
detector, stage, status code, reason); never a label per request.

Under ``serve --workers K`` each worker process writes its metrics to files in
prometheus-client's multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``, set
by the supervisor) and the supervisor's /metrics endpoint adds them up:
counters and histograms are summed over the workers (those that exited
included); each gauge says how (``multiprocess_mode``: in-flight requests and
queue depth summed over live workers, readiness the minimum, the bundle's
thresholds the most recent value).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from guard.screens.registry import DETECTORS

PREFIX = "trojan_guard"
# seconds: fine below 10 ms, where one screened MNIST request lives
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
                   0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STAGES = ("decode", "queue", "model", "screen", "evidence", "total")
# p-values: resolve the small ones, where a budget of 0.1-5 % refuses
P_VALUE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess() -> bool:
    """Whether this process writes its metrics to prometheus-client's multiprocess files (a --workers worker)."""
    return bool(os.environ.get(MULTIPROCESS_DIR))


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry that adds up the metrics every worker wrote under ``path`` (the supervisor serves it)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return registry


def score_buckets(side: str, calibration_scores: list[float], frr: float) -> tuple[float, ...]:
    """Buckets for a detector's scores: dense around where the clean calibration scores' ``frr`` tail begins."""
    s = np.asarray(calibration_scores, dtype=np.float64)
    tail = float(np.quantile(s, frr if side == "low" else 1 - frr))
    lo, hi = min(0.0, float(s.min())), max(float(s.max()), 0.0)
    return threshold_buckets(tail, lo - 0.5 * (hi - lo) * (side == "low"), hi + (hi - lo) * (side == "high"))


def threshold_buckets(threshold: float, lo: float, hi: float, count: int = 16) -> tuple[float, ...]:
    """Buckets that resolve the region around ``threshold``: dense near it, coarse over [lo, hi]."""
    around = threshold + abs(threshold if threshold else 1.0) * np.array(
        [-0.5, -0.3, -0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
    span = np.linspace(lo, hi, count)
    edges = sorted({float(f"{v:.6g}") for v in np.concatenate([around, span]) if math.isfinite(v)})
    return tuple(edges)


class GuardMetrics:
    """All metrics of one guard process, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 score_buckets: dict[str, tuple[float, ...]] | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, p = self.registry, PREFIX
        self.requests = Counter(f"{p}_requests", "Inference requests answered or refused, by verdict and action "
                                "(action: answered, refused, error)", ["model", "verdict", "action"], registry=r)
        self.inputs = Counter(f"{p}_inputs", "Inputs (images) screened, by verdict", ["model", "verdict"],
                              registry=r)
        self.detections = Counter(f"{p}_detections", "Inputs flagged, by the detector(s) behind the refusal",
                                  ["model", "detector"], registry=r)
        self.predictions = Counter(f"{p}_predictions", "Predicted class of answered inputs",
                                   ["model", "class_name"], registry=r)
        # one histogram per detector (guard.screens.registry), named by its score, with buckets around the
        # serving bundle's threshold where it has the detector
        self.scores = {d.score_name: Histogram(f"{p}_{d.score_name}", d.score_help, ["model"], registry=r,
                                               buckets=(score_buckets or {}).get(d.score_name)
                                               or Histogram.DEFAULT_BUCKETS)
                       for d in DETECTORS}
        self.p_value = Histogram(f"{p}_p_value", "p-value of each input against the clean calibration images, "
                                 "by detector (combined: the verdict's)", ["model", "detector"],
                                 buckets=P_VALUE_BUCKETS, registry=r)
        self.threshold = Gauge(f"{p}_threshold", "p-value at or below which an input is refused (combined: the "
                               "verdict; a detector: its expert override)", ["model", "detector"], registry=r,
                               multiprocess_mode="livemostrecent")
        self.target_rate = Gauge(f"{p}_target_false_positive_rate",
                                 "False-positive (clean rejection) rate each threshold was calibrated for",
                                 ["model", "detector"], registry=r, multiprocess_mode="livemostrecent")
        self.clean_entropy_mean = Gauge(f"{p}_strip_clean_entropy_mean",
                                        "Mean STRIP entropy of clean calibration inputs", ["model"], registry=r,
                                        multiprocess_mode="livemostrecent")
        self.clean_entropy_std = Gauge(f"{p}_strip_clean_entropy_std",
                                       "Standard deviation of clean STRIP calibration entropies", ["model"],
                                       registry=r, multiprocess_mode="livemostrecent")
        self.latency = Histogram(f"{p}_stage_duration_seconds", "Time spent per stage (total: whole request)",
                                 ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_inputs = Histogram(f"{p}_batch_inputs", "Inputs per screened batch",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_requests = Histogram(f"{p}_batch_requests", "Requests per screened batch",
                                        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.queue_depth = Gauge(f"{p}_queue_depth", "Requests waiting for a batch", registry=r,
                                 multiprocess_mode="livesum")
        self.in_flight = Gauge(f"{p}_in_flight_requests", "Inference requests being handled", registry=r,
                               multiprocess_mode="livesum")
        self.request_errors = Counter(f"{p}_request_errors", "Requests that failed, by gRPC status and reason",
                                      ["model", "code", "reason"], registry=r)
        self.upstream_errors = Counter(f"{p}_upstream_errors", "Failed calls to the upstream model server",
                                       ["code"], registry=r)
        self.screening_failures = Counter(f"{p}_screening_failures",
                                          "Batches whose screens could not run, by fail mode taken",
                                          ["mode"], registry=r)
        self.evidence_records = Counter(f"{p}_evidence_records", "Flagged inputs written to the evidence store",
                                        registry=r)
        self.evidence_dropped = Counter(f"{p}_evidence_dropped", "Flagged inputs not written to the evidence "
                                        "store because --evidence-max-backlog records were already waiting",
                                        registry=r)
        self.evidence_errors = Counter(f"{p}_evidence_errors", "Evidence writes that failed", registry=r)
        self.evidence_bytes = Gauge(f"{p}_evidence_bytes", "Bytes held by the evidence store", registry=r,
                                    multiprocess_mode="livesum")
        self.reloads = Counter(f"{p}_bundle_reloads", "Bundle reloads, by result", ["result"], registry=r)
        self.bundle_loaded = Gauge(f"{p}_bundle_loaded_timestamp_seconds",
                                   "Unix time the serving bundle was swapped in", registry=r,
                                   multiprocess_mode="livemostrecent")
        self.bundle_created = Gauge(f"{p}_bundle_created_timestamp_seconds",
                                    "Unix time the serving bundle was written by the patch job", registry=r,
                                    multiprocess_mode="livemostrecent")
        self.ready = Gauge(f"{p}_ready", "1 when the guard serves (bundle loaded and warmed up; with --workers, "
                           "every live worker)", registry=r, multiprocess_mode="livemin")
        self.build_info = Gauge(f"{p}_build_info", "Guard version and serving bundle (value 1)",
                                ["version", "model", "bundle_sha256", "policy", "backend"], registry=r,
                                multiprocess_mode="livemax")
        self.stage = {stage: self.latency.labels(stage) for stage in STAGES}  # request path: no label lookup
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._polled: list[tuple[Gauge, Callable[[], float]]] = []

    def set_function(self, gauge: Gauge, fn: Callable[[], float]) -> None:
        """The gauge reads ``fn()``: at each scrape, or, in a worker's multiprocess files, at each :meth:`poll`."""
        if multiprocess():
            self._polled.append((gauge, fn))
        else:
            gauge.set_function(fn)

    def poll(self) -> None:
        """Write the current value of each function gauge (a worker does this every second)."""
        for gauge, fn in self._polled:
            gauge.set(fn())

    @staticmethod
    def clear(gauge: Gauge) -> None:
        """Forget a gauge's label sets (a reload's old bundle). Multiprocess files cannot drop a series: there
        its old label sets are set to 0 first, so a series of the old bundle reads 0, not its last value."""
        if multiprocess():
            for child in list(gauge._metrics.values()):
                child.set(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                gauge.clear()
        else:
            gauge.clear()

    def child(self, metric: Counter | Gauge | Histogram, *values: str) -> Any:
        """``metric.labels(*values)``, remembered: the request path skips prometheus-client's lookup and lock."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def serve(self, host: str, port: int):
        """Start the /metrics HTTP endpoint; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)
