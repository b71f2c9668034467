import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from metric_references import aupro, pixel_metrics
from ucad.results import metrics as M

FPR_LIMIT = 0.3  # the run's default, for which the hand-worked areas below are given


def _sk_f1max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    d = p + r
    f1 = np.divide(2 * p * r, d, out=np.zeros_like(d), where=d > 0)
    return f1.max()


def _random_case(rng, n, rounded):
    y = rng.random(n) < 0.3
    s = rng.normal(size=n) + 0.8 * y
    if rounded:
        s = np.round(s, 1)  # many ties, including ties across the two classes
    return y.astype(int), s


@pytest.mark.parametrize("rounded", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_sklearn(seed, rounded):
    rng = np.random.default_rng(seed)
    y, s = _random_case(rng, 300 + 50 * seed, rounded)
    assert M.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    auroc, ap, f1max = M.binary_metrics(y, s)
    assert auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert ap == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert f1max == pytest.approx(_sk_f1max(y, s), abs=1e-12)


def test_all_tied_scores():
    y = np.array([0, 1, 0, 1, 1])
    s = np.ones(5)
    assert M.roc_auc(y, s) == pytest.approx(0.5)
    assert M.average_precision(y, s) == pytest.approx(average_precision_score(y, s))
    assert M.binary_metrics(y, s)[2] == pytest.approx(_sk_f1max(y, s))


def test_one_class_gives_nan():
    s = np.array([0.1, 0.5, 0.3])
    for y in (np.zeros(3), np.ones(3)):
        assert math.isnan(M.roc_auc(y, s))
        assert math.isnan(M.average_precision(y, s))
        assert all(math.isnan(v) for v in M.binary_metrics(y, s))


def test_nan_scores_rejected():
    with pytest.raises(ValueError):
        M.roc_auc([0, 1], [0.1, float("nan")])


def _blobby_masks(rng, n, h, w, max_blobs=3):
    masks = np.zeros((n, h, w), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for i in range(1, n):  # image 0 stays good
        for _ in range(rng.integers(1, max_blobs + 1)):
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            ry, rx = rng.uniform(1.5, h / 5), rng.uniform(1.5, w / 5)
            masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
    return masks


def _random_maps(rng, masks, decimals=None):
    noise = ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 2, 2))
    maps = noise / noise.std() + 1.5 * masks
    return np.round(maps, decimals) if decimals is not None else maps


