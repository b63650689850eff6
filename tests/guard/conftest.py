"""A real `trojan-guard serve` process on loopback, and MNIST traffic for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from guard.transport.client import free_port
from guard.transport.codec import infer_request, output_arrays
from guard.transport.proto import inference_pb2 as pb
from guard.transport.proto import inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


class GuardProcess:
    """``python -m guard.cli serve`` on free loopback ports; ready once its health says SERVING."""

    def __init__(self, bundle: Path, log_dir: Path, *flags: str, wait: bool = True,
                 env: dict[str, str] | None = None, tls_root: bytes | None = None) -> None:
        self.port, self.metrics_port, self.admin_port = free_port(), free_port(), free_port()
        self.log_path = log_dir / f"guard-{self.port}.log"
        admin = () if "--admin-address" in flags else ("--admin-address", f"127.0.0.1:{self.admin_port}")
        self.cmd = [sys.executable, "-m", "guard.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
                    "--port", str(self.port), "--metrics-port", str(self.metrics_port), *admin, *flags]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **(env or {})})
        self.channel = (grpc.secure_channel(self.target, grpc.ssl_channel_credentials(tls_root),
                                            options=[("grpc.ssl_target_name_override", "localhost")])
                        if tls_root else grpc.insecure_channel(self.target))
        self.stub = inference_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.admin_channel = grpc.insecure_channel(f"127.0.0.1:{self.admin_port}")
        if wait:
            self.wait_ready()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def health(self, service: str = "readiness") -> int:
        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.RpcError:
            return -1
        return reply.status

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self.health() != health_pb2.HealthCheckResponse.SERVING:
            if self.proc.poll() is not None:
                raise AssertionError(f"guard exited with {self.proc.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"guard not ready after {timeout} s:\n{self.log}")
            time.sleep(0.2)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(v for (n, ls), v in self.metrics().items()
                   if n == name and set(labels.items()) <= set(ls))

    def infer(self, x: np.ndarray, model: str = "model", request_id: str = "", outputs: tuple[str, ...] = (),
              timeout: float = 30) -> pb.ModelInferResponse:
        return self.stub.ModelInfer(request(x, model, request_id, outputs), timeout=timeout)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.channel.close()
        self.admin_channel.close()
        self._log.close()
        return self.proc.returncode


def tampered_copy(bundle: Path, dest: Path) -> Path:
    """A copy of ``bundle`` whose model.onnx no longer matches the SHA-256 in its guard.json."""
    import shutil

    shutil.copytree(bundle, dest)
    with open(dest / "model.onnx", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    return dest


def request(x: np.ndarray, model: str = "model", request_id: str = "", outputs: tuple[str, ...] = ()
            ) -> pb.ModelInferRequest:
    return infer_request(x, model, "input", request_id, outputs)


def logits_of(response: pb.ModelInferResponse) -> np.ndarray:
    return output_arrays(response)["logits"]


@pytest.fixture(scope="module")
def guard_server(guard_only_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuardProcess]:
    """The guard in front of the unrepaired BadNets model, enforce policy, evidence kept."""
    tmp = tmp_path_factory.mktemp("guard")
    server = GuardProcess(guard_only_bundle, tmp, "--evidence-dir", str(tmp / "evidence"),
                          "--max-request-inputs", "16")
    server.evidence_dir = tmp / "evidence"  # type: ignore[attr-defined]
    yield server
    server.stop()
