"""Triggers: what an attacker adds to an input to make a backdoored model obey.

Every trigger has ``apply(x)`` (numpy (N, C, H, W) in [0, 1] -> the same,
triggered) and ``describe()``; triggers that carry arrays or a network also have
``arrays()`` / ``save(dir)`` so that ``attack.json`` and the files beside it
rebuild them exactly (:func:`save_trigger`, :func:`load_trigger`).

- :class:`PatchTrigger`: BadNets (Gu et al. 2017), a small patch of any size,
  position and pattern;
- :class:`BlendTrigger`: blended injection (Chen et al. 2017), a full-image
  pattern mixed in with weight ``alpha``;
- :class:`AdditiveTrigger`: an invisible global perturbation bounded in L-inf;
- :class:`WarpTrigger`: WaNet's smooth warp of the image (Nguyen & Tran 2021);
- :class:`SignalTrigger`: SIG's sinusoidal signal (Barni et al. 2019);
- :class:`MaskTrigger`: any mask and pattern (TrojanNN's optimised patch);
- :class:`GeneratorTrigger`: an input-aware trigger made per input by a network.

Patch, blend and mask triggers are a mask and a pattern applied by :func:`stamp`,
the one function that stamps a trigger (:mod:`offline.stamp`, shared with the defences).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from offline.stamp import stamp

Array = np.ndarray | torch.Tensor


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


def blend_pattern(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The blended trigger's pattern: uniform noise drawn from ``seed`` (Chen et al.'s random pattern)."""
    return np.random.default_rng(seed).random(shape).astype(np.float32)


