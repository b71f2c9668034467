"""Synthetic defects on held-out normal training images, so that choices (the prompt's epoch) are made on a
validation set without touching the test set. Each comes with the exact mask of the pixels it changed: CutPaste
(a colour-jittered rectangle pasted elsewhere in the image) or, as DRAEM's anomalies, a Perlin-noise blob where a
shifted, colour-inverted copy of another image shows through at 50-90 %."""
from __future__ import annotations

import math

import numpy as np
import torch

VISIBLE_CHANGE = 8  # grey levels: pixels changed by less are not counted as defect


def perlin_noise(size: int, scale: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) 2-D Perlin gradient noise with `scale` x `scale` lattice cells, values roughly in [-1, 1]."""
    angles = rng.uniform(0, 2 * math.pi, (scale + 1, scale + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    coords = (np.arange(size) + 0.5) * scale / size
    cell = np.floor(coords).astype(int)
    offset = coords - cell
    fade = offset ** 3 * (offset * (offset * 6 - 15) + 10)

    def corner(dy, dx):  # rows along the first axis, columns along the second
        g = gradients[cell[:, None] + dy, cell + dx]
        return g[..., 0] * (offset[:, None] - dy) + g[..., 1] * (offset - dx)

    top = corner(0, 0) * (1 - fade) + corner(0, 1) * fade
    bottom = corner(1, 0) * (1 - fade) + corner(1, 1) * fade
    return (top * (1 - fade[:, None]) + bottom * fade[:, None]) * math.sqrt(2)


def cutpaste(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(3, S, S) uint8 -> defective copy and its (S, S) bool mask."""
    _, size, _ = image.shape
    area = rng.uniform(0.02, 0.10) * size * size
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
    h = int(np.clip(round(math.sqrt(area * aspect)), 4, size // 2))
    w = int(np.clip(round(math.sqrt(area / aspect)), 4, size // 2))
    sy, sx = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    ty, tx = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    patch = image[:, sy:sy + h, sx:sx + w].astype(np.float32)
    patch = patch * rng.uniform(0.7, 1.3, (3, 1, 1)) + rng.uniform(-30, 30, (3, 1, 1))
    out = image.copy()
    out[:, ty:ty + h, tx:tx + w] = np.clip(patch, 0, 255).astype(np.uint8)
    return out, _changed(image, out)


def perlin_blend(image: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    _, size, _ = image.shape
    for _ in range(20):  # redraw until the region is neither empty nor most of the image
        region = perlin_noise(size, int(rng.choice([2, 4, 8])), rng) > rng.uniform(0.3, 0.6)
        if 0.005 * size * size <= region.sum() <= 0.3 * size * size:
            break
    texture = 255 - np.roll(other, tuple(rng.integers(0, size, 2)), axis=(1, 2)).astype(np.float32)
    opacity = rng.uniform(0.5, 0.9)
    blended = image.astype(np.float32)
    blended[:, region] = (1 - opacity) * blended[:, region] + opacity * texture[:, region]
    out = np.clip(blended, 0, 255).astype(np.uint8)
    return out, _changed(image, out)


def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return (np.abs(after.astype(np.int16) - before.astype(np.int16)).max(axis=0) >= VISIBLE_CHANGE)


def make_validation_set(normal: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(N, 3, S, S) uint8 held-out normal images -> images (2N), masks (2N, S, S) uint8, labels (2N,): every normal
    image as it is, then one defective copy of each (CutPaste and Perlin blend alternating)."""
    rng = np.random.default_rng(seed)
    originals = normal.cpu().numpy()
    defective, masks = zip(*(cutpaste(image, rng) if i % 2 == 0 else
                             perlin_blend(image, originals[(i + 1) % len(originals)], rng)
                             for i, image in enumerate(originals)))
    masks = np.stack(masks)
    images = torch.from_numpy(np.concatenate([originals, np.stack(defective)]))
    all_masks = np.concatenate([np.zeros_like(masks), masks]).astype(np.uint8)
    return images, torch.from_numpy(all_masks), np.repeat([0, 1], len(originals))
