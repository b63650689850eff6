"""Dynamic batching: concurrent requests screened together, closed by size or delay.

Each request puts its inputs and a future on a queue. One worker takes the
first waiting request, keeps taking requests while the batch stays within
``max_batch`` inputs and ``max_delay`` has not passed, runs the batch function
in a worker thread (onnxruntime releases the GIL) and hands each request its
slice of the result, or the exception to every request of a failed batch.
A request larger than ``max_batch`` runs as a batch of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future
    enqueued: float


class AdaptiveBatcher:
    """Batch ``run(list of arrays) -> list of results`` over concurrent ``submit`` calls."""

    def __init__(self, run: Callable[[Sequence[np.ndarray]], Sequence[Any]], max_batch: int,
                 max_delay_s: float, executor: Executor | None = None,
                 on_batch: Callable[[int, list[float]], None] | None = None) -> None:
        self._run = run
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._executor = executor
        self._on_batch = on_batch  # (inputs in the batch, each request's wait in s)
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._worker: asyncio.Task | None = None
        self._closing = False
        self.waiting_inputs = 0  # inputs submitted and not yet taken into a batch

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return self._queue.qsize()

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._loop(), name="guard-batcher")

    async def submit(self, x: np.ndarray) -> Any:
        if self._closing:
            raise RuntimeError("batcher is closed")
        self.start()
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(x, future, time.perf_counter()))
        self.waiting_inputs += len(x)
        return await future

    async def close(self) -> None:
        """Finish every request already queued, then stop."""
        self._closing = True
        if self._worker is not None:
            self._queue.put_nowait(None)
            await self._worker
            self._worker = None

    async def _collect(self, first: _Pending) -> tuple[list[_Pending], bool]:
        batch, size = [first], len(first.x)
        deadline = first.enqueued + self.max_delay_s
        while size < self.max_batch:
            try:
                if self._queue.empty():
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    nxt = await asyncio.wait_for(self._queue.get(), remaining)
                else:
                    nxt = self._queue.get_nowait()
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            if nxt is None:
                return batch, True
            if size + len(nxt.x) > self.max_batch:
                self._carry = nxt
                break
            batch.append(nxt)
            size += len(nxt.x)
        return batch, False

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        self._carry: _Pending | None = None
        stop = False
        while not stop or self._carry is not None:
            first = self._carry
            self._carry = None
            if first is None:
                item = await self._queue.get()
                if item is None:
                    stop = True
                    continue
                first = item
            batch, stopped = await self._collect(first)
            stop = stop or stopped
            self.waiting_inputs -= sum(len(p.x) for p in batch)
            batch = [p for p in batch if not p.future.cancelled()]
            if not batch:
                continue
            if self._on_batch is not None:
                now = time.perf_counter()
                self._on_batch(sum(len(p.x) for p in batch), [now - p.enqueued for p in batch])
            try:
                results = await loop.run_in_executor(self._executor, self._run, [p.x for p in batch])
            except Exception as exc:  # delivered to every waiter of this batch
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, result in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(result)
