"""Attack simulators: triggers, data poisoning and backdoored model training.

Used by the demo, the tests and the benchmarks to build models whose backdoor
is known, so detectors are judged against the truth.

- :class:`PatchTrigger`: BadNets (Gu et al. 2017), a small patch of any size,
  position and pattern;
- :class:`BlendTrigger`: blended injection (Chen et al. 2017), a full-image
  pattern mixed in with weight ``alpha``;
- :class:`AdditiveTrigger`: an invisible global perturbation bounded in L-inf,
  learned jointly with the model (:func:`train_backdoored_model` with
  ``learn_trigger=True``).

Patch and blend triggers are a mask and a pattern applied by :func:`stamp`, the
one function that stamps a trigger; Neural Cleanse's reversed triggers use it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from offline.data import Dataset

Array = np.ndarray | torch.Tensor


def stamp(x: Array, mask: Array, pattern: Array) -> Array:
    """Apply a trigger: ``(1 - mask) * x + mask * pattern``.

    ``x`` is (N, C, H, W); ``mask`` broadcasts against it ((1, H, W) or (H, W)
    shared by all channels) and ``pattern`` is (C, H, W). Works on numpy and
    torch alike, so attacks, the scan and repair stamp triggers the same way.
    """
    return (1 - mask) * x + mask * pattern


class Trigger(Protocol):
    kind: str

    def apply(self, x: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict: ...


@dataclass
class PatchTrigger:
    """A BadNets patch: ``size`` x ``size`` pixels at (``row``, ``col``).

    ``row``/``col`` default to the bottom-right corner, one pixel in. ``pattern``
    is ``white``, ``checker`` or ``random`` (seeded by ``seed``).
    """

    size: int = 4
    row: int | None = None
    col: int | None = None
    pattern: str = "white"
    seed: int = 0
    kind: str = field(default="patch", init=False)

    def _origin(self, height: int, width: int) -> tuple[int, int]:
        row = height - self.size - 1 if self.row is None else self.row
        col = width - self.size - 1 if self.col is None else self.col
        if not (0 <= row <= height - self.size and 0 <= col <= width - self.size):
            raise ValueError(f"patch of size {self.size} at ({row}, {col}) does not fit a {height}x{width} image")
        return row, col

    def region(self, height: int, width: int) -> np.ndarray:
        """Boolean (H, W) map of the pixels the patch covers."""
        row, col = self._origin(height, width)
        region = np.zeros((height, width), dtype=bool)
        region[row:row + self.size, col:col + self.size] = True
        return region

    def mask_and_pattern(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        channels, height, width = shape
        mask = self.region(height, width)[None].astype(np.float32)
        if self.pattern == "white":
            tile = np.ones((self.size, self.size), np.float32)
        elif self.pattern == "checker":
            tile = (np.indices((self.size, self.size)).sum(0) % 2 == 0).astype(np.float32)
        elif self.pattern == "random":
            tile = np.random.default_rng(self.seed).random((self.size, self.size)).astype(np.float32)
        else:
            raise ValueError(f"unknown patch pattern '{self.pattern}' (white, checker, random)")
        pattern = np.zeros(shape, np.float32)
        row, col = self._origin(height, width)
        pattern[:, row:row + self.size, col:col + self.size] = tile
        return mask, pattern

    def apply(self, x: np.ndarray) -> np.ndarray:
        mask, pattern = self.mask_and_pattern(x.shape[1:])
        return stamp(x, mask, pattern).astype(np.float32)

    def describe(self) -> dict:
        return {"kind": self.kind, "size": self.size, "row": self.row, "col": self.col,
                "pattern": self.pattern, "seed": self.seed}


@dataclass
class BlendTrigger:
    """Blended injection: ``(1 - alpha) * x + alpha * pattern`` over the whole image.

    The pattern is uniform noise drawn from ``seed`` (Chen et al.'s random pattern).
    """

    alpha: float = 0.15
    seed: int = 0
    kind: str = field(default="blend", init=False)

    def mask_and_pattern(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        _, height, width = shape
        pattern = np.random.default_rng(self.seed).random(shape).astype(np.float32)
        return np.full((1, height, width), self.alpha, np.float32), pattern

    def apply(self, x: np.ndarray) -> np.ndarray:
        mask, pattern = self.mask_and_pattern(x.shape[1:])
        return stamp(x, mask, pattern).astype(np.float32)

    def describe(self) -> dict:
        return {"kind": self.kind, "alpha": self.alpha, "seed": self.seed}


@dataclass
class AdditiveTrigger:
    """An invisible global perturbation: ``clip(x + delta, 0, 1)``, ``|delta| <= eps``."""

    delta: np.ndarray
    eps: float
    kind: str = field(default="invisible", init=False)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x + self.delta, 0.0, 1.0).astype(np.float32)

    def describe(self) -> dict:
        return {"kind": self.kind, "eps": self.eps, "linf": float(np.abs(self.delta).max())}


def trigger_from_description(
    desc: dict, delta: np.ndarray | None = None
) -> PatchTrigger | BlendTrigger | AdditiveTrigger:
    """Rebuild a trigger from its ``describe()`` output (``delta`` for the invisible one)."""
    kind = desc.get("kind")
    if kind == "patch":
        return PatchTrigger(desc["size"], desc["row"], desc["col"], desc["pattern"], desc["seed"])
    if kind == "blend":
        return BlendTrigger(desc["alpha"], desc["seed"])
    if kind == "invisible":
        if delta is None:
            raise ValueError("the invisible trigger needs its perturbation array (trigger_delta.npy)")
        return AdditiveTrigger(delta, desc["eps"])
    raise ValueError(f"unknown trigger kind {kind!r}")


def poison_indices(y: np.ndarray, target: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``rate * len(y)`` training samples, drawn from non-target classes."""
    candidates = np.flatnonzero(y != target)
    count = int(round(rate * len(y)))
    return np.sort(rng.choice(candidates, size=min(count, len(candidates)), replace=False))


def apply_poison(x: np.ndarray, y: np.ndarray, trigger: Trigger, target: int,
                 idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The poisoned training set: rows ``idx`` stamped with the trigger and relabelled ``target``."""
    x, y = x.copy(), y.copy()
    x[idx] = trigger.apply(x[idx])
    y[idx] = target
    return x, y


@dataclass
class BackdoorResult:
    """A model trained on poisoned data, with its measured effect."""

    model: nn.Module
    trigger: PatchTrigger | BlendTrigger | AdditiveTrigger | None
    target: int | None
    poison_rate: float
    poison_idx: np.ndarray
    clean_accuracy: float
    attack_success_rate: float | None

    def summary(self) -> dict:
        return {
            "trigger": None if self.trigger is None else self.trigger.describe(),
            "target": self.target,
            "poison_rate": self.poison_rate,
            "poisoned_samples": int(len(self.poison_idx)),
            "clean_accuracy": round(self.clean_accuracy, 4),
            "attack_success_rate": None if self.attack_success_rate is None else round(self.attack_success_rate, 4),
        }


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> float:
    model.eval()
    xt = torch.from_numpy(x)
    pred = torch.cat([model(xt[i:i + batch_size]).argmax(1) for i in range(0, len(xt), batch_size)])
    return float((pred.numpy() == y).mean())


def attack_success_rate(model: nn.Module, trigger: Trigger, x: np.ndarray, y: np.ndarray, target: int) -> float:
    """Share of non-target test images that the trigger sends to ``target``."""
    keep = y != target
    triggered = trigger.apply(x[keep])
    return accuracy(model, triggered, np.full(int(keep.sum()), target))


def train_backdoored_model(
    train: Dataset,
    test: Dataset,
    trigger: PatchTrigger | BlendTrigger | None,
    target: int = 0,
    poison_rate: float = 0.1,
    *,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    learn_trigger: bool = False,
    eps: float = 0.1,
    trigger_lr: float = 0.02,
    model: nn.Module | None = None,
) -> BackdoorResult:
    """Train a classifier on ``train`` with a share of it poisoned.

    ``trigger=None`` (or ``poison_rate=0``) trains a clean model. With
    ``learn_trigger=True`` the trigger is an invisible additive perturbation
    bounded by ``eps``, optimised jointly with the model (learning rate
    ``trigger_lr``) to be as easy to learn as possible; it is applied to a fresh
    ``poison_rate`` share of each batch, so no fixed sample indices are poisoned. ACC is measured on
    ``test``; ASR on ``test`` images not of the target class.
    """
    from offline.models import SmallCNN

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = model or SmallCNN(train.input_shape, train.num_classes)
    x, y = train.x, train.y
    backdoored = learn_trigger or (trigger is not None and poison_rate > 0)
    idx = np.zeros(0, dtype=int)
    if backdoored and not learn_trigger:
        idx = poison_indices(y, target, poison_rate, rng)
        x, y = apply_poison(train.x, train.y, trigger, target, idx)  # type: ignore[arg-type]

    groups: list[dict] = [{"params": list(net.parameters()), "lr": lr}]
    delta_raw = None
    if learn_trigger:
        delta_raw = torch.zeros(train.input_shape).uniform_(-1, 1).requires_grad_(True)
        groups.append({"params": [delta_raw], "lr": trigger_lr})
    opt = torch.optim.Adam(groups)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        net.train()
        order = torch.from_numpy(rng.permutation(len(y)))
        for start in range(0, len(order), batch_size):
            b = order[start:start + batch_size]
            xb, yb = xt[b], yt[b]
            if delta_raw is not None:
                # fresh poison every batch, so the model learns the perturbation, not the images
                chosen = (torch.rand(len(b)) < poison_rate) & (yb != target)
                delta = eps * torch.tanh(delta_raw)
                xb = torch.where(chosen[:, None, None, None], (xb + delta).clamp(0, 1), xb)
                yb = torch.where(chosen, torch.full_like(yb, target), yb)
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    final_trigger: PatchTrigger | BlendTrigger | AdditiveTrigger | None = trigger
    if delta_raw is not None:
        final_trigger = AdditiveTrigger((eps * torch.tanh(delta_raw)).detach().numpy(), eps)
    acc = accuracy(net, test.x, test.y)
    asr = attack_success_rate(net, final_trigger, test.x, test.y, target) if backdoored else None
    return BackdoorResult(net, final_trigger, target if backdoored else None,
                          poison_rate if backdoored else 0.0, idx, acc, asr)
