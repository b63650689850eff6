"""The gRPC sidecar: Open Inference Protocol, health, reflection; the admin service; metrics over HTTP.

Ports by trust: the client port serves inference, health and reflection only
(the admin methods answer UNIMPLEMENTED there); the admin service has a
listener of its own (loopback or a unix socket by default, optionally with a
bearer token); metrics are read-only HTTP.

This module only translates between gRPC and the data plane (``guard.dataplane``):
every :class:`guard.errors.GuardError` is mapped to its gRPC status here, once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from guard import __version__
from guard.bundle import MANIFEST, GuardBundle, sha256_file
from guard.dataplane import Guard
from guard.decision import Refused
from guard.errors import GuardError, InvalidInput, ModelNotFound, Unauthenticated
from guard.metrics import GuardMetrics, multiprocess
from guard.settings import GuardSettings
from guard.transport.codec import check_request_id, decode_inputs, encode_response, requested_outputs, trailing_metadata
from guard.transport.proto import guard_admin_pb2 as admin_pb
from guard.transport.proto import inference_pb2 as pb
from guard.transport.upstream import UpstreamBackend

log = logging.getLogger("trojan_guard")

INFERENCE_SERVICE = "inference.GRPCInferenceService"
ADMIN_SERVICE = "trojan_guard.admin.v1.GuardAdmin"
HEALTH_NAMES = ("", "readiness", INFERENCE_SERVICE)  # SERVING once warmed up; liveness always


class _Garbage:
    """Stands in for a request whose bytes are not the expected protobuf message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return _Garbage(exc)

    return parse


def max_message_bytes(bundle: GuardBundle, settings: GuardSettings) -> int:
    """The largest request the guard accepts: a full request of the bundle's inputs, plus framing."""
    per_input = int(np.prod(bundle.manifest.input.shape[1:])) * 4
    return settings.max_request_inputs * per_input + (64 << 10)


class InferenceServicer:
    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.draining = False
        self.listening = False  # until the client port is open (a --workers worker opens it once warmed up)

    @property
    def serving(self) -> bool:
        """The bundle is warmed up, the port is open, and no shutdown is under way."""
        return self.guard.ready and self.listening and not self.draining

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.serving)

    def _check_model(self, name: str, version: str) -> None:
        if name != self.guard.model_name:
            raise ModelNotFound(f"unknown model '{name}'; this guard serves '{self.guard.model_name}'")
        if version not in ("", "1"):
            raise ModelNotFound(f"model '{name}' has no version '{version}'; it has version 1")

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        try:
            self._check_model(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.serving)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="trojan-guard", version=__version__, extensions=[])

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        self._check_model(request.name, request.version)
        state = self.guard.current_state()
        m = state.bundle.manifest
        k = len(m.class_names)
        outputs = [pb.ModelMetadataResponse.TensorMetadata(name="logits", datatype="FP32", shape=[-1, k])]
        if self.guard.settings.expose_scores:
            outputs.append(pb.ModelMetadataResponse.TensorMetadata(name="guard_scores", datatype="FP32",
                                                                   shape=[-1, len(state.columns)]))
        return pb.ModelMetadataResponse(
            name=self.guard.model_name, versions=["1"],
            platform="onnxruntime_onnx" if state.backend.name == "embedded" else "trojan-guard-upstream",
            inputs=[pb.ModelMetadataResponse.TensorMetadata(name=m.input.name, datatype="FP32",
                                                            shape=m.input.shape)],
            outputs=outputs)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        guard, metrics = self.guard, self.guard.metrics
        expose = guard.settings.expose_scores
        start = time.perf_counter()
        metrics.in_flight.inc()
        try:
            self._check_model(request.model_name, request.model_version)
            state = guard.current_state()
            spec = state.bundle.manifest.input
            check_request_id(request)
            x = decode_inputs(request, spec.name, spec.shape, guard.settings.max_request_inputs)
            outputs = requested_outputs(request, expose)
            metrics.stage["decode"].observe(time.perf_counter() - start)
            decision = await guard.infer(x, request.id)
            response = encode_response(request, decision, guard.model_name, outputs, expose)
            guard.count_outcome(decision.verdict, "answered")
            return response
        except Refused as exc:
            guard.count_outcome("flagged", "refused")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc),
                                trailing_metadata=trailing_metadata(exc.decision, expose))
        finally:
            metrics.in_flight.dec()
            metrics.stage["total"].observe(time.perf_counter() - start)


