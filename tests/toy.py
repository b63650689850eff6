"""A toy model and its images, for detector tests that need no torch: pixel (0, 0) is the trigger."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def toy_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Toy clean images: dim, with the trigger pixel (0, 0) off."""
    x = rng.random((n, 1, 4, 4)).astype(np.float32) * 0.5
    x[:, 0, 0, 0] = 0.0
    return x


def toy_infer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A toy model: class 0 whenever pixel (0, 0) is bright (the 'trigger'), else by mean brightness."""
    flat = x.reshape(len(x), -1)
    trig = flat[:, 0] > 0.9
    logits = np.stack([np.where(trig, 20.0, 0.0), 10 * flat[:, 1:].mean(1), 10 * (1 - flat[:, 1:].mean(1))], 1)
    return logits, np.stack([flat[:, 0] * 10, flat[:, 1:].mean(1)], 1)


TOY_VARIANTS = {"outputs": ["ibd_psc_1", "ibd_psc_2"], "counts": [1, 2], "omega": 1.5}


def toy_infer_with_variants(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The toy model with two IBD-PSC-like variants: under them a clean input's answer drifts (classes 1 and 2
    trade places), a triggered one keeps class 0."""
    logits, features = toy_infer(x)
    swapped = logits[:, [0, 2, 1]]
    return logits, features, {"ibd_psc_1": swapped, "ibd_psc_2": 0.5 * (logits + swapped)}


def other_model(onnx_file: Path) -> bytes:
    """The same ONNX graph with its first weight negated: a valid model, not the one that was written."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_file))
    first = model.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(first), first.name))
    return model.SerializeToString()
