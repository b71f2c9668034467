"""The torch pixel-metric path (PixelGroundTruth + pixel_metrics_torch) against the numpy reference."""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from metric_references import aupro, pixel_metrics
from ucad.results import metrics as M
from ucad.config import RunConfig

FPR_LIMIT = RunConfig.fpr_limit

# the CUDA variants carry the `cuda` marker: skipped without a GPU, selected by `pytest -m cuda`
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _blobby_masks(rng, n, h, w, max_blobs=3, good=1):
    masks = np.zeros((n, h, w), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for i in range(good, n):  # the first `good` images stay defect-free
        for _ in range(rng.integers(1, max_blobs + 1)):
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            ry, rx = rng.uniform(1.5, h / 6), rng.uniform(1.5, w / 6)
            masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
    return masks


def _random_maps(rng, masks, decimals=None, dtype=np.float32):
    noise = ndimage.gaussian_filter(rng.normal(size=masks.shape).astype(np.float32), sigma=(0, 2, 2))
    maps = (noise / noise.std() + 1.5 * masks).astype(dtype)
    return np.round(maps, decimals) if decimals is not None else maps


def _numpy_pixel(masks, maps, fpr_limit=FPR_LIMIT):
    return pixel_metrics(masks, maps, fpr_limit)


def _assert_same(a, b, tol=1e-6):
    for k in M.PIXEL_KEYS:
        if math.isnan(a[k]) or math.isnan(b[k]):
            assert math.isnan(a[k]) and math.isnan(b[k]), (k, a[k], b[k])
        else:
            assert a[k] == pytest.approx(b[k], abs=tol), (k, a[k], b[k])


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("seed", range(3))
def test_matches_numpy_random_maps(seed, decimals, device):
    rng = np.random.default_rng(seed)
    masks = _blobby_masks(rng, 12, 48, 40, max_blobs=4, good=3)
    maps = _random_maps(rng, masks, decimals)  # decimals=0/1: many ties, also across classes
    gt = M.PixelGroundTruth(masks, device=device)
    for limit in (0.3, 0.1, 0.01, 0.5, 1.0):
        expected = _numpy_pixel(masks, maps, limit)
        got = M.pixel_metrics_torch(gt, torch.from_numpy(maps), fpr_limit=limit)
        assert set(got) == set(M.PIXEL_KEYS)
        assert all(isinstance(v, float) for v in got.values())
        _assert_same(expected, got)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_maps(device):
    rng = np.random.default_rng(11)
    masks = _blobby_masks(rng, 8, 40, 40)
    maps16 = _random_maps(rng, masks, dtype=np.float16)
    expected = _numpy_pixel(masks, maps16)
    gt = M.PixelGroundTruth(masks, device=device)
    _assert_same(expected, M.pixel_metrics_torch(gt, torch.from_numpy(maps16), FPR_LIMIT))
    _assert_same(expected, M.pixel_metrics_torch(gt, torch.from_numpy(maps16).to(device), FPR_LIMIT))
    _assert_same(expected, M.pixel_metrics_torch(gt, maps16, FPR_LIMIT))  # numpy maps are accepted too
    # bfloat16 widens exactly to float32: same as numpy on those float32 values
    mbf = torch.from_numpy(maps16.astype(np.float32)).to(torch.bfloat16)
    _assert_same(_numpy_pixel(masks, mbf.float().numpy()), M.pixel_metrics_torch(gt, mbf, FPR_LIMIT))


def test_float64_and_integer_maps_keep_their_ties():
    rng = np.random.default_rng(5)
    masks = _blobby_masks(rng, 6, 32, 32)
    # float64 values that differ only beyond float32 precision must stay distinct
    maps64 = _random_maps(rng, masks).astype(np.float64) + 1e-12 * rng.random(masks.shape)
    gt = M.PixelGroundTruth(masks)
    _assert_same(_numpy_pixel(masks, maps64), M.pixel_metrics_torch(gt, torch.from_numpy(maps64), FPR_LIMIT))
    maps_int = (_random_maps(rng, masks) * 3).astype(np.int64)
    _assert_same(_numpy_pixel(masks, maps_int), M.pixel_metrics_torch(gt, torch.from_numpy(maps_int), FPR_LIMIT))


def test_all_scores_tied():
    rng = np.random.default_rng(2)
    masks = _blobby_masks(rng, 4, 16, 16)
    maps = np.full(masks.shape, 0.25, dtype=np.float32)
    got = M.pixel_metrics_torch(M.PixelGroundTruth(masks), torch.from_numpy(maps), FPR_LIMIT)
    assert got["pixel_auroc"] == pytest.approx(0.5, abs=1e-12)
    _assert_same(_numpy_pixel(masks, maps), got)


def test_mask_formats_and_shapes():
    rng = np.random.default_rng(3)
    masks = _blobby_masks(rng, 5, 24, 24)
    maps = _random_maps(rng, masks, 1)
    expected = _numpy_pixel(masks, maps)
    for m in (masks.astype(bool), masks * 255, masks.astype(np.float32), torch.from_numpy(masks),
              torch.from_numpy(masks * 255), torch.from_numpy(masks).to(torch.bfloat16),
              masks[:, None]):  # (N, 1, H, W)
        gt = M.PixelGroundTruth(m)
        assert gt.shape == masks.shape
        _assert_same(expected, M.pixel_metrics_torch(gt, torch.from_numpy(maps), FPR_LIMIT))
        _assert_same(expected, M.pixel_metrics_torch(gt, torch.from_numpy(maps)[:, None], FPR_LIMIT))
    # a single (H, W) mask and map
    _assert_same(_numpy_pixel(masks[2], maps[2]),
                 M.pixel_metrics_torch(M.PixelGroundTruth(masks[2]), torch.from_numpy(maps[2]), FPR_LIMIT))


# ----------------------------------------------------------------------------- AUPRO regions


def test_ground_truth_contents():
    rng = np.random.default_rng(4)
    masks = _blobby_masks(rng, 6, 32, 32, max_blobs=4)
    gt = M.PixelGroundTruth(masks)
    assert gt.labels.dtype == torch.bool and gt.labels.shape == (masks.size,)
    assert gt.pro_increment.dtype == torch.float64
    assert gt.num_normal == int((masks == 0).sum()) and gt.num_defect == int(masks.sum())
    assert gt.num_normal + gt.num_defect == masks.size
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    assert gt.num_regions == n_regions
    # each region carries weight 1 / n_regions in total, normal pixels none
    assert float(gt.pro_increment.sum()) == pytest.approx(1.0, abs=1e-12)
    assert bool((gt.pro_increment[~gt.labels] == 0).all())
    assert bool((gt.pro_increment[gt.labels] > 0).all())


def test_hand_worked_aupro_and_8_connectivity():
    # Same hand case as tests/test_metrics.py: two 1x4 images with regions of area 2 and 1.
    masks = np.array([[[1, 1, 0, 0]], [[0, 1, 0, 0]]])
    maps = torch.tensor([[[0.9, 0.5, 0.5, 0.1]], [[0.7, 0.8, 0.3, 0.1]]])
    gt = M.PixelGroundTruth(masks)
    assert M.pixel_metrics_torch(gt, maps, 0.3)["aupro"] == pytest.approx(0.23125 / 0.3, abs=1e-12)
    assert M.pixel_metrics_torch(gt, maps, 0.5)["aupro"] == pytest.approx(0.85, abs=1e-12)
    assert M.pixel_metrics_torch(gt, maps, 0.2)["aupro"] == pytest.approx(0.75, abs=1e-12)
    assert M.pixel_metrics_torch(gt, maps, 1.0)["aupro"] == pytest.approx(
        aupro(masks, maps.numpy(), 1.0), abs=1e-12)

    # (0,0) and (1,1) touch diagonally: one region of area 2; (0,4) is a second region.
    masks = np.zeros((1, 3, 5), dtype=np.uint8)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 0, 4] = 1
    maps = torch.zeros((1, 3, 5))
    maps[0, 0, 0] = maps[0, 0, 4] = 1.0
    gt = M.PixelGroundTruth(masks)
    assert gt.num_regions == 2
    assert M.pixel_metrics_torch(gt, maps, 0.3)["aupro"] == pytest.approx(0.7875, abs=1e-12)


