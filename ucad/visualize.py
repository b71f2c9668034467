"""Pictures of anomaly maps: image | ground truth | anomaly map overlaid, one PNG per test image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def colorize(map_2d: np.ndarray, low: float, high: float) -> np.ndarray:
    import matplotlib

    scaled = np.clip((map_2d - low) / max(high - low, 1e-12), 0.0, 1.0)
    return (matplotlib.colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8)


def side_by_side(image: np.ndarray, mask: np.ndarray, anomaly_map: np.ndarray, low: float, high: float,
                 caption: str = "") -> Image.Image:
    """image (3,S,S) uint8, mask (S,S) {0,1}, map (S,S) float -> one RGB picture of three panels."""
    rgb = image.transpose(1, 2, 0)
    heat = colorize(anomaly_map, low, high)
    overlay = (0.5 * rgb + 0.5 * heat).astype(np.uint8)
    truth = np.repeat((mask > 0)[..., None] * 255, 3, axis=2).astype(np.uint8)
    panel = np.concatenate([rgb, truth, overlay], axis=1)
    picture = Image.fromarray(panel)
    if caption:
        ImageDraw.Draw(picture).text((4, 4), caption, fill=(255, 255, 0))
    return picture


def save_segmentation_images(folder: Path, images, masks, maps, scores, names: list[str], captions: list[str]) -> int:
    """The colour scale is shared by all images of a task, so normal images look calm next to defects."""
    folder.mkdir(parents=True, exist_ok=True)
    maps = np.asarray(maps, dtype=np.float32)
    low, high = float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9))
    for i, name in enumerate(names):
        side_by_side(np.asarray(images[i]), np.asarray(masks[i]), maps[i], low, high,
                     f"{captions[i]} score {float(scores[i]):.3f}").save(folder / f"{name}.png")
    return len(names)
