"""Anomaly-detection metrics and continual-learning summaries.

Every curve metric sorts the scores once (descending) and reads everything from cumulative
sums taken at the last index of each run of tied scores, so a threshold never splits a tie.
This reproduces sklearn's ``roc_auc_score`` / ``average_precision_score`` and the official
MVTec AD AUPRO code, while staying fast on millions of pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "roc_auc",
    "average_precision",
    "f1_max",
    "auroc_and_ap",
    "binary_metrics",
    "aupro",
    "compute_task_metrics",
    "final_average",
    "forgetting_measure",
]

_NAN = float("nan")


# ----------------------------------------------------------------------------- sorting core


def _as_scores(scores) -> np.ndarray:
    s = np.asarray(scores).ravel()
    if s.dtype.kind not in "fiub":
        raise ValueError(f"scores must be numeric, got dtype {s.dtype}")
    if s.dtype.kind == "f" and np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s


def _sort_desc(scores: np.ndarray):
    """Descending order and the sorted positions that end a run of tied scores."""
    # Order inside a tie does not matter: only cumulative sums at tie ends are read.
    order = np.argsort(scores)[::-1]
    s_sorted = scores[order]
    ends = np.flatnonzero(s_sorted[1:] != s_sorted[:-1])
    ends = np.append(ends, s_sorted.size - 1)
    return order, ends


def _binary_from_sorted(y_sorted: np.ndarray, ends: np.ndarray):
    """(auroc, ap, f1max) from labels in descending-score order."""
    tps = np.cumsum(y_sorted, dtype=np.int64)[ends]
    fps = (ends + 1) - tps
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    if n_pos == 0 or n_neg == 0:
        return _NAN, _NAN, _NAN

    # Trapezoid ROC area on integer counts (exact up to the final division); starts at (0, 0).
    tp = np.concatenate(([0], tps)).astype(np.float64)
    fp = np.concatenate(([0], fps)).astype(np.float64)
    auroc = float(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])) / (2.0 * n_pos * n_neg))

    # sklearn's AP: sum over distinct thresholds of (recall step) * precision, no interpolation.
    precision = tps / (ends + 1.0)
    recall = tps / float(n_pos)
    ap = float(np.sum(np.diff(np.concatenate(([0.0], recall))) * precision))

    denom = precision + recall
    f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return auroc, ap, float(f1.max())


def binary_metrics(labels, scores):
    """(auroc, ap, f1max) with one sort; nan for all three when only one class is present."""
    s = _as_scores(scores)
    y = np.asarray(labels).ravel() != 0
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in size")
    if s.size == 0:
        return _NAN, _NAN, _NAN
    order, ends = _sort_desc(s)
    return _binary_from_sorted(y[order], ends)


def auroc_and_ap(labels, scores):
    """(roc_auc, average_precision) from a single sort."""
    auroc, ap, _ = binary_metrics(labels, scores)
    return auroc, ap


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve, equal to sklearn's roc_auc_score (ties included)."""
    return binary_metrics(labels, scores)[0]


def average_precision(labels, scores) -> float:
    """Step-wise average precision, equal to sklearn's average_precision_score."""
    return binary_metrics(labels, scores)[1]


def f1_max(labels, scores) -> float:
    """Best F1 over all distinct score thresholds."""
    return binary_metrics(labels, scores)[2]


# ----------------------------------------------------------------------------- AUPRO


