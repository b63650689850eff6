"""The data plane without gRPC: fail-open and fail-closed when the screens cannot run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from guard.bundle import GuardBundle
from guard.dataplane import Guard
from guard.errors import ScreeningFailed
from guard.settings import GuardSettings

pytestmark = pytest.mark.slow


class _NoBlends:
    """Wraps the real backend; fails when asked for more rows than the inputs (the STRIP blends)."""

    name = "embedded"

    def __init__(self, backend, rows: int) -> None:
        self.backend, self.rows = backend, rows

    def infer(self, x: np.ndarray):
        if len(x) > self.rows:
            raise MemoryError("out of memory for the blend batch")
        return self.backend.infer(x)

    def close(self) -> None:
        self.backend.close()


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
