"""KServe's Python ModelServer serving an ONNX model with onnxruntime over gRPC (Open Inference Protocol v2).

Run in the bench's KServe virtualenv: ``python kserve_server.py MODEL.onnx NAME GRPC_PORT HTTP_PORT THREADS``.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class OnnxModel(Model):
    def __init__(self, name: str, path: str, threads: int) -> None:
        super().__init__(name)
        self.path, self.threads = path, threads
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.ready = True
        return True

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        names = [o.name for o in payload.request_outputs] if payload.request_outputs else \
            [o.name for o in self.session.get_outputs()]
        values = self.session.run(names, {self.input_name: x})
        outputs = []
        for name, value in zip(names, values, strict=True):
            out = InferOutput(name=name, shape=list(value.shape), datatype="FP32")
            out.set_data_from_numpy(value, binary_data=False)
            outputs.append(out)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs,
                             from_grpc=payload.from_grpc)


if __name__ == "__main__":
    path, name, grpc_port, http_port, threads = sys.argv[1:6]
    ModelServer(http_port=int(http_port), grpc_port=int(grpc_port), enable_grpc=True,
                enable_latency_logging=False).start([OnnxModel(name, path, int(threads))])
