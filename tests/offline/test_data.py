from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from offline.data import load_dataset
from offline.errors import DataError


def test_embedded_mnist_is_the_real_5k_subset() -> None:
    data = load_dataset("mnist")
    assert data.x.shape == (5000, 1, 28, 28)
    assert data.x.dtype == np.float32
    assert 0.0 <= data.x.min() and data.x.max() <= 1.0
    assert data.num_classes == 10
    assert sorted(np.unique(data.y)) == list(range(10))
    assert np.bincount(data.y).min() > 400  # roughly balanced, not a stub


def test_sklearn_digits() -> None:
    data = load_dataset("digits")
    assert data.x.shape == (1797, 1, 8, 8)
    assert data.x.max() == pytest.approx(1.0)


def test_split_is_stratified_and_disjoint() -> None:
    data = load_dataset("digits")
    a, b = data.split(0.25, seed=3)
    assert len(a) + len(b) == len(data)
    for c in range(10):
        share = (b.y == c).sum() / (data.y == c).sum()
        assert 0.2 < share < 0.3


def test_npz_round_trip(tmp_path: Path) -> None:
    data = load_dataset("digits")
    data.save_npz(tmp_path / "d.npz")
    back = load_dataset(str(tmp_path / "d.npz"))
    np.testing.assert_array_equal(back.x, data.x)
    np.testing.assert_array_equal(back.y, data.y)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((10, 28, 28), np.float32), np.arange(10) % 2, "(N, C, H, W)"),
        (np.full((10, 1, 8, 8), 255.0, np.float32), np.arange(10) % 2, "[0, 1]"),
        (np.zeros((10, 1, 8, 8), np.uint8), np.arange(10) % 2, "float32"),
        (np.zeros((10, 1, 8, 8), np.float32), np.zeros(10, int), "two classes"),
        (np.full((10, 1, 8, 8), np.nan, np.float32), np.arange(10) % 2, "NaN"),
        (np.zeros((10, 1, 8, 8), np.float32), np.arange(9) % 2, "labels"),
    ],
)
def test_bad_npz_is_refused_with_a_reason(tmp_path: Path, x: np.ndarray, y: np.ndarray, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_dataset(str(path))


def test_npz_missing_arrays_and_garbage(tmp_path: Path) -> None:
    np.savez(tmp_path / "nokeys.npz", images=np.zeros(3))
    with pytest.raises(DataError, match="'x' and 'y'"):
        load_dataset(str(tmp_path / "nokeys.npz"))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="not a readable"):
        load_dataset(str(tmp_path / "garbage.npz"))
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "missing.npz"))


def test_image_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    data = load_dataset(str(tmp_path))
    assert data.x.shape == (6, 1, 12, 12)
    assert data.class_names == ["cat", "dog"]
    assert list(data.y) == [0, 0, 0, 1, 1, 1]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "dog" / "odd.png")
    with pytest.raises(DataError, match="differs"):
        load_dataset(str(tmp_path))


@pytest.mark.parametrize("spec, channels", [("mnist-quadrants", 1), ("mnist-colours", 3)])
def test_embedded_forty_class_sets(spec: str, channels: int) -> None:
    """The embedded digits as 40 classes (digit x quadrant, digit x background colour), each class present."""
    data = load_dataset(spec)
    mnist = load_dataset("mnist")
    assert data.x.shape == (5000, channels, 28, 28) and data.num_classes == 40
    assert data.x.min() >= 0 and data.x.max() <= 1
    assert np.bincount(data.y, minlength=40).min() >= 80
    np.testing.assert_array_equal(data.y % 10, mnist.y)  # the digit is kept; the group is the class's tens
    if spec == "mnist-quadrants":  # the digit lies in its quadrant only
        q = data.y // 10
        top, left = 14 * (q[0] // 2), 14 * (q[0] % 2)
        inside = data.x[0, 0, top:top + 14, left:left + 14].sum()
        assert inside > 0 and np.isclose(inside, data.x[0].sum())


def test_signs_are_43_rgb_classes_drawn_from_a_seed() -> None:
    """signs: 32x32 RGB in [0, 1], every class present, the same images from the same seed, others from
    another; the sign families tell apart by colour (a mandatory sign is blue, a limit sign's rim red)."""
    from offline.data import load_signs
    from offline.signs import sign_classes

    data = load_signs(per_class=6)
    assert data.x.shape == (43 * 6, 3, 32, 32) and data.x.dtype == np.float32 and data.num_classes == 43
    assert data.x.min() >= 0 and data.x.max() <= 1
    np.testing.assert_array_equal(np.bincount(data.y), np.full(43, 6))
    assert data.class_names == [c.name for c in sign_classes()] and data.class_names[40] == "stop"
    np.testing.assert_array_equal(load_signs(per_class=6).x, data.x)
    assert not np.array_equal(load_signs(seed=1, per_class=6).x, data.x)
    centre = data.x[:, :, 12:20, 12:20].mean(axis=(2, 3))  # inside the sign
    blue = centre[(data.y >= 10) & (data.y < 20)]
    assert (blue[:, 2] > blue[:, 0]).mean() > 0.9
    assert data.x.std() > 0.15  # natural backgrounds, not a blank canvas
