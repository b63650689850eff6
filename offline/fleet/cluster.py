"""Ray, the engine fleet scans and shadow-model training run on: importing it with a useful error, and a
session that joins a cluster or starts a local one sized to the machine.

Ray is the optional extra ``fleet`` (``pip install 'trojan-guard[fleet]'``); nothing else imports it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from offline.errors import ForensicsError

INSTALL_HINT = "pip install 'trojan-guard[fleet]'"


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ForensicsError(f"this command runs on Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[dict[str, Any]]:
    """Connect to Ray for the length of the block; yields what the run reports of its cluster.

    ``address``: ``auto`` (the cluster this machine belongs to), ``HOST:PORT`` or ``ray://HOST:10001`` (Ray
    Client); ``None`` starts a local cluster of ``num_cpus`` CPUs (default: all of this machine's), bound to
    loopback, shut down at the end. A session already open in this process (a test's or a bench's cluster) is
    used as it is and left open.
    """
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        try:
            if address:
                ray.init(address=address, **common)
            else:
                # without it Ray 2.60 binds the machine's own address; a local cluster needs loopback only
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
                ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
            raise ForensicsError(f"could not start or join {where}: {exc}") from exc
        started = True
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        yield {"address": address or "local", "nodes": len(nodes),
               "cpus": int(ray.cluster_resources().get("CPU", 0))}
    finally:
        if started:
            ray.shutdown()


def node_id() -> str | None:
    """The Ray node this code runs on (inside a task), or None outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - no Ray, or not in a Ray process
        return None


def run_tasks(task: Callable[..., Any], jobs: Iterable[tuple[Any, tuple]], cpus_per_task: int = 1
              ) -> Iterator[tuple[Any, Any, float]]:
    """Run ``task(*args)`` as a Ray task of ``cpus_per_task`` CPUs for each ``(key, args)`` of ``jobs``; yields
    ``(key, result, seconds since it was submitted)`` as each lands.

    ``jobs`` is drawn lazily, two tasks per free slot of the cluster in flight (not every job's arguments in the
    object store at once); the next is submitted before a result is yielded, so the cluster stays busy while
    the caller writes it. A task whose worker died (killed, out of memory) even after one retry yields the
    ``ray.exceptions.RayError`` as its result. Closing the iterator early cancels what is still running.
    """
    ray = import_ray()
    remote = ray.remote(task).options(num_cpus=cpus_per_task, max_retries=1)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)) // cpus_per_task)
    queue = iter(jobs)
    pending: dict[Any, tuple[Any, float]] = {}

    def fill() -> None:
        while len(pending) < window and (job := next(queue, None)) is not None:
            pending[remote.remote(*job[1])] = (job[0], time.time())

    fill()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            key, submitted = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                result = exc
            fill()
            yield key, result, time.time() - submitted
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def task_failure(exc: BaseException) -> str:
    """One line for a task whose worker died: the error's type and its first line."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
