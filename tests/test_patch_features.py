"""ucad.model.patch_features.PatchEmbedder against a reference that follows PatchCore's original code step by step
(PatchMaker.patchify, the grid alignment loop of PatchCore._embed, Preprocessing/MeanMapper, Aggregator).

PatchCore aligns a smaller layer by interpolating its (C, p, p) patch tensors over the two grid axes; ours
interpolates the unfolded (C*p*p, h, w) map. Bilinear interpolation acts on each channel separately, so the two
are the same computation in a different memory layout: the tests show they agree to float rounding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ucad.model.patch_features import PatchEmbedder


# ----------------------------------------------------------------------------- PatchCore, literally
def patchify(features: torch.Tensor, patchsize: int, stride: int = 1):
    """PatchMaker.patchify: (B, C, H, W) -> (B, L, C, p, p) and the patch grid size."""
    padding = int((patchsize - 1) / 2)
    unfolder = torch.nn.Unfold(kernel_size=patchsize, stride=stride, padding=padding, dilation=1)
    unfolded = unfolder(features)
    grid = []
    for s in features.shape[-2:]:
        n_patches = (s + 2 * padding - 1 * (patchsize - 1) - 1) / stride + 1
        grid.append(int(n_patches))
    unfolded = unfolded.reshape(*features.shape[:2], patchsize, patchsize, -1)
    unfolded = unfolded.permute(0, 4, 1, 2, 3)
    return unfolded, grid


def mean_mapper(features: torch.Tensor, dim: int) -> torch.Tensor:
    features = features.reshape(len(features), 1, -1)
    return F.adaptive_avg_pool1d(features, dim).squeeze(1)


def patchcore_embed(maps: list[torch.Tensor], patchsize: int, pretrain_dim: int, target_dim: int):
    features = [patchify(x, patchsize) for x in maps]
    patch_shapes = [x[1] for x in features]
    features = [x[0] for x in features]
    ref_num_patches = patch_shapes[0]
    for i in range(1, len(features)):
        _features = features[i]
        patch_dims = patch_shapes[i]
        _features = _features.reshape(_features.shape[0], patch_dims[0], patch_dims[1], *_features.shape[2:])
        _features = _features.permute(0, -3, -2, -1, 1, 2)
        perm_base_shape = _features.shape
        _features = _features.reshape(-1, *_features.shape[-2:])
        _features = F.interpolate(_features.unsqueeze(1), size=(ref_num_patches[0], ref_num_patches[1]),
                                  mode="bilinear", align_corners=False)
        _features = _features.squeeze(1)
        _features = _features.reshape(*perm_base_shape[:-2], ref_num_patches[0], ref_num_patches[1])
        _features = _features.permute(0, -2, -1, 1, 2, 3)
        _features = _features.reshape(len(_features), -1, *_features.shape[-3:])
        features[i] = _features
    features = [x.reshape(-1, *x.shape[-3:]) for x in features]
    # Preprocessing: one MeanMapper per layer, stacked on dim 1
    features = torch.stack([mean_mapper(f, pretrain_dim) for f in features], dim=1)
    # Aggregator
    features = features.reshape(len(features), 1, -1)
    features = F.adaptive_avg_pool1d(features, target_dim)
    features = features.reshape(len(features), -1)
    return features, ref_num_patches


# ----------------------------------------------------------------------------- tests
def two_layers(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 8, 16, 16, generator=g), torch.randn(batch, 12, 8, 8, generator=g)]


@pytest.mark.parametrize("patchsize", [1, 3, 5])
@pytest.mark.parametrize("dims", [(64, 32), (1024, 1024), (100, 48), (7, 5)])
def test_equals_patchcore_two_layers(patchsize, dims):
    maps = two_layers()
    expected, grid = patchcore_embed(maps, patchsize, *dims)
    got, got_grid = PatchEmbedder(patchsize, *dims)(maps)
    assert got_grid == tuple(grid) == (16, 16)
    assert got.shape == (2, 16 * 16, dims[1])
    torch.testing.assert_close(got.reshape(-1, dims[1]), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("patchsize", [1, 3])
def test_equals_patchcore_single_layer_and_non_square(patchsize):
    g = torch.Generator().manual_seed(1)
    maps = [torch.randn(3, 6, 10, 14, generator=g)]
    expected, grid = patchcore_embed(maps, patchsize, 50, 20)
    got, got_grid = PatchEmbedder(patchsize, 50, 20)(maps)
    assert got_grid == tuple(grid) == (10, 14)
    torch.testing.assert_close(got.reshape(-1, 20), expected, atol=1e-5, rtol=1e-5)

    g = torch.Generator().manual_seed(2)
    maps = [torch.randn(2, 4, 12, 18, generator=g), torch.randn(2, 5, 6, 9, generator=g)]
    expected, grid = patchcore_embed(maps, patchsize, 40, 24)
    got, got_grid = PatchEmbedder(patchsize, 40, 24)(maps)
    assert got_grid == tuple(grid)
    torch.testing.assert_close(got.reshape(-1, 24), expected, atol=1e-5, rtol=1e-5)


def test_alignment_layouts_are_the_same_computation():
    """PatchCore interpolates each (c, i, j) entry of the patch tensors over the grid; interpolating the
    unfolded (C*p*p)-channel map is the same per-channel operation."""
    maps = two_layers(seed=3)
    p = 3
    small = maps[1]
    patches, (h, w) = patchify(small, p)  # (B, h*w, C, p, p)
    by_patch = patches.reshape(2, h, w, -1).permute(0, 3, 1, 2)  # (B, C*p*p, h, w)
    unfolded = F.unfold(small, p, padding=1).reshape(2, -1, h, w)
    assert torch.equal(by_patch, unfolded)  # same channel order (c-major, then kernel row, column)
    a = F.interpolate(unfolded, size=(16, 16), mode="bilinear", align_corners=False)
    # PatchCore's route: every (b, c, i, j) grid slice interpolated on its own
    b = F.interpolate(by_patch.reshape(-1, 1, h, w), size=(16, 16), mode="bilinear", align_corners=False)
    # not bit-identical (different kernels sum in a different order), equal to float32 rounding
    torch.testing.assert_close(a, b.reshape(a.shape), atol=1e-6, rtol=1e-6)


def test_embedding_is_per_location():
    # with patchsize 1 and one layer a location's feature depends on that location only
    fmap = torch.randn(1, 8, 5, 5)
    base, _ = PatchEmbedder(1, 8, 8)([fmap])
    changed = fmap.clone()
    changed[0, :, 2, 3] += 1.0
    after, _ = PatchEmbedder(1, 8, 8)([changed])
    diff = (after - base).abs().sum(dim=2).reshape(5, 5)
    assert diff[2, 3] > 0
    diff[2, 3] = 0
    assert diff.max() == 0
    torch.testing.assert_close(base[0], fmap[0].permute(1, 2, 0).reshape(25, 8))  # 8 -> 8 -> 8: identity


def test_even_patchsize_matches_patchcore_grid():
    # PatchCore allows an even patch size: padding 0 and a grid one smaller than the map
    maps = two_layers(seed=4)
    expected, grid = patchcore_embed(maps, 2, 32, 16)
    got, got_grid = PatchEmbedder(2, 32, 16)(maps)
    assert got_grid == tuple(grid) == (15, 15)
    torch.testing.assert_close(got.reshape(-1, 16), expected, atol=1e-5, rtol=1e-5)


def test_half_precision_input_is_embedded_in_float32():
    maps = [m.half() for m in two_layers(seed=5)]
    got, _ = PatchEmbedder(3, 64, 32)(maps)
    assert got.dtype == torch.float32
    expected, _ = patchcore_embed([m.float() for m in maps], 3, 64, 32)
    torch.testing.assert_close(got.reshape(-1, 32), expected, atol=1e-5, rtol=1e-5)