def _as_stack(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got {a.shape}")
    return a


def _binary_masks(masks) -> np.ndarray:
    # > 0.5 so that bool, {0, 1} and {0, 255} masks all mean the same thing.
    return _as_stack(masks, "masks") > 0.5


def _pro_weights(gt: np.ndarray):
    """Per-pixel (is_normal, pro_increment) and the region count for an (N, H, W) bool stack."""
    # 3x3 connectivity within each image, none across images: one label() call for the stack.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labeled, n_regions = ndimage.label(gt, structure=structure)
    labeled = labeled.ravel()
    if n_regions == 0:
        return labeled == 0, None, 0
    area = np.bincount(labeled, minlength=n_regions + 1).astype(np.float64)
    inc = np.zeros(n_regions + 1, dtype=np.float64)
    inc[1:] = 1.0 / (area[1:] * n_regions)
    return labeled == 0, inc[labeled], n_regions


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
        return _NAN
    fpr = np.cumsum(normal[order], dtype=np.int64)[ends] / float(n_normal)
    pro = np.cumsum(pro_inc[order])[ends]
    # Rounding can overshoot 1 by an ulp; the curve is a fraction.
    np.clip(pro, 0.0, 1.0, out=pro)
    fpr = np.concatenate(([0.0], fpr))
    pro = np.concatenate(([0.0], pro))
    return float(_trapezoid_to(fpr, pro, fpr_limit) / fpr_limit)


def _check_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return fpr_limit


def aupro(masks, anomaly_maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD).

    Regions are the 8-connected defect components of each mask; the result is 1.0 for a
    perfect map and nan when there is no defect region (or no normal pixel).
    """
    fpr_limit = _check_limit(fpr_limit)
    gt = _binary_masks(masks)
    maps = _as_stack(anomaly_maps, "anomaly_maps")
    if maps.shape != gt.shape:
        raise ValueError(f"anomaly_maps {maps.shape} and masks {gt.shape} differ in shape")
    normal, pro_inc, _ = _pro_weights(gt)
    if pro_inc is None:
        return _NAN
    order, ends = _sort_desc(_as_scores(maps))
    return _aupro_from_sorted(order, ends, normal, pro_inc, fpr_limit)


# ----------------------------------------------------------------------------- per task


def compute_task_metrics(image_labels, image_scores, masks=None, anomaly_maps=None,
                         fpr_limit: float = 0.3) -> dict:
    """Image and pixel metrics of one task; pixel ones are nan without masks and maps."""
    i_auroc, i_ap, i_f1 = binary_metrics(image_labels, image_scores)
    out = {
        "image_auroc": i_auroc,
        "image_ap": i_ap,
        "image_f1max": i_f1,
        "pixel_auroc": _NAN,
        "pixel_ap": _NAN,
        "pixel_f1max": _NAN,
        "aupro": _NAN,
    }
    if masks is None or anomaly_maps is None:
        return out
    fpr_limit = _check_limit(fpr_limit)
    gt = _binary_masks(masks)
    maps = _as_stack(anomaly_maps, "anomaly_maps")
    if maps.shape != gt.shape:
        raise ValueError(f"anomaly_maps {maps.shape} and masks {gt.shape} differ in shape")
    # One sort of all pixels serves pixel AUROC, AP, F1 and AUPRO.
    order, ends = _sort_desc(_as_scores(maps))
    out["pixel_auroc"], out["pixel_ap"], out["pixel_f1max"] = _binary_from_sorted(
        gt.ravel()[order], ends)
    normal, pro_inc, _ = _pro_weights(gt)
    out["aupro"] = _aupro_from_sorted(order, ends, normal, pro_inc, fpr_limit)
    return out


# ----------------------------------------------------------------------------- continual


def _as_matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be a non-empty T x T array, got shape {R.shape}")
    return R


def final_average(R) -> float:
    """Mean over tasks of the last row of the accuracy matrix (nan entries ignored)."""
    last = _as_matrix(R)[-1]
    return float(np.nanmean(last)) if np.isfinite(last).any() else _NAN


def forgetting_measure(R) -> float:
    """Mean over j < T-1 of (best R[l][j] for l in [j, T-2]) - R[T-1][j]; nan when T == 1."""
    R = _as_matrix(R)
    T = R.shape[0]
    if T == 1:
        return _NAN
    # Only rows l in [j, T-2] count for task j, whatever the caller stored above the diagonal.
    prev = R[:-1, :-1]
    seen = np.tril(np.ones(prev.shape, dtype=bool)) & ~np.isnan(prev)
    best = np.max(np.where(seen, prev, -np.inf), axis=0)
    best[~seen.any(axis=0)] = np.nan
    drop = best - R[-1, :-1]
    return float(np.nanmean(drop)) if np.isfinite(drop).any() else _NAN
