"""The benches' load driver: ``concurrency`` threads calling a function in a loop for a while. No project
imports, so a client in a process of its own (bench/peers/triton_drive.py) uses it too."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def drive(call: Callable[[Any], Any], items: Sequence[Any], concurrency: int, seconds: float,
          count_errors: bool = False) -> dict:
    """``concurrency`` threads call ``call(item)`` (items cycled) for ``seconds``: latency percentiles of the
    calls that succeeded, their rate, and this process's CPU seconds over the cell. A call that raises stops the
    cell and is raised here, unless ``count_errors``: then it is counted (``errors``) and not timed."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    failures: list[BaseException] = []
    stop = threading.Event()

    def worker(k: int) -> None:
        i = k
        while not stop.is_set():
            start = time.perf_counter()
            try:
                call(items[i % len(items)])
            except Exception as exc:  # noqa: BLE001 - counted, or handed to the caller
                if not count_errors:
                    failures.append(exc)
                    stop.set()
                    return
                errors[k] += 1
            else:
                latencies[k].append(time.perf_counter() - start)
            i += concurrency

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    cpu, began = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    if failures:
        raise failures[0]
    lat = np.concatenate([np.array(x) for x in latencies]) * 1000 if any(latencies) else np.array([np.nan])
    done = sum(map(len, latencies))
    return {"requests": done, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "per_s": done / elapsed, "errors": int(sum(errors)), "client_cpu_s": round(cpu, 2),
            "seconds": round(elapsed, 2)}
