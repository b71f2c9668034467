"""Reference pixel metrics on numpy arrays, for checking ucad.results.metrics' torch path against.

They share the sorting and region helpers of ucad.results.metrics (which tests/test_metrics.py checks against
scikit-learn, a brute-force AUPRO and hand-worked cases) but integrate the curves with numpy, in a
different order of operations: the full PRO curve, then a trapezoid cut at the limit."""
from __future__ import annotations

import numpy as np

from ucad.results.metrics import _as_scores, _binary_from_sorted, _binary_masks, _check_limit, _pro_weights, _sort_desc, \
    _stack_shape


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area of y(x) on [x[0], x_max], interpolating the curve exactly at x_max."""
    area_all = 0.5 * (y[1:] + y[:-1]) * np.diff(x)
    k = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    area = float(np.sum(area_all[: k - 1]))
    if k < x.size and x[k - 1] < x_max:
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += float(0.5 * (y0 + y_at) * (x_max - x0))
    return area


def _aupro_from_sorted(order, ends, normal, pro_inc, fpr_limit: float) -> float:
    n_normal = int(np.count_nonzero(normal))
    if pro_inc is None or n_normal == 0:
        return float("nan")
    fpr = np.cumsum(normal[order], dtype=np.int64)[ends] / float(n_normal)
    pro = np.cumsum(pro_inc[order])[ends]
    np.clip(pro, 0.0, 1.0, out=pro)  # rounding can overshoot 1 by an ulp; the curve is a fraction
    fpr = np.concatenate(([0.0], fpr))
    pro = np.concatenate(([0.0], pro))
    return float(_trapezoid_to(fpr, pro, fpr_limit) / fpr_limit)


def _stacks(masks, anomaly_maps):
    gt, maps = _binary_masks(masks), np.asarray(anomaly_maps)
    if _stack_shape(maps.shape) != gt.shape:
        raise ValueError(f"anomaly_maps {maps.shape} and masks {gt.shape} differ in shape")
    return gt, maps.reshape(gt.shape)


def aupro(masks, anomaly_maps, fpr_limit: float) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD).

    Regions are the 8-connected defect components of each mask; the result is 1.0 for a
    perfect map and nan when there is no defect region (or no normal pixel).
    """
    fpr_limit = _check_limit(fpr_limit)
    gt, maps = _stacks(masks, anomaly_maps)
    pro_inc, _ = _pro_weights(gt)
    if pro_inc is None:
        return float("nan")
    order, ends = _sort_desc(_as_scores(maps))
    return _aupro_from_sorted(order, ends, ~gt.ravel(), pro_inc, fpr_limit)


def pixel_metrics(masks, anomaly_maps, fpr_limit: float) -> dict:
    """Pixel AUROC, AP, F1-max and AUPRO of numpy maps, from one sort of all pixels."""
    fpr_limit = _check_limit(fpr_limit)
    gt, maps = _stacks(masks, anomaly_maps)
    order, ends = _sort_desc(_as_scores(maps))
    auroc, ap, f1max = _binary_from_sorted(gt.ravel()[order], ends)
    pro_inc, _ = _pro_weights(gt)
    return {"pixel_auroc": auroc, "pixel_ap": ap, "pixel_f1max": f1max,
            "aupro": _aupro_from_sorted(order, ends, ~gt.ravel(), pro_inc, fpr_limit)}
