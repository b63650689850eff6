"""``signs``: a 32 x 32 RGB data set of 43 road-sign-like classes, drawn from a seed, nothing downloaded.

Each class is a sign: a shape (circle, triangle, diamond, octagon), a rim and a fill colour, and a legend. Forty
classes carry a printed digit as the legend (Pillow's built-in font, regular or bold); three carry a bar or
nothing. The sign sits on a crop of one of
the two photographs scikit-learn ships (``load_sample_images``), at a random scale, position and rotation, under
random lighting, colour cast, blur and sensor noise. The images are drawn at 64 x 64 and averaged down to
32 x 32, so edges are anti-aliased as a camera's would be.

Like GTSRB, telling classes apart takes both the shape and colour (the family) and the legend (the digit); unlike
MNIST, the images are not nearly binary, so detectors that need natural-image statistics (SCALE-UP's pixel
scaling, say) can be measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32  # output side
SUPER = 2  # drawn at SUPER x SIZE, then averaged down

WHITE, BLACK = (0.95, 0.95, 0.95), (0.08, 0.08, 0.08)
RED, BLUE, YELLOW = (0.80, 0.10, 0.12), (0.10, 0.30, 0.75), (0.95, 0.80, 0.10)


@dataclass(frozen=True)
class SignClass:
    name: str
    shape: str  # circle, triangle, inverted-triangle, diamond, octagon
    rim: tuple[float, float, float]
    fill: tuple[float, float, float]
    ink: tuple[float, float, float]
    legend: str  # a digit "0".."9", "bar" or "none"
    rim_width: float = 0.22  # share of the sign's radius


def sign_classes() -> list[SignClass]:
    """The 43 classes: ten digits in each of four sign families, then stop, yield and no entry."""
    families = (
        ("limit", "circle", RED, WHITE, BLACK),
        ("mandatory", "circle", BLUE, BLUE, WHITE),
        ("warning", "triangle", RED, WHITE, BLACK),
        ("priority", "diamond", BLACK, YELLOW, BLACK),
    )
    classes = [SignClass(f"{name} {d}", shape, rim, fill, ink, str(d), 0.12 if name == "priority" else 0.22)
               for name, shape, rim, fill, ink in families for d in range(10)]
    classes += [
        SignClass("stop", "octagon", WHITE, RED, WHITE, "bar", 0.08),
        SignClass("yield", "inverted-triangle", RED, WHITE, BLACK, "none"),
        SignClass("no entry", "circle", RED, RED, WHITE, "bar", 0.05),
    ]
    return classes


def _shape_radius(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A gauge that is <= 1 inside the shape (unit circumradius; v points down)."""
    if shape == "circle":
        return np.hypot(u, v)
    if shape == "octagon":
        return np.maximum(np.maximum(np.abs(u), np.abs(v)), (np.abs(u) + np.abs(v)) / np.sqrt(2)) / np.cos(np.pi / 8)
    if shape == "diamond":
        return np.abs(u) + np.abs(v)
    sign = 1.0 if shape == "triangle" else -1.0  # point up (warning) or down (yield)
    s3 = np.sqrt(3) / 2
    edges = np.maximum(np.maximum(sign * v, -0.5 * sign * v - s3 * u), -0.5 * sign * v + s3 * u)
    return edges / 0.5  # an equilateral triangle's inradius is half its circumradius


def _legend_box(shape: str) -> tuple[float, float]:
    """(half-size, vertical offset) of the legend's square in unit sign coordinates."""
    if shape == "triangle":
        return 0.4, 0.18
    if shape == "diamond":
        return 0.38, 0.0
    return 0.5, 0.0


