"""Model backends of the guard: where the model's forward passes run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


class EmbeddedBackend:
    """onnxruntime runs the bundle's model in-process; returns (logits, features)."""

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
