"""ucad.model.anomaly_map: patch scores -> pixel maps must equal PatchCore's recipe, i.e. bilinear upsampling
(align_corners=False) followed by scipy.ndimage.gaussian_filter(sigma=4) with its defaults (mode 'reflect',
truncate 4.0)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from ucad.model.anomaly_map import anomaly_maps, gaussian_kernel, image_scores


def reference(patch_scores: torch.Tensor, grid, size, sigma=4.0) -> np.ndarray:
    up = F.interpolate(patch_scores.float().reshape(-1, 1, *grid), size=(size, size), mode="bilinear",
                       align_corners=False)[:, 0].numpy().astype(np.float64)
    if sigma <= 0:
        return up
    return np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in up])


@pytest.mark.parametrize("grid,size", [((14, 14), 224), ((4, 4), 32), ((28, 28), 224), ((3, 5), 40)])
def test_equals_bilinear_then_scipy_gaussian(grid, size):
    scores = torch.rand(3, grid[0] * grid[1], generator=torch.Generator().manual_seed(0)) * 5.0
    got = anomaly_maps(scores, grid, size, 4.0).numpy()
    assert got.shape == (3, size, size)
    np.testing.assert_allclose(got, reference(scores, grid, size), atol=1e-5, rtol=0)


def test_single_hot_patch_at_the_border():
    # the border is where scipy's 'reflect' (d c b a | a b c d) and a 'mirror' padding (d c b | a b c d) differ
    scores = torch.zeros(1, 14 * 14)
    scores[0, 0] = 10.0  # top-left patch
    scores[0, 14 * 7 + 13] = 4.0  # right edge
    got = anomaly_maps(scores, (14, 14), 224, 4.0).numpy()
    np.testing.assert_allclose(got, reference(scores, (14, 14), 224), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [8, 16, 17, 20])
def test_maps_smaller_than_the_kernel(size):
    # the sigma-4 kernel has radius 16: scipy still works when the map is smaller than that
    scores = torch.rand(2, 4 * 4, generator=torch.Generator().manual_seed(1))
    got = anomaly_maps(scores, (4, 4), size, 4.0).numpy()
    np.testing.assert_allclose(got, reference(scores, (4, 4), size), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sigma", [1.0, 2.3, 2.4, 0.6])
def test_other_sigmas_follow_scipy_truncation(sigma):
    scores = torch.rand(2, 7 * 7, generator=torch.Generator().manual_seed(2))
    got = anomaly_maps(scores, (7, 7), 56, sigma=sigma).numpy()
    np.testing.assert_allclose(got, reference(scores, (7, 7), 56, sigma=sigma), atol=1e-5, rtol=0)


def test_gaussian_kernel_matches_scipy_weights():
    impulse = np.zeros(101)
    impulse[50] = 1.0
    for sigma in (4.0, 2.3, 1.0):
        weights = ndimage.gaussian_filter1d(impulse, sigma)
        kernel = gaussian_kernel(sigma).numpy()
        radius = kernel.size // 2
        np.testing.assert_allclose(kernel, weights[50 - radius:50 + radius + 1], atol=1e-7)
        assert np.count_nonzero(weights) == kernel.size  # same truncation radius


def test_sigma_zero_is_plain_bilinear():
    scores = torch.rand(2, 16)
    got = anomaly_maps(scores, (4, 4), 32, sigma=0).numpy()
    np.testing.assert_allclose(got, reference(scores, (4, 4), 32, sigma=0), atol=1e-6, rtol=0)


def test_constant_scores_stay_constant():
    got = anomaly_maps(torch.full((1, 196), 2.5), (14, 14), 224, 4.0)
    torch.testing.assert_close(got, torch.full((1, 224, 224), 2.5))


def test_image_score_is_the_max_patch_score():
    scores = torch.rand(5, 196, generator=torch.Generator().manual_seed(3))
    scores[2, 17] = 9.0
    got = image_scores(scores)
    assert got.shape == (5,)
    torch.testing.assert_close(got, torch.tensor([row.max() for row in scores]))
    assert got[2] == 9.0
