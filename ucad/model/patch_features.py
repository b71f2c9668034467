"""PatchCore's patch embedding: local neighbourhood aggregation, alignment of layers to the largest
grid, and projection by adaptive average pooling over the channel axis."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class PatchEmbedder:
    """list of (B, C_l, h_l, w_l) maps -> (B, H*W, target_dim) patch features on the largest grid."""

    def __init__(self, patchsize: int, pretrain_embed_dimension: int, target_embed_dimension: int):
        self.patchsize = patchsize
        self.pretrain_dim, self.target_dim = pretrain_embed_dimension, target_embed_dimension

    def grid_of(self, map_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid of an (h, w) feature map, as PatchCore computes it: the map size for odd p, one less for even."""
        padding = (self.patchsize - 1) // 2
        return tuple(s + 2 * padding - self.patchsize + 1 for s in map_size)

    def __call__(self, feature_maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        batch, padding = feature_maps[0].shape[0], (self.patchsize - 1) // 2
        grids = [self.grid_of(fmap.shape[2:]) for fmap in feature_maps]
        height, width = max(grid[0] for grid in grids), max(grid[1] for grid in grids)
        per_layer = []
        for fmap, grid in zip(feature_maps, grids):
            fmap = fmap.float()
            if self.patchsize > 1:
                # every location gets its p x p neighbourhood, flattened channel-major as PatchCore does
                fmap = F.unfold(fmap, self.patchsize, padding=padding).reshape(batch, -1, *grid)
            if grid != (height, width):
                fmap = F.interpolate(fmap, size=(height, width), mode="bilinear", align_corners=False)
            vectors = fmap.permute(0, 2, 3, 1).reshape(batch * height * width, 1, -1)
            per_layer.append(F.adaptive_avg_pool1d(vectors, self.pretrain_dim))
        stacked = torch.cat(per_layer, dim=1).reshape(batch * height * width, 1, -1)
        return F.adaptive_avg_pool1d(stacked, self.target_dim).reshape(batch, height * width, -1), (height, width)