def test_many_regions_per_image():
    # Several separate squares per image, of very different areas, plus good images.
    rng = np.random.default_rng(8)
    masks = np.zeros((6, 40, 40), dtype=np.uint8)
    for i in range(2, 6):
        for j, size in enumerate((1, 2, 5, 9)[: i]):
            y, x = 2 + 10 * j, int(rng.integers(0, 40 - size))
            masks[i, y:y + size, x:x + size] = 1
    gt = M.PixelGroundTruth(masks)
    assert gt.num_regions == 2 + 3 + 4 + 4
    for decimals in (None, 1):
        maps = _random_maps(rng, masks, decimals)
        for limit in (0.3, 0.05, 1.0):
            got = M.pixel_metrics_torch(gt, torch.from_numpy(maps), limit)
            _assert_same(_numpy_pixel(masks, maps, limit), got)
            assert got["aupro"] == pytest.approx(aupro(masks, maps, limit), abs=1e-6)


def test_perfect_map():
    rng = np.random.default_rng(9)
    masks = _blobby_masks(rng, 5, 24, 24)
    maps = masks + 0.1 * rng.random(masks.shape)
    got = M.pixel_metrics_torch(M.PixelGroundTruth(masks), torch.from_numpy(maps), 0.05)
    for k in M.PIXEL_KEYS:
        assert got[k] == pytest.approx(1.0, abs=1e-12)


