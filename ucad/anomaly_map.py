"""Patch scores -> pixel anomaly maps: bilinear upsampling to the image size, Gaussian smoothing."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = int(math.ceil(4.0 * sigma))  # the truncation scipy.ndimage.gaussian_filter uses by default
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def anomaly_maps(patch_scores: torch.Tensor, grid: tuple[int, int], image_size: int,
                 sigma: float = 4.0) -> torch.Tensor:
    """(N, h*w) patch scores -> (N, S, S) smoothed maps (reflect padding, as scipy's default)."""
    maps = patch_scores.float().reshape(-1, 1, grid[0], grid[1])
    maps = F.interpolate(maps, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if sigma > 0:
        kernel = gaussian_kernel(sigma).to(maps.device)
        radius = kernel.numel() // 2
        maps = F.pad(maps, (radius, radius, 0, 0), mode="reflect")
        maps = F.conv2d(maps, kernel.view(1, 1, 1, -1))
        maps = F.pad(maps, (0, 0, radius, radius), mode="reflect")
        maps = F.conv2d(maps, kernel.view(1, 1, -1, 1))
    return maps[:, 0]


def image_scores(patch_scores: torch.Tensor) -> torch.Tensor:
    """Image score = the largest patch score."""
    return patch_scores.max(dim=1).values
