"""``trojan-guard serve --workers K``: K guard processes on one gRPC port, under one supervisor.

Each worker is a whole guard (``guard.transport.server.serve``) in its own
process, with its own onnxruntime session, batcher and event loop: one Python
process is bound by its interpreter lock and its event loop long before the
model is, so more cores serve more requests only through more processes. The
workers bind the client port together with ``SO_REUSEPORT`` and the kernel
spreads connections over them (a connection stays with one worker; a client
that opens one channel is served by one worker).

The supervisor (this process) holds what must be one per guard:

- the port: it binds it first, without listening, so ``--port 0`` picks one
  port for all and a port another server listens on is refused before any
  worker starts;
- ``/metrics``: the workers write prometheus-client's multiprocess files and
  the supervisor adds them up (``guard.metrics``), with
  ``trojan_guard_workers`` and ``trojan_guard_worker_restarts_total``;
- the admin service on ``--admin-address`` (same token rules): ``Status`` sums
  the workers and lists each, ``ReloadBundle``, SIGHUP and
  ``--watch-bundle-s`` reload them one after another (a worker swaps without
  dropping a request, so the guard never stops serving; for the few seconds
  of the roll, workers serve the old and the new bundle side by side);
- their lives: a worker that dies is started again (backoff 1 s doubling to
  30 s) on the bundle the guard serves now; SIGTERM drains every worker (each
  finishes its in-flight requests within ``--grace-s``) before it exits.

Each worker talks to the supervisor over its own admin socket in a private
directory (mode 0700) and keeps evidence in ``--evidence-dir/worker-N`` (its
own chain, a K-th of ``--evidence-max-bytes``), so records never interleave;
``trojan-guard evidence DIR`` reads them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import mark_process_dead

from guard import __version__
from guard.dataplane import bundle_score_buckets, load_first_bundle
from guard.errors import GuardError, ReloadFailed, exit_status
from guard.metrics import MULTIPROCESS_DIR, PREFIX, GuardMetrics, multiprocess_registry
from guard.settings import GuardSettings
from guard.transport.proto import guard_admin_pb2 as admin_pb
from guard.transport.proto import guard_admin_pb2_grpc as admin_grpc
from guard.transport.server import admin_listener, serve, watch_bundle

log = logging.getLogger("trojan_guard")
RELOAD_TIMEOUT_S = 600.0  # one worker's verify + warm-up (an upstream's check included)
BACKOFF_S = (1.0, 30.0)  # first and longest wait before a dead worker is started again
STEADY_S = 60.0  # a worker that ran this long starts its next backoff from the first wait


class WorkerError(GuardError):
    """A worker's admin call failed: its gRPC status and message, passed on to the admin's caller."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def _worker_error(index: int, exc: grpc.aio.AioRpcError) -> WorkerError:
    return WorkerError(f"worker {index}: {exc.details()}", exc.code().name)


@dataclass
class Worker:
    index: int
    admin: str  # unix:PATH of its admin listener, in the supervisor's private directory
    config: Path  # its settings, written before each start
    proc: asyncio.subprocess.Process | None = None
    channel: grpc.aio.Channel | None = None
    restarts: int = 0
    started_at: float = 0.0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def stub(self) -> admin_grpc.GuardAdminStub:
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.admin)
        return admin_grpc.GuardAdminStub(self.channel)