def test_fpr_limit_on_exact_curve_point():
    # Limits that land exactly on an FPR of the curve (k / n_neg) and just beside it.
    rng = np.random.default_rng(12)
    masks = np.zeros((2, 5, 4), dtype=np.uint8)
    masks[1, 1:3, 1:3] = 1  # n_neg = 36
    maps = np.round(rng.random(masks.shape) + masks * 0.3, 1)
    gt = M.PixelGroundTruth(masks)
    for limit in (9 / 36, 9 / 36 + 1e-9, 9 / 36 - 1e-9, 0.3, 1.0):
        _assert_same(_numpy_pixel(masks, maps, limit),
                     M.pixel_metrics_torch(gt, torch.from_numpy(maps), limit), tol=1e-12)
    masks = np.zeros((1, 4, 6), dtype=np.uint8)
    masks[0, 1, 1:3] = 1  # n_neg = 22; float64(15/22) * 22 < 15
    maps = rng.random(masks.shape) + masks * 0.5
    gt = M.PixelGroundTruth(masks)
    for limit in (15 / 22, 14 / 22, 0.3):
        _assert_same(_numpy_pixel(masks, maps, limit),
                     M.pixel_metrics_torch(gt, torch.from_numpy(maps), limit), tol=1e-12)


# ----------------------------------------------------------------------------- nan / errors


def test_no_defects_and_all_defects_give_nan():
    maps = torch.from_numpy(np.random.default_rng(0).random((3, 8, 8)))
    for masks in (np.zeros((3, 8, 8)), np.ones((3, 8, 8))):
        gt = M.PixelGroundTruth(masks)
        got = M.pixel_metrics_torch(gt, maps, FPR_LIMIT)
        assert all(math.isnan(got[k]) for k in M.PIXEL_KEYS)
        _assert_same(_numpy_pixel(masks, maps.numpy()), got)
    assert M.PixelGroundTruth(np.zeros((3, 8, 8))).pro_increment is None


def test_errors():
    rng = np.random.default_rng(0)
    masks = _blobby_masks(rng, 3, 16, 16)
    gt = M.PixelGroundTruth(masks)
    maps = torch.from_numpy(_random_maps(rng, masks))
    with pytest.raises(ValueError):
        M.pixel_metrics_torch(gt, maps[:2], FPR_LIMIT)
    with pytest.raises(ValueError):
        M.pixel_metrics_torch(gt, maps, fpr_limit=0.0)
    bad = maps.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError):
        M.pixel_metrics_torch(gt, bad, FPR_LIMIT)
    with pytest.raises(ValueError):
        M.compute_task_metrics([0, 1, 1], [0.1, 0.5, 0.9], masks[:2], maps, FPR_LIMIT, ground_truth=gt)


# ----------------------------------------------------------------------------- per task


@pytest.mark.parametrize("device", DEVICES)
def test_compute_task_metrics_with_and_without_ground_truth(device):
    rng = np.random.default_rng(21)
    masks = _blobby_masks(rng, 10, 32, 48, good=4)
    gt = M.PixelGroundTruth(masks, device=device)
    image_labels = masks.max(axis=(1, 2))
    for decimals in (None, 1):
        maps = _random_maps(rng, masks, decimals)
        image_scores = maps.max(axis=(1, 2))
        for limit in (0.3, 0.2):
            plain = M.compute_task_metrics(image_labels, image_scores, masks, maps, limit)
            _assert_same(_numpy_pixel(masks, maps, limit), plain)
            t_maps = torch.from_numpy(maps).to(device)
            for kwargs in (dict(masks=masks, anomaly_maps=maps),
                           dict(masks=None, anomaly_maps=t_maps),
                           dict(masks=torch.from_numpy(masks), anomaly_maps=t_maps.cpu())):
                fast = M.compute_task_metrics(image_labels, image_scores, fpr_limit=limit,
                                              ground_truth=gt, **kwargs)
                assert set(fast) == set(plain)
                for k in ("image_auroc", "image_ap", "image_f1max"):
                    assert fast[k] == plain[k]
                _assert_same(plain, fast)
        # float16 maps on the device give the numpy numbers of the same float16 values
        maps16 = maps.astype(np.float16)
        fast16 = M.compute_task_metrics(image_labels, image_scores, None, torch.from_numpy(maps16).to(device),
                                        FPR_LIMIT, ground_truth=gt)
        _assert_same(_numpy_pixel(masks, maps16), fast16)
    # without maps the pixel metrics stay nan, as without ground truth
    res = M.compute_task_metrics(image_labels, image_scores, None, None, FPR_LIMIT, ground_truth=gt)
    assert all(math.isnan(res[k]) for k in M.PIXEL_KEYS)


def test_full_size_test_set():
    # The evaluation scale: 120 images of 224 x 224 (about 6M pixels), float32 maps.
    rng = np.random.default_rng(0)
    n, h, w = 120, 224, 224
    masks = np.zeros((n, h, w), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for i in range(n // 2, n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, h, 2)
            ry, rx = rng.uniform(3, 40, 2)
            masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
    maps = (rng.standard_normal(masks.shape, dtype=np.float32) + 1.5 * masks).astype(np.float32)
    expected = _numpy_pixel(masks, maps)
    gt = M.PixelGroundTruth(masks)
    _assert_same(expected, M.pixel_metrics_torch(gt, torch.from_numpy(maps), FPR_LIMIT))
