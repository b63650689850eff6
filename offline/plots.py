"""PNG images of reversed triggers and stamped examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from offline.stamp import stamp


def _to_uint8_image(arr: np.ndarray, scale: int) -> np.ndarray:
    """(H, W) or (C, H, W) in [0, 1] -> (H*s, W*s[, 3]) uint8, nearest-neighbour upscaled."""
    img = arr if arr.ndim == 2 else (arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
    img = np.clip(img, 0.0, 1.0)
    img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    return (img * 255).round().astype(np.uint8)


def save_image(arr: np.ndarray, path: Path, scale: int = 8) -> None:
    from PIL import Image

    Image.fromarray(_to_uint8_image(arr, scale)).save(path)


def save_trigger_images(out: Path, targets: list[int], masks: np.ndarray, patterns: np.ndarray,
                        anomaly: np.ndarray, flagged: list[int], class_names: list[str]) -> list[str]:
    """Write each class's mask, pattern and masked pattern, plus one overview grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, k in enumerate(targets):
        for name, arr in (("mask", masks[i]), ("pattern", patterns[i]), ("trigger", masks[i][None] * patterns[i])):
            path = out / f"class_{k}_{name}.png"
            save_image(arr, path)
            written.append(path.name)
    cols = len(targets)
    fig, axes = plt.subplots(2, cols, figsize=(1.4 * cols, 3.4), squeeze=False)
    for i, k in enumerate(targets):
        colour = "red" if k in flagged else "black"
        axes[0, i].imshow(masks[i], cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title(f"{class_names[k]}\nAI {anomaly[i]:.2f}", fontsize=8, color=colour)
        pat = np.clip(patterns[i] * masks[i][None], 0, 1)  # RGB imshow warns on float error below 0
        axes[1, i].imshow(pat[0] if pat.shape[0] == 1 else pat.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("mask", fontsize=8)
    axes[1, 0].set_ylabel("mask x pattern", fontsize=8)
    fig.suptitle("Reversed triggers (red: flagged; AI: anomaly index)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "overview.png", dpi=100)
    plt.close(fig)
    written.append("overview.png")
    return written


def save_stamped_examples(path: Path, x: np.ndarray, mask: np.ndarray, pattern: np.ndarray,
                          pred_before: np.ndarray, pred_after: np.ndarray, class_names: list[str]) -> None:
    """A row of clean images above the same images stamped with the trigger, with predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stamped = stamp(x, mask[None], pattern)
    n = len(x)
    fig, axes = plt.subplots(2, n, figsize=(1.4 * n, 3.2), squeeze=False)
    for i in range(n):
        for row, (imgs, preds) in enumerate(((x, pred_before), (stamped, pred_after))):
            img = np.clip(imgs[i], 0, 1)
            axes[row, i].imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0),
                                cmap="gray", vmin=0, vmax=1)
            axes[row, i].set_title(f"-> {class_names[preds[i]]}", fontsize=8)
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
    axes[0, 0].set_ylabel("clean", fontsize=8)
    axes[1, 0].set_ylabel("stamped", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def anomaly_chart_png(per_class: list[dict], threshold: float, class_names: list[str]) -> bytes:
    """Bar chart of each class's anomaly index against the threshold, flagged classes in red, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.8), dpi=100)
    values = [c["anomaly_index"] for c in per_class]
    colors = ["#c0392b" if c["flagged"] else "#7f8c8d" for c in per_class]
    ax.bar([class_names[c["class"]] for c in per_class], values, color=colors)
    ax.axhline(threshold, color="#c0392b", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_ylabel("anomaly index")
    ax.set_xlabel("class")
    ax.legend(loc="upper right", frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def image_strip_png(tensors: list[np.ndarray], captions: list[str]) -> bytes:
    """A row of (C, H, W) images in [0, 1], each with its caption, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tensors), figsize=(1.6 * len(tensors), 2.0), squeeze=False)
    for ax, x, caption in zip(axes[0], tensors, captions, strict=True):
        img = x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0))
        ax.imshow(np.clip(img, 0, 1), cmap="gray" if x.shape[0] == 1 else None, vmin=0, vmax=1)
        ax.set_title(caption, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
