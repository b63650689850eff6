"""Where the model's forward passes run: the embedded onnxruntime session (the upstream model server's client is
``guard.transport.upstream``; both have the shape of :class:`Backend`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

# (logits, features), or (logits, features, {name: array}) for a backend asked for more outputs
Outputs = tuple


def _outputs(arrays: list[np.ndarray], extra: tuple[str, ...]) -> Outputs:
    return (arrays[0], arrays[1]) if not extra else (arrays[0], arrays[1], dict(zip(extra, arrays[2:], strict=True)))


class Backend(Protocol):
    """What the data plane calls: ``infer`` returns (logits, features[, {extra output: array}])."""

    name: str  # "embedded" or "upstream"

    def infer(self, x: np.ndarray) -> Outputs: ...

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The logits alone (what a STRIP round needs; an upstream server sends less)."""
        ...

    def close(self) -> None: ...


def chunked(run: Callable[[np.ndarray], list[np.ndarray]], x: np.ndarray, size: int) -> list[np.ndarray]:
    """``run`` over slices of at most ``size`` rows, each of its outputs concatenated."""
    parts = [run(x[i:i + size]) for i in range(0, len(x), size)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def in_chunks(run: Callable[[np.ndarray], list[np.ndarray]], x: np.ndarray, size: int,
              extra: tuple[str, ...] = ()) -> Outputs:
    """:func:`chunked`, as (logits, features[, {extra output: array}])."""
    return _outputs(chunked(run, x, size), extra)


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
        return in_chunks(lambda part: self.session.run(self.outputs, {self.input_name: part}), x, self.max_batch,
                          self.extra)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return chunked(lambda part: self.session.run(self.outputs[:1], {self.input_name: part}), x,
                       self.max_batch)[0]

    def close(self) -> None:
        pass
