"""A small Open Inference Protocol client for the guard: used by the demo, the benchmark and operators.

Any KServe v2 client (``tritonclient.grpc`` for one) works against the guard;
this one also reads the guard's verdict from the response parameters or, for a
refused request, from the trailing metadata.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard.proto import inference_pb2 as pb
from guard.proto import inference_pb2_grpc


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
        request = pb.ModelInferRequest(model_name=self.model, id=request_id)
        request.inputs.add(name=self.input_name, datatype="FP32", shape=list(x.shape))
        request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
        start = time.perf_counter()
        try:
            response = self.stub.ModelInfer(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            return Answer(exc.code().name, time.perf_counter() - start, message=exc.details() or "",
                          verdict={k.replace("-", "_"): v for k, v in (exc.trailing_metadata() or ())
                                   if k.startswith("guard-")})
        latency = time.perf_counter() - start
        out = response.outputs[0]
        logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(tuple(out.shape))
        return Answer("OK", latency, logits, {k: _param(v) for k, v in response.parameters.items()})

    def close(self) -> None:
        self.channel.close()
