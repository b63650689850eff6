"""Dynamic batching: concurrent requests share a batch, results and errors go back to the right caller."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from guard.batching import AdaptiveBatcher


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_are_batched_and_answered_in_order() -> None:
    sizes: list[int] = []

    def run(xs):
        sizes.append(sum(len(x) for x in xs))
        time.sleep(0.01)
        return [x * 2 for x in xs]

    async def main():
        batcher = AdaptiveBatcher(run, max_batch=8, max_delay_s=0.05)
        inputs = [np.full((1 + i % 2, 3), i, dtype=np.float32) for i in range(10)]
        results = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        await batcher.close()
        return inputs, results

    inputs, results = _run(main())
    for x, r in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(r, x * 2)
    assert max(sizes) <= 8 and sum(sizes) == 15
    assert len(sizes) < 10, f"requests were not batched: {sizes}"


def test_an_oversized_request_runs_alone_and_a_lone_request_waits_at_most_the_delay() -> None:
    sizes: list[int] = []

    def run(xs):
        sizes.append(sum(len(x) for x in xs))
        return list(xs)

    async def main():
        batcher = AdaptiveBatcher(run, max_batch=4, max_delay_s=0.02)
        start = time.perf_counter()
        await batcher.submit(np.zeros((1, 2)))
        lone = time.perf_counter() - start
        await asyncio.gather(batcher.submit(np.zeros((10, 2))), batcher.submit(np.zeros((1, 2))))
        await batcher.close()
        return lone

    lone = _run(main())
    assert lone < 1.0
    assert 10 in sizes


def test_a_failing_batch_fails_every_request_in_it_and_the_batcher_goes_on() -> None:
    calls = {"n": 0}

    def run(xs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("model crashed")
        return list(xs)

    async def main():
        batcher = AdaptiveBatcher(run, max_batch=8, max_delay_s=0.05)
        first = await asyncio.gather(*(batcher.submit(np.zeros((1, 1))) for _ in range(3)), return_exceptions=True)
        after = await batcher.submit(np.ones((1, 1)))
        await batcher.close()
        return first, after

    first, after = _run(main())
    assert all(isinstance(r, RuntimeError) for r in first)
    np.testing.assert_array_equal(after, np.ones((1, 1)))


def test_close_finishes_queued_requests_then_refuses_new_ones() -> None:
    gate = threading.Event()

    def run(xs):
        gate.wait(5)
        return list(xs)

    async def main():
        batcher = AdaptiveBatcher(run, max_batch=1, max_delay_s=0.0)
        pending = [asyncio.ensure_future(batcher.submit(np.full((1, 1), i))) for i in range(3)]
        await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.01)
        gate.set()
        await closing
        with pytest.raises(RuntimeError, match="closed"):
            await batcher.submit(np.zeros((1, 1)))
        return [p.result() for p in pending]

    results = _run(main())
    assert [float(r[0, 0]) for r in results] == [0.0, 1.0, 2.0]
