"""The data plane without gRPC: fail-open and fail-closed when the screens cannot run, what it measures."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from guard.bundle import GuardBundle
from guard.dataplane import Guard
from guard.errors import ScreeningFailed
from guard.settings import GuardSettings


class _NoBlends:
    """Wraps the real backend; fails when asked for more rows than the inputs (the STRIP blends)."""

    name = "embedded"

    def __init__(self, backend, rows: int) -> None:
        self.backend, self.rows = backend, rows

    def infer(self, x: np.ndarray):
        if len(x) > self.rows:
            raise MemoryError("out of memory for the blend batch")
        return self.backend.infer(x)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.infer(x)[0]

    def close(self) -> None:
        self.backend.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["closed", "open"])
def test_screening_failure_follows_the_fail_mode(mode: str, guard_only_bundle: Path,
                                                 traffic: dict[str, np.ndarray]) -> None:
    bundle = GuardBundle.load(guard_only_bundle)
    guard = Guard(GuardSettings(bundle=guard_only_bundle, fail_mode=mode, metrics_port=0), bundle)
    x = traffic["triggered_x"][:2]

    async def run():
        await guard.start()
        guard.state.backend = _NoBlends(guard.state.backend, rows=len(x))
        try:
            return await guard.infer(x)
        finally:
            await guard.close()

    if mode == "closed":
        with pytest.raises(ScreeningFailed, match="could not run.*MemoryError.*fails closed") as info:
            asyncio.run(run())
        assert info.value.code == "UNAVAILABLE"
    else:
        decision = asyncio.run(run())
        assert decision.verdict == "unscreened" and not decision.flagged
        assert decision.logits.shape == (2, 10)
    failures = guard.metrics.screening_failures.labels(mode)._value.get()
    assert failures == 1


def test_providers_resolve_short_names_and_keep_the_cpu_as_fallback() -> None:
    import onnxruntime as ort

    from guard.settings import resolve_providers

    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers(" CPUExecutionProvider ,") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="no CUDAExecutionProvider .*onnxruntime-gpu.*it has .*CPUExecution"):
            resolve_providers("cuda")
    with pytest.raises(ValueError, match="has no NoSuchProvider"):
        resolve_providers("NoSuchProvider")


def test_the_model_stage_records_each_batch_once_with_all_its_model_calls(committed_bundle: Path) -> None:
    """A batch that calls the model three times (a sequential STRIP's rounds) is one observation of the "model"
    stage, the sum of its calls; the "screen" stage gets the rest of the batch's time."""
    bundle = GuardBundle.load(committed_bundle)
    guard = Guard(GuardSettings(bundle=committed_bundle, admin_address="off", metrics_port=0), bundle)
    x = bundle.pool[:3]
    calls: list[float] = []

    async def run():
        await guard.start()
        state = guard.current_state()
        backend = state.backend
        screen_run = state.screen.run

        def three_rounds(infer, batch, **kwargs):  # two extra model calls before the real screening
            for _ in range(2):
                infer(batch)
            return screen_run(infer, batch, **kwargs)

        class Timed:
            name = backend.name

            def infer(self, batch):
                start = time.perf_counter()
                try:
                    return backend.infer(batch)
                finally:
                    calls.append(time.perf_counter() - start)

            def logits(self, batch):
                return self.infer(batch)[0]

            def close(self):
                backend.close()

        state.backend, state.screen.run = Timed(), three_rounds
        latency = guard.metrics.latency
        before = (_sample(latency, "model", "_count"), _sample(latency, "model", "_sum"))
        calls.clear()
        try:
            await guard.infer(x)
        finally:
            await guard.close()
        return before, (_sample(latency, "model", "_count"), _sample(latency, "model", "_sum"))

    (count0, sum0), (count1, sum1) = asyncio.run(run())
    assert len(calls) >= 3
    assert count1 - count0 == 1  # one batch, one observation (was: one per call, each the running total)
    assert sum1 - sum0 == pytest.approx(sum(calls), rel=0.05, abs=1e-3)


def _sample(histogram, stage: str, suffix: str) -> float:
    """The stage histogram's _count or _sum for one stage."""
    return next(s.value for metric in histogram.collect() for s in metric.samples
                if s.name.endswith(suffix) and s.labels.get("stage") == stage)