class AdminServicer:
    def __init__(self, guard: Guard, inference: InferenceServicer) -> None:
        self.guard = guard
        self.inference = inference

    async def Status(self, request: Any, context: grpc.aio.ServicerContext) -> admin_pb.StatusResponse:
        g, state = self.guard, self.guard.state
        return admin_pb.StatusResponse(
            version=__version__, model_name=g.model_name, bundle_path=str(g.bundle_path),
            bundle_sha256=state.sha256 if state else "", policy=state.policy if state else "",
            backend=g.settings.backend, ready=self.inference.serving,
            uptime_seconds=time.time() - g.started, bundle_loaded_at=state.loaded_at if state else 0.0,
            requests=g.counts["requests"], flagged=g.counts["flagged"], reloads=g.counts["reloads"])

    async def ReloadBundle(self, request: Any, context: grpc.aio.ServicerContext) -> admin_pb.ReloadBundleResponse:
        previous, current = await self.guard.reload(request.bundle_path or None)
        return admin_pb.ReloadBundleResponse(bundle_path=str(self.guard.bundle_path), bundle_sha256=current,
                                             previous_sha256=previous)


def _unary(fn: Callable[..., Awaitable[Any]], request_type: Any, response_type: Any,
           on_error: Callable[[GuardError], None] | None = None) -> grpc.RpcMethodHandler:
    """A handler that maps every GuardError to its gRPC status, once, here.

    Bytes that are not the request message become INVALID_ARGUMENT; an
    unexpected exception (a bug) becomes INTERNAL; ``on_error`` counts both.
    """

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, _Garbage):
                raise InvalidInput(f"request is not a valid {request_type.DESCRIPTOR.name} protobuf "
                                   f"({request.error})", reason="garbage")
            return await fn(request, context)
        except grpc.aio.AbortError:
            raise  # the handler already chose the status
        except Exception as exc:
            error = exc if isinstance(exc, GuardError) else GuardError(
                f"internal error in trojan-guard ({type(exc).__name__}: {exc})")
            if error is not exc:
                log.exception("%s failed", fn.__name__)
            if on_error is not None:
                on_error(error)
            await context.abort(grpc.StatusCode[error.code], str(error))

    return grpc.unary_unary_rpc_method_handler(call, request_deserializer=_lenient(request_type),
                                               response_serializer=response_type.SerializeToString)


def _inference_handlers(inference: InferenceServicer) -> list[grpc.GenericRpcHandler]:
    methods = {name: _unary(getattr(inference, name), getattr(pb, f"{name}Request"), getattr(pb, f"{name}Response"),
                            on_error=inference.guard.count_error if name == "ModelInfer" else None)
               for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                            "ModelInfer")}
    return [grpc.method_handlers_generic_handler(INFERENCE_SERVICE, methods)]


