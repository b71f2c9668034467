"""Pictures of anomaly maps: the run's image | ground truth | map overlay, and ucad.predict's image | map with
colour bar | predicted mask; one PNG per image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def save_segmentation_images(folder: Path, images, masks, maps, scores, names: list[str], captions: list[str]):
    """images (N,3,S,S) uint8, masks (N,S,S) {0,1}, maps (N,S,S); the colour scale is shared by all images of a
    task, so normal images look calm next to defects."""
    import matplotlib  # imported on use, so that commands which draw nothing do not wait for it

    folder.mkdir(parents=True, exist_ok=True)
    maps = np.asarray(maps, dtype=np.float32)
    low, high = float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9))
    for i, name in enumerate(names):
        rgb = np.asarray(images[i]).transpose(1, 2, 0)
        scaled = np.clip((maps[i] - low) / max(high - low, 1e-12), 0.0, 1.0)
        heat = (matplotlib.colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8)
        overlay = (0.5 * rgb + 0.5 * heat).astype(np.uint8)
        truth = np.repeat((np.asarray(masks[i]) > 0)[..., None] * 255, 3, axis=2).astype(np.uint8)
        picture = Image.fromarray(np.concatenate([rgb, truth, overlay], axis=1))
        ImageDraw.Draw(picture).text((4, 4), f"{captions[i]} score {float(scores[i]):.3f}", fill=(255, 255, 0))
        picture.save(folder / f"{name}.png")


def prediction_picture(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None, threshold,
                       colour_range: tuple[float, float], caption: str, path: Path) -> None:
    """image (3,S,S) uint8 | anomaly map over the image, with a colour bar (the pixel threshold marked on it) |
    predicted mask; `threshold` is the routed task's ucad.learning.thresholds.Threshold, or None: the colours then span
    `colour_range`."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    # the colour bar runs from 0 to twice the pixel threshold, so its middle is where the task's "normal" ends
    low, high = (0.0, 2.0 * threshold.pixel) if threshold else colour_range
    rgb = image.transpose(1, 2, 0)
    figure = Figure(figsize=(10.5, 3.9))
    axes = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.08, 1]})
    axes[0].imshow(rgb)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(rgb)
    heat = axes[1].imshow(anomaly_map, cmap="jet", vmin=low, vmax=high, alpha=0.5)
    axes[1].set_title("anomaly map", fontsize=9)
    bar = figure.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.02)
    bar.ax.tick_params(labelsize=7)
    if threshold:
        bar.ax.axhline(threshold.pixel, color="white", linewidth=2)
        bar.ax.axhline(threshold.pixel, color="black", linewidth=0.8)
        axes[2].imshow(mask, cmap="gray", vmin=0, vmax=1)
        axes[2].set_title("predicted mask (map > pixel threshold)", fontsize=9)
    else:
        axes[2].text(0.5, 0.5, "no pixel threshold\nin this model", ha="center", va="center", fontsize=9)
    for axis in axes:
        axis.set(xticks=[], yticks=[])
    figure.suptitle(caption, fontsize=8.5, wrap=True)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
