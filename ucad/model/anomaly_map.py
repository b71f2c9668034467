"""Patch scores -> pixel anomaly maps: bilinear upsampling to the image size, Gaussian smoothing."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = int(4.0 * sigma + 0.5)  # scipy.ndimage.gaussian_filter's radius for its default truncate=4.0
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


CHUNK = 64  # maps are upsampled this many at a time, to bound device memory


def anomaly_maps(patch_scores: torch.Tensor, grid: tuple[int, int], image_size: int, sigma: float,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """(N, h*w) patch scores -> (N, S, S) smoothed maps on `device` (default: the scores'), as
    scipy.ndimage.gaussian_filter(mode="reflect")."""
    if patch_scores.shape[0] > CHUNK:
        return torch.cat([anomaly_maps(part, grid, image_size, sigma, device) for part in patch_scores.split(CHUNK)])
    maps = patch_scores.to(device).float().reshape(-1, 1, grid[0], grid[1])
    maps = F.interpolate(maps, size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0]
    if sigma > 0:
        weights = gaussian_kernel(sigma).tolist()
        maps = _smooth_along(_smooth_along(maps, weights, 2), weights, 1)
    return maps


def _smooth_along(maps: torch.Tensor, weights: list[float], dim: int) -> torch.Tensor:
    """One separable pass of the kernel along `dim`, as a fixed sequence of scaled shifted copies: every map gets
    the same arithmetic whatever the batch it is in (a convolution's algorithm, and so its rounding, changes with
    the batch size), so a map computed alone by ucad.predict equals the one the run's evaluation computed."""
    radius = len(weights) // 2
    size = maps.shape[dim]
    # scipy's 'reflect' (d c b a | a b c d | d c b a) repeats the edge sample, as numpy's 'symmetric' does and
    # torch's 'reflect' padding does not; numpy's also pads by more than the row's length, as scipy does
    index = np.pad(np.arange(size), radius, mode="symmetric")
    padded = maps.index_select(dim, torch.from_numpy(index).to(maps.device))
    smoothed = torch.zeros_like(maps)
    for offset, weight in enumerate(weights):
        smoothed.add_(padded.narrow(dim, offset, size), alpha=weight)
    return smoothed


def image_scores(patch_scores: torch.Tensor) -> torch.Tensor:
    return patch_scores.max(dim=1).values
