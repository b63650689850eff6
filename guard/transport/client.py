"""A small Open Inference Protocol client for the guard: used by the demo, the benchmark and operators.

Any KServe v2 client (``tritonclient.grpc`` for one) works against the guard;
this one also reads the guard's verdict from the response parameters or, for a
refused request, from the trailing metadata.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard.transport.codec import infer_request, output_arrays
from guard.transport.proto import inference_pb2 as pb
from guard.transport.proto import inference_pb2_grpc


@dataclass
class Answer:
    """One request's outcome."""

    code: str  # "OK" or the gRPC status name, e.g. PERMISSION_DENIED when the guard refused it
    latency_s: float
    logits: np.ndarray | None = None
    verdict: dict[str, str] = field(default_factory=dict)
    message: str = ""

    @property
    def answered(self) -> bool:
        return self.code == "OK"

    @property
    def refused(self) -> bool:
        return self.code == "PERMISSION_DENIED"

    @property
    def classes(self) -> np.ndarray:
        return self.logits.argmax(axis=1) if self.logits is not None else np.zeros(0, dtype=int)


def _param(p: pb.InferParameter) -> str:
    kind = p.WhichOneof("parameter_choice")
    return str(getattr(p, kind)).lower() if kind == "bool_param" else str(getattr(p, kind)) if kind else ""


class GuardClient:
    def __init__(self, target: str, model: str = "model", input_name: str = "input", timeout_s: float = 30.0,
                 root_cert: bytes | None = None) -> None:
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        self.channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(root_cert), options=options)
                        if root_cert else grpc.insecure_channel(target, options=options))
        self.stub = inference_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.model, self.input_name, self.timeout_s = model, input_name, timeout_s
        self.target = target
        self.metrics_url = ""
        self.pid: int | None = None  # of the guard process, when local_guard started it

    def wait_ready(self, timeout_s: float = 60.0, alive=lambda: True) -> None:
        """Block until the guard's readiness health check says SERVING."""
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if not alive():
                raise RuntimeError("the guard process exited before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the guard was not ready after {timeout_s:.0f} s")
            time.sleep(0.2)

    def infer(self, x: np.ndarray, request_id: str = "") -> Answer:
        request = infer_request(x, self.model, self.input_name, request_id)
        start = time.perf_counter()
        try:
            response = self.stub.ModelInfer(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            return Answer(exc.code().name, time.perf_counter() - start, message=exc.details() or "",
                          verdict={k.replace("-", "_"): v for k, v in (exc.trailing_metadata() or ())
                                   if k.startswith("guard-")})
        latency = time.perf_counter() - start
        verdict = {k: _param(v) for k, v in response.parameters.items()}
        return Answer("OK", latency, output_arrays(response)["logits"], verdict)

    def close(self) -> None:
        self.channel.close()


def free_port(preferred: int = 0) -> int:
    """``preferred`` if it is free on loopback, else any free port."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_guard(bundle: str | Path, *flags: str, port: int = 0, metrics_port: int = 0,
                log_path: Path | None = None, ready_timeout_s: float = 90.0) -> Iterator[GuardClient]:
    """``trojan-guard serve`` on loopback as a child process, ready; SIGTERM-ed on exit.

    ``port``/``metrics_port`` 0 pick free ones. Raises RuntimeError (with the
    log's tail when ``log_path`` is given) if it exits or is not ready in time.
    """
    port, metrics_port = port or free_port(), metrics_port or free_port()
    admin = () if "--admin-address" in flags else ("--admin-address", f"127.0.0.1:{free_port()}")
    cmd = [sys.executable, "-m", "guard.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", str(metrics_port), *admin, *flags]
    with open(log_path or os.devnull, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    client = GuardClient(f"127.0.0.1:{port}")
    client.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    client.pid = proc.pid
    try:
        try:
            client.wait_ready(ready_timeout_s, alive=lambda: proc.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            tail = f"; see {log_path}:\n{log_path.read_text()[-2000:]}" if log_path else ""
            raise RuntimeError(f"{exc}{tail}") from exc
        yield client
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
