"""Model backends of the guard: where the model's forward passes run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


class EmbeddedBackend:
    """onnxruntime runs the bundle's model in-process; returns (logits, features)."""

    name = "embedded"

    def __init__(self, model_path: str | Path, input_name: str, logits: str = "logits",
                 features: str = "features", max_batch: int = 1024, threads: int | None = None) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        names = {o.name for o in self.session.get_outputs()}
        missing = {logits, features} - names
        if missing:
            raise ValueError(f"{model_path}: model has no output(s) {sorted(missing)}; it has {sorted(names)}")
        if input_name not in {i.name for i in self.session.get_inputs()}:
            raise ValueError(f"{model_path}: model has no input '{input_name}'")
        self.input_name = input_name
        self.outputs = [logits, features]
        self.max_batch = max_batch

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = [self.session.run(self.outputs, {self.input_name: x[i:i + self.max_batch]})
                 for i in range(0, len(x), self.max_batch)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def close(self) -> None:
        pass


def _tensor(output, raw: bytes | None) -> np.ndarray:
    """One output tensor of a ModelInferResponse as a float32 array (raw or typed contents)."""
    shape = tuple(output.shape)
    if raw is not None:
        dtype = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}.get(output.datatype)
        if dtype is None:
            raise ValueError(f"output '{output.name}' has datatype {output.datatype}, expected FP32")
        arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    elif output.contents.fp32_contents:
        arr = np.asarray(output.contents.fp32_contents, dtype=np.float32)
    else:
        arr = np.asarray(output.contents.fp64_contents, dtype=np.float64)
    return arr.reshape(shape).astype(np.float32, copy=False)


class UpstreamBackend:
    """Forwards forward passes to an Open Inference Protocol server (Triton, KServe, MLServer).

    Asks it for the bundle's ``logits`` and ``features`` outputs. Failures raise
    :class:`guard.errors.UpstreamError` with the status the upstream answered.
    """

    name = "upstream"

    def __init__(self, target: str, model_name: str, input_name: str, input_shape: list[int],
                 logits: str = "logits", features: str = "features", timeout_s: float = 10.0,
                 max_message_bytes: int = 64 << 20, max_batch: int = 1024, on_error=None) -> None:
        import grpc

        from guard.proto import inference_pb2, inference_pb2_grpc

        self._grpc, self._pb = grpc, inference_pb2
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self.channel = grpc.insecure_channel(target, options=options)
        self.stub = inference_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.target, self.model_name, self.input_name = target, model_name, input_name
        self.input_shape = list(input_shape)
        self.outputs = [logits, features]
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self._on_error = on_error

    def _call(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from guard.errors import UpstreamError

        pb = self._pb
        request = pb.ModelInferRequest(model_name=self.model_name)
        request.inputs.add(name=self.input_name, datatype="FP32", shape=list(x.shape))
        request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
        for name in self.outputs:
            request.outputs.add(name=name)
        try:
            response = self.stub.ModelInfer(request, timeout=self.timeout_s)
        except self._grpc.RpcError as exc:
            code = exc.code().name if exc.code() else "UNKNOWN"
            if self._on_error:
                self._on_error(code)
            passed = code if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED") else "INTERNAL"
            raise UpstreamError(f"upstream {self.target} model '{self.model_name}' failed: {code}: {exc.details()}",
                                code=passed) from exc
        raw = list(response.raw_output_contents)
        by_name = {}
        for i, out in enumerate(response.outputs):
            by_name[out.name] = _tensor(out, raw[i] if i < len(raw) else None)
        missing = [n for n in self.outputs if n not in by_name]
        if missing:
            if self._on_error:
                self._on_error("MISSING_OUTPUT")
            raise UpstreamError(f"upstream {self.target} model '{self.model_name}' did not return {missing}; "
                                f"it returned {sorted(by_name)}", code="FAILED_PRECONDITION")
        logits, features = by_name[self.outputs[0]], by_name[self.outputs[1]]
        return logits.reshape(len(x), -1), features.reshape(len(x), -1)

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = [self._call(x[i:i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def close(self) -> None:
        self.channel.close()