def test_pixel_metrics_large_match_sklearn():
    rng = np.random.default_rng(0)
    masks = _blobby_masks(rng, 20, 64, 64)
    for maps in (_random_maps(rng, masks), _random_maps(rng, masks, 2)):
        y, s = masks.ravel(), maps.ravel()
        res = M.compute_task_metrics(masks.max(axis=(1, 2)), maps.max(axis=(1, 2)), masks, maps, FPR_LIMIT)
        reference = pixel_metrics(masks, maps, FPR_LIMIT)
        for got in (res, reference):
            assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-10)
            assert got["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-10)
            assert got["pixel_f1max"] == pytest.approx(_sk_f1max(y, s), abs=1e-10)
        assert res["aupro"] == pytest.approx(aupro(masks, maps, FPR_LIMIT), abs=1e-12)


def test_float16_maps_match_sklearn_on_same_values():
    rng = np.random.default_rng(1)
    masks = _blobby_masks(rng, 6, 32, 32)
    maps = _random_maps(rng, masks).astype(np.float16)
    res = M.compute_task_metrics([0, 1, 1, 1, 1, 1], rng.random(6), masks.astype(bool), maps, FPR_LIMIT)
    y, s = masks.ravel(), maps.ravel().astype(np.float64)
    assert res["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-10)
    assert res["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-10)


# ----------------------------------------------------------------------------- AUPRO


def _hand_case():
    # Two 1x4 images. Region r1 = A[0:2] (area 2), region r2 = B[1] (area 1),
    # normal pixels A2, A3, B0, B2, B3 (5 of them).
    masks = np.array([[[1, 1, 0, 0]], [[0, 1, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.5, 0.1]], [[0.7, 0.8, 0.3, 0.1]]])
    return masks, maps


def test_aupro_hand_worked():
    # threshold  new pixels        PRO = mean(r1, r2)        FPR
    #   0.9      A0 (r1)           (1/2 + 0)/2 = 0.25        0
    #   0.8      B1 (r2)           (1/2 + 1)/2 = 0.75        0
    #   0.7      B0 (normal)       0.75                      1/5 = 0.2
    #   0.5      A1 (r1), A2 (n)   1.0   (tie: one point)    2/5 = 0.4
    #   0.3      B2                1.0                       0.6
    #   0.1      A3, B3            1.0                       1.0
    # Curve from (0,0): (0,.25) (0,.75) (.2,.75) (.4,1) ...
    # limit 0.3: [0,.2] -> .75*.2 = .15; PRO(.3) = .875, [.2,.3] -> .1*(.75+.875)/2 = .08125
    #            area .23125 / .3 = 0.7708333...
    # limit 0.5: .15 + .2*(.75+1)/2 + .1*1 = .425; / .5 = 0.85
    masks, maps = _hand_case()
    assert aupro(masks, maps, 0.3) == pytest.approx(0.23125 / 0.3, abs=1e-12)
    assert aupro(masks, maps, 0.5) == pytest.approx(0.85, abs=1e-12)
    assert aupro(masks, maps, 0.2) == pytest.approx(0.75, abs=1e-12)


def test_aupro_uses_8_connectivity():
    # (0,0) and (1,1) touch diagonally: one region of area 2; (0,4) is a second region.
    masks = np.zeros((1, 3, 5), dtype=np.uint8)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 0, 4] = 1
    maps = np.zeros((1, 3, 5))
    maps[0, 0, 0] = maps[0, 0, 4] = 1.0
    # Curve (0,0) (0,.75) (1,1): PRO(.3) = .825, area .3*(.75+.825)/2 -> /.3 = .7875.
    # With 4-connectivity it would be PRO 2/3 at FPR 0 and 0.71666...
    assert aupro(masks, maps, 0.3) == pytest.approx(0.7875, abs=1e-12)


def test_aupro_perfect_map_is_one():
    rng = np.random.default_rng(3)
    masks = _blobby_masks(rng, 5, 24, 24)
    maps = masks + 0.1 * rng.random(masks.shape)
    assert aupro(masks, maps, FPR_LIMIT) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, maps, 0.05) == pytest.approx(1.0, abs=1e-12)


def test_aupro_nan_without_regions():
    masks = np.zeros((2, 8, 8))
    maps = np.random.default_rng(0).random((2, 8, 8))
    assert math.isnan(aupro(masks, maps, FPR_LIMIT))
    res = M.compute_task_metrics([0, 0], [0.1, 0.2], masks, maps, FPR_LIMIT)
    assert math.isnan(res["aupro"]) and math.isnan(res["pixel_auroc"])


def _aupro_brute(masks, maps, fpr_limit):
    regions = []
    for m, a in zip(masks, maps):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [a[lab == k] for k in range(1, n + 1)]
    normal = maps[masks == 0]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= fpr_limit
    x, y = fprs[keep], pros[keep]
    if x[-1] < fpr_limit:
        nxt = np.flatnonzero(~keep)[0]
        y_lim = np.interp(fpr_limit, fprs[nxt - 1:nxt + 1], pros[nxt - 1:nxt + 1])
        x, y = np.append(x, fpr_limit), np.append(y, y_lim)
    return np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("decimals", [None, 1])
def test_aupro_matches_brute_force(seed, decimals):
    rng = np.random.default_rng(seed)
    masks = _blobby_masks(rng, 4, 16, 16)
    maps = _random_maps(rng, masks, decimals)
    for limit in (0.3, 0.1, 1.0):
        assert aupro(masks, maps, limit) == pytest.approx(
            _aupro_brute(masks, maps, limit), abs=1e-6)


def test_aupro_limit_changes_result():
    rng = np.random.default_rng(7)
    masks = _blobby_masks(rng, 4, 16, 16)
    maps = _random_maps(rng, masks)
    a03, a01 = aupro(masks, maps, 0.3), aupro(masks, maps, 0.1)
    assert not math.isclose(a03, a01)
    with pytest.raises(ValueError):
        aupro(masks, maps, 0.0)


# ----------------------------------------------------------------------------- per task / CL


def test_compute_task_metrics_keys_and_image_only():
    res = M.compute_task_metrics([0, 1, 1, 0], [0.2, 0.9, 0.4, 0.5], None, None, FPR_LIMIT)
    assert set(res) == {"image_auroc", "image_ap", "image_f1max",
                        "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"}
    assert res["image_auroc"] == pytest.approx(0.75)
    assert res["image_ap"] == pytest.approx(average_precision_score([0, 1, 1, 0], [0.2, 0.9, 0.4, 0.5]))
    assert all(math.isnan(res[k]) for k in ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"))


def test_final_average_and_forgetting():
    nan = float("nan")
    R = [[0.90, nan, nan],
         [0.80, 0.95, nan],
         [0.70, 0.85, 0.99]]
    assert M.final_average(R) == pytest.approx((0.70 + 0.85 + 0.99) / 3)
    # task 0: max(.90, .80) - .70 = .20; task 1: .95 - .85 = .10
    assert M.forgetting_measure(R) == pytest.approx(0.15)

    R2 = [[0.60, nan, nan],
          [0.80, 0.90, nan],
          [0.70, 0.95, 0.99]]
    # task 0: max(.60, .80) - .70 = .10; task 1: .90 - .95 = -.05
    assert M.forgetting_measure(R2) == pytest.approx(0.025)

    assert M.final_average([[0.8]]) == pytest.approx(0.8)
    assert math.isnan(M.forgetting_measure([[0.8]]))