def _cores() -> int:
    """Cores this process may run on (its CPU set; a CFS quota is not seen: give --threads under one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind ``host:port`` with SO_REUSEPORT without listening: the workers bind beside it, ``port`` 0 becomes one
    free port for all of them, and a port that a server already listens on is refused."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve --host {host} ({exc})") from exc
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        chosen = sock.getsockname()[1]
        # another process with SO_REUSEPORT (of this user) could share the port and take a share of the
        # connections: refuse a port something already listens on
        probe = "127.0.0.1" if family == socket.AF_INET and address[0] in ("0.0.0.0", "") else (
            "::1" if family == socket.AF_INET6 and address[0] in ("::", "") else address[0])
        with contextlib.suppress(OSError), socket.create_connection((probe, chosen), timeout=0.5):
            raise FileExistsError(f"another server listens on port {chosen}")
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind the gRPC port {host}:{port} ({exc.strerror or exc})") from exc
    return sock, chosen


class WorkerPool:
    """The workers of one guard: started, watched, reloaded, stopped, summed."""

    def __init__(self, settings: GuardSettings, run_dir: Path, port: int,
                 score_buckets: dict[str, tuple[float, ...]]) -> None:
        self.settings = settings
        self.score_buckets = score_buckets
        self.port = port
        self.run_dir = run_dir
        self.metrics_dir = run_dir / "metrics"
        self.metrics_dir.mkdir()
        self.bundle_path = Path(settings.bundle)
        self.sha256 = ""  # the bundle every worker serves, once they all do
        self.reloads = 0
        self.started = time.time()
        self.stopping = False
        self.workers = [Worker(i, f"unix:{run_dir}/worker-{i}.sock", run_dir / f"worker-{i}.json")
                        for i in range(settings.workers)]
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.registry = multiprocess_registry(str(self.metrics_dir))
        self.registry.register(PoolCollector(self))

    def _settings_of(self, worker: Worker) -> dict[str, Any]:
        s = self.settings
        update: dict[str, Any] = dict(
            workers=1, port=self.port, metrics_port=0, admin_address=worker.admin, admin_token_file=None,
            watch_bundle_s=0.0, bundle=self.bundle_path,
            # onnxruntime takes every core by default: K workers would each spin that many threads
            threads=s.threads or max(1, _cores() // s.workers))
        if s.evidence_dir is not None:
            share = max(s.evidence_max_bytes // s.workers, 1 << 16)
            update.update(evidence_dir=s.evidence_dir / f"worker-{worker.index}", evidence_max_bytes=share,
                          evidence_segment_bytes=min(s.evidence_segment_bytes, share))
        return s.model_copy(update=update).model_dump(mode="json")

    async def spawn(self, worker: Worker) -> None:
        worker.config.write_text(json.dumps({"index": worker.index, "parent": os.getpid(),
                                             "settings": self._settings_of(worker),
                                             "score_buckets": self.score_buckets}))
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "guard.transport.workers", str(worker.config),
            env={**os.environ, MULTIPROCESS_DIR: str(self.metrics_dir)})
        worker.started_at = time.monotonic()

    async def wait_ready(self, worker: Worker) -> admin_pb.StatusResponse:
        """The worker's status once it serves; GuardError when it exits first."""
        proc = worker.proc
        assert proc is not None
        while True:
            if proc.returncode is not None:
                raise GuardError(f"worker {worker.index} exited with status {proc.returncode} before it was ready "
                                 f"(its error is above)")
            with contextlib.suppress(grpc.aio.AioRpcError):
                status = await worker.stub.Status(admin_pb.StatusRequest(), timeout=2)
                if status.ready:
                    return status
            await asyncio.sleep(0.1)

    def background(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """Start every worker and wait until all serve; the first that fails stops the start."""
        for worker in self.workers:
            await self.spawn(worker)
        waits = [asyncio.ensure_future(self.wait_ready(w)) for w in self.workers]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for wait in waits:
                wait.cancel()
        for wait in waits:
            if wait.done() and not wait.cancelled() and wait.exception() is not None:
                raise wait.exception()  # type: ignore[misc]
        self.sha256 = waits[0].result().bundle_sha256
        for worker in self.workers:
            self.background(self.supervise(worker))

    async def supervise(self, worker: Worker) -> None:
        """Start the worker again whenever it exits, until the pool stops."""
        delay = BACKOFF_S[0]
        while True:
            assert worker.proc is not None
            code = await worker.proc.wait()
            mark_process_dead(worker.proc.pid, str(self.metrics_dir))
            if self.stopping:
                return
            if time.monotonic() - worker.started_at > STEADY_S:
                delay = BACKOFF_S[0]
            log.error("worker %d (pid %d) exited with status %s; starting it again in %.0f s", worker.index,
                      worker.proc.pid, code, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, BACKOFF_S[1])
            if self.stopping:
                return
            async with self._reload_lock:  # it starts on the bundle the others serve, not one mid-roll
                await self.spawn(worker)
                worker.restarts += 1
            self.background(self._announce(worker))

    async def _announce(self, worker: Worker) -> None:
        with contextlib.suppress(GuardError):
            status = await self.wait_ready(worker)
            log.info("worker %d (pid %d) serves again, bundle %s", worker.index, worker.proc.pid,
                     status.bundle_sha256[:12])

    async def reload(self, path: str | Path | None = None) -> tuple[str, str]:
        """Reload every running worker, one after another; returns (previous sha256, new sha256).

        A bundle the first worker refuses changes nothing (its error is returned). One that a later worker
        refuses (its disk, an upstream gone) leaves the workers before it on the new bundle: that is reported.
        """
        async with self._reload_lock:
            target = Path(path) if path else self.bundle_path
            previous, switched = self.sha256, []
            for worker in self.workers:
                try:  # one started again moments ago must first finish loading what it started with
                    await asyncio.wait_for(self.wait_ready(worker), RELOAD_TIMEOUT_S)
                except GuardError:
                    continue  # not running: it starts again on self.bundle_path
                except asyncio.TimeoutError:
                    raise ReloadFailed(f"worker {worker.index} is still starting after {RELOAD_TIMEOUT_S:.0f} s; "
                                       f"reload again once it serves") from None
                try:
                    reply = await worker.stub.ReloadBundle(admin_pb.ReloadBundleRequest(bundle_path=str(target)),
                                                           timeout=RELOAD_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    error = _worker_error(worker.index, exc)
                    if not switched:
                        raise error from None
                    raise ReloadFailed(f"{error}; workers {', '.join(map(str, switched))} already serve {target}, "
                                       f"the others the previous bundle") from None
                switched.append(worker.index)
                self.bundle_path, self.sha256 = target, reply.bundle_sha256
            self.reloads += 1
            log.info("all workers serve bundle %s (%s)", target, self.sha256[:12])
            return previous, self.sha256

    async def _status(self, worker: Worker) -> admin_pb.StatusResponse | None:
        if not worker.alive:
            return None
        try:
            return await worker.stub.Status(admin_pb.StatusRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return None

    async def status(self) -> admin_pb.StatusResponse:
        replies = await asyncio.gather(*(self._status(w) for w in self.workers))
        known = [r for r in replies if r is not None]
        first = known[0] if known else admin_pb.StatusResponse()
        response = admin_pb.StatusResponse(
            version=__version__, model_name=first.model_name, bundle_path=str(self.bundle_path),
            bundle_sha256=self.sha256 or first.bundle_sha256, policy=first.policy, backend=first.backend,
            ready=len(known) == len(self.workers) and all(r.ready for r in known),
            uptime_seconds=time.time() - self.started,
            bundle_loaded_at=max((r.bundle_loaded_at for r in known), default=0.0),
            requests=sum(r.requests for r in known), flagged=sum(r.flagged for r in known), reloads=self.reloads)
        for worker, reply in zip(self.workers, replies, strict=True):
            response.workers.add(index=worker.index, pid=worker.proc.pid if worker.proc else 0,
                                 ready=bool(reply and reply.ready), bundle_sha256=reply.bundle_sha256 if reply else "",
                                 requests=reply.requests if reply else 0, flagged=reply.flagged if reply else 0,
                                 restarts=worker.restarts)
        return response

    async def stop(self) -> None:
        """SIGTERM every worker (each drains its in-flight requests) and wait; kill one that outlives its grace."""
        self.stopping = True
        for task in list(self._tasks):
            task.cancel()
        running = [w for w in self.workers if w.alive]
        for worker in running:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)
        for worker in running:
            try:
                await asyncio.wait_for(worker.proc.wait(), self.settings.grace_s + 10)
            except asyncio.TimeoutError:
                log.error("worker %d did not stop within %.0f s; killing it", worker.index, self.settings.grace_s + 10)
                worker.proc.kill()
                await worker.proc.wait()
        for worker in self.workers:
            if worker.channel is not None:
                await worker.channel.close()


class PoolCollector:
    """The supervisor's own metrics, beside the workers' sums."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def collect(self) -> Any:
        workers = self.pool.workers
        yield GaugeMetricFamily(f"{PREFIX}_workers", "Worker processes running (serve --workers)",
                                value=sum(w.alive for w in workers))
        yield CounterMetricFamily(f"{PREFIX}_worker_restarts", "Workers started again after they exited",
                                  value=sum(w.restarts for w in workers))


class PoolAdmin:
    """The admin service of a guard with workers: the same two calls, over all of them."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    async def Status(self, request: Any, context: grpc.aio.ServicerContext) -> admin_pb.StatusResponse:
        return await self.pool.status()

    async def ReloadBundle(self, request: Any, context: grpc.aio.ServicerContext) -> admin_pb.ReloadBundleResponse:
        previous, current = await self.pool.reload(request.bundle_path or None)
        return admin_pb.ReloadBundleResponse(bundle_path=str(self.pool.bundle_path), bundle_sha256=current,
                                             previous_sha256=previous)


async def serve_workers(settings: GuardSettings, started: Callable[[int, int], None] | None = None) -> None:
    """Run ``settings.workers`` guard processes on one port until SIGTERM or SIGINT; SIGHUP reloads them."""
    # a bundle that cannot serve is refused here, once, before any worker starts; its score buckets are every
    # worker's, for good (their histograms are summed)
    buckets = bundle_score_buckets(load_first_bundle(settings)[0])
    try:
        run_dir = Path(tempfile.mkdtemp(prefix="trojan-guard-"))  # mode 0700: the workers' admin sockets
    except OSError as exc:
        raise OSError(f"--workers needs a writable temporary directory for the workers' sockets and metrics "
                      f"files (TMPDIR, default /tmp; a read-only root needs an emptyDir there): {exc}") from exc
    reservation = None
    pool: WorkerPool | None = None
    admin_server = metrics_server = None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        reservation, port = reserve_port(settings.host, settings.port)
        pool = WorkerPool(settings, run_dir, port, buckets)
        admin_server = admin_listener(settings, PoolAdmin(pool))
        if settings.metrics_port:
            try:
                metrics_server = start_http_server(settings.metrics_port, addr=settings.host, registry=pool.registry)
            except OSError as exc:
                raise OSError(f"cannot bind the metrics port {settings.host}:{settings.metrics_port} ({exc})") from exc
        if admin_server is not None:
            await admin_server.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("starting %d workers on gRPC %s:%d, admin on %s, metrics on http://%s:%d/metrics", settings.workers,
                 settings.host, port, settings.admin_address, settings.host, settings.metrics_port)
        starting = loop.create_task(pool.start())
        stopping = loop.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            return
        starting.result()  # a worker that failed to start stops the guard (exit 2)
        stopping.cancel()
        log.info("serving model with %d workers on port %d, bundle %s (sha256 %s)", settings.workers, port,
                 settings.bundle, pool.sha256[:12])

        async def reload_quietly() -> None:
            try:
                await pool.reload()
            except GuardError as exc:
                log.error("reload failed: %s", exc)

        loop.add_signal_handler(signal.SIGHUP, lambda: pool.background(reload_quietly()))
        if settings.watch_bundle_s > 0:
            pool.background(watch_bundle(lambda: pool.bundle_path, lambda: pool.sha256 or None, pool.reload,
                                          settings.watch_bundle_s))
        if started:
            started(port, settings.metrics_port)
        await stop.wait()
        log.info("shutting down: draining the workers' in-flight requests (up to %.0f s)", settings.grace_s)
    finally:
        if pool is not None:
            await pool.stop()
        if admin_server is not None:
            await admin_server.stop(0)
        if metrics_server is not None:
            metrics_server[0].shutdown()
        if reservation is not None:
            reservation.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        shutil.rmtree(run_dir, ignore_errors=True)
        log.info("stopped")


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive its supervisor (killed with SIGKILL, say) and keep the port: Linux sends it
    SIGTERM when the supervisor dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before prctl
        raise SystemExit(1)


def worker_main(config_path: str) -> int:
    """One worker: ``python -m guard.transport.workers CONFIG`` (started by the supervisor, never by hand)."""
    config = json.loads(Path(config_path).read_text())
    index = config["index"]
    _die_with_parent(config["parent"])
    settings = GuardSettings(**config["settings"])  # the supervisor's own, validated there
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format=f"%(asctime)s trojan-guard[worker {index}] %(levelname)s %(message)s")
    metrics = GuardMetrics(score_buckets={k: tuple(v) for k, v in config["score_buckets"].items()})
    return exit_status(lambda: asyncio.run(serve(settings, reuse_port=True, metrics=metrics)),
                       f"trojan-guard[worker {index}]")


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
