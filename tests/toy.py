"""A toy model and its images, for detector tests that need no torch: pixel (0, 0) is the trigger."""

from __future__ import annotations

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
