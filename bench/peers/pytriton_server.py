"""Triton (the tritonserver binary nvidia-pytriton ships) serving an ONNX model through a pytriton Python
model that runs onnxruntime. Run in the bench's pytriton virtualenv:
``python pytriton_server.py MODEL.onnx NAME GRPC_PORT HTTP_PORT METRICS_PORT THREADS``."""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

path, name, grpc_port, http_port, metrics_port, threads = sys.argv[1:7]
options = ort.SessionOptions()
options.intra_op_num_threads = int(threads)
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
inp = session.get_inputs()[0]
outs = session.get_outputs()


@batch
def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
    values = session.run([o.name for o in outs], {inp.name: inputs[inp.name].astype(np.float32, copy=False)})
    return {o.name: v for o, v in zip(outs, values, strict=True)}


config = TritonConfig(grpc_port=int(grpc_port), http_port=int(http_port), metrics_port=int(metrics_port),
                      grpc_address="127.0.0.1", http_address="127.0.0.1")
with Triton(config=config) as triton:
    triton.bind(model_name=name, infer_func=infer,
                inputs=[Tensor(name=inp.name, dtype=np.float32, shape=tuple(inp.shape[1:]))],
                outputs=[Tensor(name=o.name, dtype=np.float32, shape=tuple(o.shape[1:])) for o in outs],
                config=ModelConfig(max_batch_size=1024))  # the guard sends up to --max-batch x (n + 1) rows
    triton.serve()
