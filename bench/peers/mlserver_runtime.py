"""An MLServer custom runtime serving an ONNX model with onnxruntime (``parameters.extra.threads``: its
intra-op threads), for bench_guard's peers part."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        extra = (self._settings.parameters.extra if self._settings.parameters else None) or {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(extra.get("threads", 0))
        self.session = ort.InferenceSession(await get_model_uri(self._settings), options,
                                            providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        names = [o.name for o in payload.outputs] if payload.outputs else [o.name for o in self.session.get_outputs()]
        values = self.session.run(names, {self.session.get_inputs()[0].name: x})
        return InferenceResponse(model_name=self.name,
                                 outputs=[NumpyCodec.encode_output(n, v) for n, v in zip(names, values, strict=True)])
