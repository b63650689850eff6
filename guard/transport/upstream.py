"""The upstream backend: the guard's model runs on an Open Inference Protocol server (Triton, KServe, MLServer)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np

from guard.backends import Outputs, chunked, in_chunks
from guard.errors import UpstreamError
from guard.transport.codec import infer_request, output_arrays
from guard.transport.proto import inference_pb2_grpc


class UpstreamBackend:
    """Forwards forward passes to an Open Inference Protocol server (Triton, KServe, MLServer).

    Asks it for the bundle's ``logits`` and ``features`` outputs. Failures raise
    :class:`guard.errors.UpstreamError` with the status the upstream answered.
    """

    name = "upstream"

    def __init__(self, target: str, model_name: str, input_name: str, input_shape: list[int],
                 logits: str = "logits", features: str = "features", timeout_s: float = 10.0,
                 max_message_bytes: int = 64 << 20, max_batch: int = 1024,
                 on_error: Callable[[str], None] | None = None, extra_outputs: tuple[str, ...] = ()) -> None:
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self.channel = grpc.insecure_channel(target, options=options)
        self.stub = inference_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.target, self.model_name, self.input_name = target, model_name, input_name
        self.input_shape = list(input_shape)
        self.extra = tuple(extra_outputs)
        self.outputs = [logits, features, *self.extra]
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self._on_error = on_error

    def _call(self, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
        outputs = outputs or self.outputs
        request = infer_request(x, self.model_name, self.input_name, outputs=outputs)
        try:
            response = self.stub.ModelInfer(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() else "UNKNOWN"
            if self._on_error:
                self._on_error(code)
            passed = code if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED") else "INTERNAL"
            raise UpstreamError(f"upstream {self.target} model '{self.model_name}' failed: {code}: {exc.details()}",
                                code=passed) from exc
        by_name = output_arrays(response)
        missing = [n for n in outputs if n not in by_name]
        if missing:
            if self._on_error:
                self._on_error("MISSING_OUTPUT")
            raise UpstreamError(f"upstream {self.target} model '{self.model_name}' did not return {missing}; "
                                f"it returned {sorted(by_name)}", code="FAILED_PRECONDITION")
        return [by_name[name].reshape(len(x), -1) for name in outputs]

    def infer(self, x: np.ndarray) -> Outputs:
        return in_chunks(self._call, x, self.max_batch, self.extra)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Only the logits output is asked for: a server that encodes outputs slowly (KServe 0.21: 26 rows in
        1.3 ms with logits alone, 1.9 ms with the features too) sends less."""
        return chunked(lambda part: self._call(part, self.outputs[:1]), x, self.max_batch)[0]

    def close(self) -> None:
        self.channel.close()
