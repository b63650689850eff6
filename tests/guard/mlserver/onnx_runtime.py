"""A small MLServer custom runtime that serves an ONNX model with onnxruntime.

Used by the upstream-mode tests: MLServer (a third-party Open Inference Protocol
server) runs the guard bundle's model, and the guard forwards to it. When the
file named by the model's ``delay_file`` parameter exists, every prediction
first sleeps ``delay_s`` seconds: a test turns the upstream slow by touching it.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        self.session = ort.InferenceSession(uri, providers=["CPUExecutionProvider"])
        extra = (self._settings.parameters.extra if self._settings.parameters else None) or {}
        self.delay_file = extra.get("delay_file")
        self.delay_s = float(extra.get("delay_s", 0.0))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if self.delay_file and os.path.exists(self.delay_file):
            await asyncio.sleep(self.delay_s)
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        names = [o.name for o in payload.outputs] if payload.outputs else [
            o.name for o in self.session.get_outputs()]
        values = self.session.run(names, {self.session.get_inputs()[0].name: x})
        return InferenceResponse(model_name=self.name,
                                 outputs=[NumpyCodec.encode_output(n, v) for n, v in zip(names, values, strict=True)])