def _backgrounds(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    """``n`` random crops (40-220 px) of scikit-learn's two sample photographs, resized to ``side``, (n, 3, s, s)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(img) for img in load_sample_images().images]
    out = np.empty((n, 3, side, side), np.float32)
    which = rng.integers(len(photos), size=n)
    crop = rng.integers(40, 221, size=n)
    for i in range(n):
        photo = photos[which[i]]
        c = int(crop[i])
        x0 = int(rng.integers(0, photo.width - c + 1))
        y0 = int(rng.integers(0, photo.height - c + 1))
        img = photo.resize((side, side), Image.BILINEAR, box=(x0, y0, x0 + c, y0 + c))
        out[i] = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
    return out


def _glyphs() -> np.ndarray:
    """The digits 0-9 printed in Pillow's built-in font, regular and bold: (10, 2, 28, 28) in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=26)
    out = np.zeros((10, 2, 28, 28), np.float32)
    for d in range(10):
        for bold in range(2):
            img = Image.new("L", (28, 28))
            ImageDraw.Draw(img).text((14, 14), str(d), fill=255, font=font, anchor="mm", stroke_width=bold,
                                     stroke_fill=255)
            out[d, bold] = np.asarray(img, np.float32) / 255.0
    return out


def render_signs(labels: np.ndarray, seed: int) -> np.ndarray:
    """Images (N, 3, 32, 32) float32 in [0, 1] of the sign classes ``labels``."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    rng = np.random.default_rng(seed)
    glyphs = _glyphs()
    classes = sign_classes()
    n, side = len(labels), SIZE * SUPER
    images = _backgrounds(rng, n, side)
    # the background's own light: dimmer and less saturated, so the sign stands out as a real one does
    images = 0.35 + 0.5 * (images - 0.5) * rng.uniform(0.5, 1.0, size=(n, 1, 1, 1)).astype(np.float32)

    radius = rng.uniform(0.38, 0.47, size=n) * side  # sign circumradius: 76-94 % of the image's width
    centre = side / 2 + rng.uniform(-0.08, 0.08, size=(n, 2)) * side
    angle = np.deg2rad(rng.uniform(-10, 10, size=n))
    squash = rng.uniform(0.85, 1.0, size=n)  # a sign seen slightly from the side
    grid = np.arange(side, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    for i, label in enumerate(labels):
        cls = classes[int(label)]
        dx, dy = xx - centre[i, 0], yy - centre[i, 1]
        c, s = np.cos(angle[i]), np.sin(angle[i])
        u = (c * dx + s * dy) / (radius[i] * squash[i])
        v = (-s * dx + c * dy) / radius[i]
        gauge = _shape_radius(cls.shape, u, v)
        jitter = rng.uniform(-0.06, 0.06, size=3)
        rim = np.clip(np.array(cls.rim) + jitter, 0, 1)[:, None, None]
        fill = np.clip(np.array(cls.fill) + jitter, 0, 1)[:, None, None]
        ink = np.clip(np.array(cls.ink) + jitter, 0, 1)[:, None, None]
        inside, inner = gauge <= 1.0, gauge <= 1.0 - cls.rim_width
        img = images[i]
        img[:] = np.where(inside, np.where(inner, fill, rim), img)
        half, offset = _legend_box(cls.shape)
        if cls.legend == "bar":
            legend = ((np.abs(v) < 0.16) & (np.abs(u) < 0.62)).astype(np.float32)
        elif cls.legend == "none":
            legend = np.zeros_like(u)
        else:
            digit = glyphs[int(cls.legend), rng.integers(2)]
            # the digit's 28 x 28 box spread over the legend square
            rows = ((v - offset) / half + 1) / 2 * 28 - 0.5
            cols = (u / half + 1) / 2 * 28 - 0.5
            legend = map_coordinates(digit, [rows, cols], order=1, cval=0.0)
        legend = np.clip(legend, 0, 1) * inner
        img[:] = img * (1 - legend) + ink * legend

    # camera: blur, down-sampling, lighting, colour cast, noise
    sigma = rng.choice((0.0, 0.4, 0.7), size=n)
    for value in np.unique(sigma):
        if value > 0:
            rows = sigma == value
            images[rows] = gaussian_filter(images[rows], sigma=(0, 0, value, value))
    small = images.reshape(n, 3, SIZE, SUPER, SIZE, SUPER).mean(axis=(3, 5))
    gain = rng.uniform(0.65, 1.2, size=(n, 1, 1, 1)) * rng.uniform(0.9, 1.1, size=(n, 3, 1, 1))
    small = small * gain + rng.uniform(-0.08, 0.08, size=(n, 1, 1, 1))
    small = small + rng.normal(0, 0.02, size=small.shape)
    return np.clip(small, 0, 1).astype(np.float32)


def draw_signs(seed: int = 0, per_class: int = 200) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images, labels, class names) of the ``signs`` set: ``per_class`` images of each of the 43 classes, fixed
    by ``seed`` (:func:`offline.data.load_signs` makes them a Dataset)."""
    classes = sign_classes()
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(classes)), per_class))
    return render_signs(labels, seed), labels.astype(np.int64), [c.name for c in classes]