def _admin_handlers(admin: Any, token: str | None) -> list[grpc.GenericRpcHandler]:
    """The admin methods; with a token, each call must carry ``authorization: Bearer <token>``."""

    def guarded(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if token is not None:
                given = dict(context.invocation_metadata() or ()).get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                    log.warning("admin %s refused: %s bearer token", fn.__name__, "wrong" if given else "no")
                    raise Unauthenticated("admin calls need 'authorization: Bearer <token>' metadata with the "
                                          "token of --admin-token-file")
            return await fn(request, context)

        call.__name__ = fn.__name__
        return call

    methods = {
        "Status": _unary(guarded(admin.Status), admin_pb.StatusRequest, admin_pb.StatusResponse),
        "ReloadBundle": _unary(guarded(admin.ReloadBundle), admin_pb.ReloadBundleRequest,
                               admin_pb.ReloadBundleResponse),
    }
    return [grpc.method_handlers_generic_handler(ADMIN_SERVICE, methods)]


def _admin_token(settings: GuardSettings) -> str | None:
    if settings.admin_token_file is None:
        return None
    try:
        token = settings.admin_token_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise OSError(f"cannot read --admin-token-file {settings.admin_token_file} ({exc})") from exc
    if len(token) < 16:
        raise OSError(f"--admin-token-file {settings.admin_token_file}: the token must be at least 16 characters")
    return token


def _server_credentials(settings: GuardSettings) -> grpc.ServerCredentials | None:
    if not (settings.tls_cert and settings.tls_key):
        return None
    ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


def _bind_admin(admin_server: grpc.aio.Server, address: str) -> None:
    """Bind the admin listener; a unix socket is created mode 0600 (owner only), whatever the umask."""
    path = Path(address[len("unix:"):]) if address.startswith("unix:") else None
    previous = os.umask(0o177) if path is not None else None  # no window in which the socket is wider
    try:
        admin_server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot bind the admin listener {address} (in use, or not an address of this host; "
                      f"--admin-address off turns it off)") from exc
    finally:
        if previous is not None:
            os.umask(previous)
    if path is not None and path.exists():
        os.chmod(path, 0o600)


def admin_listener(settings: GuardSettings, admin: Any) -> grpc.aio.Server | None:
    """The admin service's own server on --admin-address (None when it is off), bound and not yet started;
    ``admin`` has the coroutines ``Status`` and ``ReloadBundle`` (a guard's, or a --workers supervisor's)."""
    if settings.admin_address == "off":
        return None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=16)
    server.add_generic_rpc_handlers(_admin_handlers(admin, _admin_token(settings)))
    reflection.enable_server_reflection((ADMIN_SERVICE, reflection.SERVICE_NAME), server)
    _bind_admin(server, settings.admin_address)
    return server


async def watch_bundle(path: Callable[[], Path], serving: Callable[[], str | None],
                       reload: Callable[[], Awaitable[Any]], every_s: float) -> None:
    """Reload when guard.json at the bundle path changes (a patch job swapped a new bundle in)."""
    loop = asyncio.get_running_loop()
    refused = ""
    while True:
        await asyncio.sleep(every_s)
        try:
            current = await loop.run_in_executor(None, sha256_file, path() / MANIFEST)
        except OSError:
            continue  # mid-swap, or gone for now: keep serving what is loaded
        if serving() is None or current in (serving(), refused):
            continue
        try:
            await reload()
            refused = ""
        except GuardError as exc:
            refused = current  # retried once guard.json changes again
            log.error("bundle watch: %s", exc)


async def poll_gauges(metrics: GuardMetrics, every_s: float = 1.0) -> None:
    """A worker's function gauges (queue depth, evidence bytes) into its multiprocess files, every second."""
    while True:
        metrics.poll()
        await asyncio.sleep(every_s)


