"""Model backends of the guard: where the model's forward passes run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from guard.codec import infer_request, output_arrays
from guard.errors import UpstreamError
from guard.proto import inference_pb2_grpc

# (logits, features), or (logits, features, {name: array}) for a backend asked for more outputs
Outputs = tuple


def _outputs(arrays: list[np.ndarray], extra: tuple[str, ...]) -> Outputs:
    return (arrays[0], arrays[1]) if not extra else (arrays[0], arrays[1], dict(zip(extra, arrays[2:], strict=True)))


def _in_chunks(run: Callable[[np.ndarray], list[np.ndarray]], x: np.ndarray, size: int,
               extra: tuple[str, ...] = ()) -> Outputs:
    """``run`` over slices of at most ``size`` rows, each output concatenated."""
    parts = [run(x[i:i + size]) for i in range(0, len(x), size)]
    return _outputs([np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))], extra)


class EmbeddedBackend:
    """onnxruntime runs the bundle's model in-process; returns (logits, features)."""

    name = "embedded"

    def __init__(self, model: str | Path | bytes, input_name: str, logits: str = "logits",
                 features: str = "features", max_batch: int = 1024, threads: int | None = None,
                 spin: bool = True, providers: list[str] | None = None,
                 extra_outputs: tuple[str, ...] = ()) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # onnxruntime's idle threads busy-wait for the next run (its default): lower latency, but on cores
        # shared with other work it burns CPU (measured here: 4.2 ms of CPU per request with it, 2.3 without)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        # bytes: the model as the bundle verified it (GuardBundle.model_source), not the file read again
        self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                            providers=providers or ["CPUExecutionProvider"])
        where = "the bundle's model" if isinstance(model, bytes) else str(model)
        names = {o.name for o in self.session.get_outputs()}
        missing = {logits, features, *extra_outputs} - names
        if missing:
            raise ValueError(f"{where}: model has no output(s) {sorted(missing)}; it has {sorted(names)}")
        if input_name not in {i.name for i in self.session.get_inputs()}:
            raise ValueError(f"{where}: model has no input '{input_name}'")
        self.input_name = input_name
        self.extra = tuple(extra_outputs)
        self.outputs = [logits, features, *self.extra]
        self.max_batch = max_batch

    def infer(self, x: np.ndarray) -> Outputs:
        return _in_chunks(lambda part: self.session.run(self.outputs, {self.input_name: part}), x, self.max_batch,
                          self.extra)

    def close(self) -> None:
        pass


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

    def _call(self, x: np.ndarray) -> list[np.ndarray]:
        request = infer_request(x, self.model_name, self.input_name, outputs=self.outputs)
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
        missing = [n for n in self.outputs if n not in by_name]
        if missing:
            if self._on_error:
                self._on_error("MISSING_OUTPUT")
            raise UpstreamError(f"upstream {self.target} model '{self.model_name}' did not return {missing}; "
                                f"it returned {sorted(by_name)}", code="FAILED_PRECONDITION")
        return [by_name[name].reshape(len(x), -1) for name in self.outputs]

    def infer(self, x: np.ndarray) -> Outputs:
        return _in_chunks(self._call, x, self.max_batch, self.extra)

    def close(self) -> None:
        self.channel.close()
