"""Pictures of anomaly maps: image | ground truth | anomaly map overlaid, one PNG per test image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def side_by_side(image: np.ndarray, mask: np.ndarray, anomaly_map: np.ndarray, low: float, high: float,
                 caption: str = "") -> Image.Image:
    """image (3,S,S) uint8, mask (S,S) {0,1}, map (S,S) float -> one RGB picture of three panels."""
    import matplotlib

    rgb = image.transpose(1, 2, 0)
    scaled = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0)
    heat = (matplotlib.colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8)
    overlay = (0.5 * rgb + 0.5 * heat).astype(np.uint8)
    truth = np.repeat((mask > 0)[..., None] * 255, 3, axis=2).astype(np.uint8)
    picture = Image.fromarray(np.concatenate([rgb, truth, overlay], axis=1))
    if caption:
        ImageDraw.Draw(picture).text((4, 4), caption, fill=(255, 255, 0))
    return picture


def save_segmentation_images(folder: Path, images, masks, maps, scores, names: list[str], captions: list[str]):
    """The colour scale is shared by all images of a task, so normal images look calm next to defects."""
    folder.mkdir(parents=True, exist_ok=True)
    maps = np.asarray(maps, dtype=np.float32)
    low, high = float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9))
    for i, name in enumerate(names):
        side_by_side(np.asarray(images[i]), np.asarray(masks[i]), maps[i], low, high,
                     f"{captions[i]} score {float(scores[i]):.3f}").save(folder / f"{name}.png")


def prediction_picture(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None, low: float, high: float,
                       pixel_threshold: float | None, caption: str, path: Path) -> None:
    """image (3,S,S) uint8 | anomaly map over the image, with a colour bar (the pixel threshold marked on it) |
    predicted mask (pixels above the threshold); the caption above names the routed task and the decision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rgb = image.transpose(1, 2, 0)
    figure, axes = plt.subplots(1, 3, figsize=(10.5, 3.9), gridspec_kw={"width_ratios": [1, 1.08, 1]})
    axes[0].imshow(rgb)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(rgb)
    heat = axes[1].imshow(anomaly_map, cmap="jet", vmin=low, vmax=high, alpha=0.5)
    axes[1].set_title("anomaly map", fontsize=9)
    bar = figure.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.02)
    bar.ax.tick_params(labelsize=7)
    if pixel_threshold is not None:
        bar.ax.axhline(pixel_threshold, color="white", linewidth=2)
        bar.ax.axhline(pixel_threshold, color="black", linewidth=0.8)
    if mask is not None:
        axes[2].imshow(mask, cmap="gray", vmin=0, vmax=1)
        axes[2].set_title("predicted mask (map > pixel threshold)", fontsize=9)
    else:
        axes[2].text(0.5, 0.5, "no pixel threshold\nin this model", ha="center", va="center", fontsize=9)
    plt.setp(axes, xticks=[], yticks=[])
    figure.suptitle(caption, fontsize=8.5, wrap=True)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