async def serve(settings: GuardSettings, bundle: GuardBundle | None = None,
                started: Callable[[int, int], None] | None = None, reuse_port: bool = False,
                metrics: GuardMetrics | None = None) -> None:
    """Run the guard until SIGTERM or SIGINT; SIGHUP reloads the bundle.

    ``reuse_port``: bind the gRPC port with SO_REUSEPORT beside the other workers of ``serve --workers``
    (otherwise a port in use is an error, never silently shared), and listen only once warmed up, so that no
    connection lands on a worker that is still starting (again, after a crash) while the others serve.
    ``metrics``: the workers' metrics share the supervisor's histogram buckets (a worker started again after a
    reload must not bring the new bundle's score buckets into sums with the others')."""
    guard = Guard(settings, bundle, metrics=metrics, upstream=UpstreamBackend)
    limit = max_message_bytes(guard.first_bundle, settings)
    inference = InferenceServicer(guard)
    health = health_aio.HealthServicer()
    for name in HEALTH_NAMES:
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await health.set("liveness", health_pb2.HealthCheckResponse.SERVING)
    server: grpc.aio.Server | None = None

    async def open_client_port() -> int:
        nonlocal server
        # calls beyond maximum_concurrent_rpcs get RESOURCE_EXHAUSTED before their request is read: memory for
        # requests is bounded before --max-queue can apply
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", max(limit, 64 << 20)),
            ("grpc.so_reuseport", int(reuse_port)),
        ], maximum_concurrent_rpcs=settings.concurrent_rpcs)
        server.add_generic_rpc_handlers(_inference_handlers(inference))
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server)
        address = f"{settings.host}:{settings.port}"
        try:
            credentials = _server_credentials(settings)
            port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind the gRPC port {address} (in use, or not an address of this host)") from exc
        await server.start()
        inference.listening = True
        log.info("gRPC on %s:%d (%s)", settings.host, port,
                 "mTLS" if settings.tls_client_ca else "TLS" if settings.tls_cert else "plaintext")
        return port

    # one process: the port answers at once (health NOT_SERVING while the bundle warms up); a worker of
    # --workers binds it once it serves, since the kernel hands connections to every socket that listens
    port = 0 if reuse_port else await open_client_port()
    admin_server = admin_listener(settings, AdminServicer(guard, inference))
    try:
        metrics_server = guard.metrics.serve(settings.host, settings.metrics_port) if settings.metrics_port else None
    except OSError as exc:
        raise OSError(f"cannot bind the metrics port {settings.host}:{settings.metrics_port} ({exc})") from exc
    if admin_server is not None:
        await admin_server.start()
    metrics_at = (f"http://{settings.host}:{settings.metrics_port}/metrics" if metrics_server else
                  "the supervisor's /metrics" if multiprocess() else "off")
    log.info("admin on %s%s, metrics on %s", settings.admin_address,
             " (token)" if settings.admin_token_file else "", metrics_at)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task] = set()

    async def reload_on_signal() -> None:
        try:
            await guard.reload()
        except GuardError as exc:
            log.error("SIGHUP reload failed: %s", exc)

    def on_hup() -> None:
        task = loop.create_task(reload_on_signal())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)

    async def warm_up() -> None:
        nonlocal port
        await guard.start()
        for name in HEALTH_NAMES:
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if reuse_port:
            port = await open_client_port()
        state = guard.state
        log.info("serving model '%s' from bundle %s (sha256 %s), policy %s, backend %s", guard.model_name,
                 settings.bundle, state.sha256[:12] if state else "?", state.policy if state else "?",
                 settings.backend)
        if started:
            started(port, settings.metrics_port)

    background = []
    if settings.watch_bundle_s > 0:
        background.append(loop.create_task(watch_bundle(
            lambda: guard.bundle_path, lambda: guard.state.sha256 if guard.state else None, guard.reload,
            settings.watch_bundle_s)))
    if multiprocess():
        background.append(loop.create_task(poll_gauges(guard.metrics)))
    starting = loop.create_task(warm_up())
    stopping = loop.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done() and starting.exception() is not None:
            raise starting.exception()  # type: ignore[misc]
        await stopping
        log.info("shutting down: draining in-flight requests (up to %.0f s)", settings.grace_s)
    finally:
        starting.cancel()
        stopping.cancel()
        for task in background:
            task.cancel()
        inference.draining = True
        await health.enter_graceful_shutdown()
        if server is not None:
            await server.stop(settings.grace_s)
        if admin_server is not None:
            await admin_server.stop(0)
        await guard.close()
        if metrics_server is not None:
            metrics_server[0].shutdown()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        # the exit is under way: a repeated SIGTERM (an impatient supervisor) must not turn it into a kill
        # with a non-zero status; SIGINT keeps its default, SIGKILL still ends a stuck teardown
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        log.info("stopped")