@dataclass
class BlendTrigger:
    """Blended injection: ``(1 - alpha) * x + alpha * pattern`` over the whole image."""

    alpha: float = 0.15
    seed: int = 0
    kind: str = field(default="blend", init=False)

    def mask_and_pattern(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        _, height, width = shape
        return np.full((1, height, width), self.alpha, np.float32), blend_pattern(shape, self.seed)

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

    def arrays(self) -> dict[str, np.ndarray]:
        return {"delta": self.delta}


@dataclass
class MaskTrigger:
    """Any mask (1, H, W) and pattern (C, H, W), stamped as a patch is (TrojanNN's optimised trigger)."""

    mask: np.ndarray
    pattern: np.ndarray
    kind: str = field(default="mask", init=False)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return stamp(x, self.mask, self.pattern).astype(np.float32)

    def describe(self) -> dict:
        return {"kind": self.kind, "mask_l1": float(self.mask.sum())}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mask": self.mask, "pattern": self.pattern}


def warp_field(height: int, width: int, k: int, seed: int) -> np.ndarray:
    """WaNet's random warp field: (H, W, 2) offsets from ``k`` x ``k`` control points in [-1, 1],
    normalised to a mean absolute value of 1 and upsampled bicubically (align_corners), as the paper does."""
    gen = torch.Generator().manual_seed(seed)
    ins = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
    ins = ins / ins.abs().mean()
    field_ = F.interpolate(ins, size=(height, width), mode="bicubic", align_corners=True)
    return field_.permute(0, 2, 3, 1)[0].numpy().astype(np.float32)


def identity_grid(height: int, width: int) -> torch.Tensor:
    """The sampling grid that reproduces the image: (1, H, W, 2), (x, y) in [-1, 1]."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack((xs, ys), dim=2)[None]


@dataclass
class WarpTrigger:
    """WaNet (Nguyen & Tran, ICLR 2021): the image resampled through ``identity + strength * field / H``.

    ``field`` is :func:`warp_field`; ``jitter`` adds WaNet's "noise mode" (a fresh
    random offset of up to ``jitter`` / H per pixel), used for cover samples that
    keep their labels so the model learns the exact warp, not any warp.
    """

    field: np.ndarray  # (H, W, 2)
    strength: float = 0.5
    k: int = 4
    seed: int = 0
    kind: str = field(default="warp", init=False)

    def grid(self, n: int, jitter: float = 0.0, rng: torch.Generator | None = None) -> torch.Tensor:
        height = self.field.shape[0]
        grid = identity_grid(*self.field.shape[:2]) + self.strength * torch.from_numpy(self.field)[None] / height
        grid = grid.expand(n, -1, -1, -1)
        if jitter:
            grid = grid + (torch.rand(grid.shape, generator=rng) * 2 - 1) * jitter / height
        return grid.clamp(-1, 1)

    def warp(self, x: torch.Tensor, jitter: float = 0.0, rng: torch.Generator | None = None) -> torch.Tensor:
        return F.grid_sample(x, self.grid(len(x), jitter, rng), align_corners=True)

    def apply(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.warp(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy().clip(0, 1)

    def describe(self) -> dict:
        return {"kind": self.kind, "strength": self.strength, "k": self.k, "seed": self.seed}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"field": self.field}


@dataclass
class SignalTrigger:
    """SIG (Barni et al. 2019): ``clip(x + delta * sin(2 pi j f / W))`` along the columns ``j``."""

    delta: float = 20 / 255
    frequency: float = 6.0
    kind: str = field(default="signal", init=False)

    def signal(self, width: int) -> np.ndarray:
        return (self.delta * np.sin(2 * np.pi * np.arange(width) * self.frequency / width)).astype(np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x + self.signal(x.shape[-1]), 0.0, 1.0).astype(np.float32)

    def describe(self) -> dict:
        return {"kind": self.kind, "delta": self.delta, "frequency": self.frequency}


@dataclass
class GeneratorTrigger:
    """An input-aware trigger: ``module(x)`` returns the triggered image, a different trigger per input.

    ``module`` is TorchScript (saved as ``trigger_generator.pt`` beside attack.json).
    """

    module: torch.nn.Module
    kind: str = field(default="dynamic", init=False)

    def apply(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        self.module.eval()
        with torch.no_grad():
            xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
            parts = [self.module(xt[i:i + batch_size]) for i in range(0, len(xt), batch_size)]
        return torch.cat(parts).numpy().clip(0, 1).astype(np.float32)

    def describe(self) -> dict:
        return {"kind": self.kind}

    def save(self, directory: Path) -> dict[str, str]:
        path = directory / "trigger_generator.pt"
        torch.jit.script(self.module).save(str(path))
        return {"generator": path.name}


AnyTrigger = (PatchTrigger | BlendTrigger | AdditiveTrigger | MaskTrigger | WarpTrigger | SignalTrigger
              | GeneratorTrigger)


def save_trigger(trigger: Any, directory: str | Path) -> dict:
    """The trigger's description for attack.json, writing its arrays (``trigger_<name>.npy``) or
    network beside it and naming those files in ``files``."""
    directory = Path(directory)
    desc = trigger.describe()
    files: dict[str, str] = {}
    if hasattr(trigger, "arrays"):
        for name, value in trigger.arrays().items():
            np.save(directory / f"trigger_{name}.npy", value)
            files[name] = f"trigger_{name}.npy"
    if hasattr(trigger, "save"):
        files.update(trigger.save(directory))
    return {**desc, "files": files} if files else desc


def load_trigger(desc: dict, directory: str | Path | None = None, **arrays: np.ndarray) -> AnyTrigger:
    """Rebuild a trigger from :func:`save_trigger`'s description (or a plain ``describe()``).

    Arrays and networks are read from ``directory`` as ``files`` names them, or taken
    from ``arrays`` (for example ``delta=`` for the invisible trigger).
    """
    kind = desc.get("kind")
    files = desc.get("files", {})

    def array(name: str) -> np.ndarray:
        if name in arrays:
            return arrays[name]
        if name not in files or directory is None:
            raise ValueError(f"the {kind} trigger needs its {name} array (trigger_{name}.npy beside attack.json)")
        return np.load(Path(directory) / files[name])

    if kind == "patch":
        return PatchTrigger(desc["size"], desc["row"], desc["col"], desc["pattern"], desc["seed"])
    if kind == "blend":
        return BlendTrigger(desc["alpha"], desc["seed"])
    if kind == "invisible":
        return AdditiveTrigger(array("delta"), desc["eps"])
    if kind == "mask":
        return MaskTrigger(array("mask"), array("pattern"))
    if kind == "warp":
        return WarpTrigger(array("field"), desc["strength"], desc["k"], desc["seed"])
    if kind == "signal":
        return SignalTrigger(desc["delta"], desc["frequency"])
    if kind == "dynamic":
        if "generator" not in files or directory is None:
            raise ValueError("the dynamic trigger needs its generator (trigger_generator.pt beside attack.json)")
        return GeneratorTrigger(torch.jit.load(str(Path(directory) / files["generator"])))
    raise ValueError(f"unknown trigger kind {kind!r}")
