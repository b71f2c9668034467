"""Anomaly-detection metrics and continual-learning summaries.

Every curve metric sorts the scores once (descending) and reads everything from cumulative
sums taken at the last index of each run of tied scores, so a threshold never splits a tie.
This reproduces sklearn's ``roc_auc_score`` / ``average_precision_score`` and the official
MVTec AD AUPRO code, while staying fast on millions of pixels.

When one test set is scored many times, :class:`PixelGroundTruth` precomputes everything that
depends on the masks only (labels, AUPRO region weights) as torch tensors on a device, and
:func:`pixel_metrics_torch` then computes the four pixel metrics there (a GPU sort of millions of
scores takes milliseconds), with the same tie handling and the same numbers as the numpy path.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "roc_auc",
    "average_precision",
    "f1_max",
    "precision_recall_f1",
    "auroc_and_ap",
    "binary_metrics",
    "aupro",
    "compute_task_metrics",
    "PixelGroundTruth",
    "pixel_metrics_torch",
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


def precision_recall_f1(labels, predicted) -> tuple[float, float, float]:
    """Precision, recall and F1 of binary decisions (numpy or torch, any shape, any device).

    A decision rule that flags nothing has precision 0 (sklearn's zero_division=0); all three are nan when no
    positive exists, since recall is then undefined."""
    labels = torch.as_tensor(labels).reshape(-1) != 0
    predicted = torch.as_tensor(predicted, device=labels.device).reshape(-1) != 0
    if labels.shape != predicted.shape:
        raise ValueError(f"labels ({labels.numel()}) and decisions ({predicted.numel()}) differ in size")
    positives = int(labels.sum())
    if positives == 0:
        return _NAN, _NAN, _NAN
    true_positives = int((labels & predicted).sum())
    flagged = int(predicted.sum())
    precision = true_positives / flagged if flagged else 0.0
    recall = true_positives / positives
    f1 = 2.0 * true_positives / (flagged + positives)
    return precision, recall, f1


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
                         fpr_limit: float = 0.3,
                         ground_truth: "PixelGroundTruth | None" = None) -> dict:
    """Image and pixel metrics of one task; pixel ones are nan without masks and maps.

    With ``ground_truth`` (a :class:`PixelGroundTruth` of this test set) the pixel metrics come
    from :func:`pixel_metrics_torch` on its device, ``masks`` may then be omitted, and
    ``anomaly_maps`` may be a torch tensor on any device (numpy works too).
    """
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
    if ground_truth is not None:
        if anomaly_maps is None:
            return out
        if masks is not None and _stack_shape(np.shape(masks)) != ground_truth.shape:
            raise ValueError(f"masks {tuple(np.shape(masks))} do not match the ground truth "
                             f"{ground_truth.shape}")
        out.update(pixel_metrics_torch(ground_truth, anomaly_maps, fpr_limit))
        return out
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


# ----------------------------------------------------------------------------- torch path


def _stack_shape(shape) -> tuple:
    """The (N, H, W) shape that ``_as_stack`` gives an array of this shape."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 2:
        return (1,) + shape
    if len(shape) == 4 and shape[1] == 1:
        return (shape[0],) + shape[2:]
    return shape


def _masks_to_numpy(masks) -> np.ndarray:
    if isinstance(masks, torch.Tensor):
        m = masks.detach().cpu()
        if m.dtype not in (torch.bool, torch.uint8):
            m = m.float()  # also covers bfloat16, which numpy lacks
        return m.numpy()
    return np.asarray(masks)


class PixelGroundTruth:
    """Mask-only quantities of a test set for :func:`pixel_metrics_torch`, built once.

    ``masks`` is (N, H, W) (or (H, W), or (N, 1, H, W)), numpy or torch, bool / {0, 1} /
    {0, 255}; pixels > 0.5 are defects. Attributes:

    * ``shape``: the (N, H, W) shape maps must have;
    * ``labels``: flattened bool defect labels, on ``device``;
    * ``pro_increment``: flattened float64, 1 / (area_r * num_regions) on the pixels of region r
      (8-connected component of one image's mask) and 0 on normal pixels; None without regions;
    * ``num_regions``, ``num_defect`` and ``num_normal`` (= normal-pixel count): Python ints.
    """

    def __init__(self, masks, device="cpu"):
        self.device = torch.device(device)
        gt = _binary_masks(_masks_to_numpy(masks))
        self.shape = tuple(gt.shape)
        self.num_defect = int(np.count_nonzero(gt))
        self.num_normal = int(gt.size) - self.num_defect
        _, pro_inc, self.num_regions = _pro_weights(gt)
        self.labels = torch.from_numpy(np.ascontiguousarray(gt.ravel())).to(self.device)
        self.pro_increment = (None if pro_inc is None
                              else torch.from_numpy(pro_inc).to(self.device))

    @property
    def num_pixels(self) -> int:
        return self.num_defect + self.num_normal

    def __repr__(self) -> str:
        return (f"PixelGroundTruth(shape={self.shape}, regions={self.num_regions}, "
                f"defect={self.num_defect}, normal={self.num_normal}, device={self.device})")


def _maps_to_tensor(anomaly_maps, device: torch.device) -> torch.Tensor:
    if isinstance(anomaly_maps, torch.Tensor):
        t = anomaly_maps.detach()
    else:
        a = np.asarray(anomaly_maps)
        if a.dtype.kind not in "fiub":
            raise ValueError(f"scores must be numeric, got dtype {a.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(a))
    t = t.to(device)
    if t.is_complex():
        raise ValueError(f"scores must be real, got dtype {t.dtype}")
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()  # exact, so ties are the same as in half precision
    elif t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t


def pixel_metrics_torch(ground_truth: PixelGroundTruth, anomaly_maps,
                        fpr_limit: float = 0.3) -> dict:
    """Pixel AUROC, AP, F1-max and AUPRO of ``anomaly_maps`` on the ground truth's device.

    Gives the numbers of the numpy path (``compute_task_metrics``): one descending sort, sums
    read at the last index of each run of tied scores, float64 / int64 accumulation. Maps may
    be any real dtype (float16 / bfloat16 are widened exactly to float32) on any device, or
    numpy. All four are nan when only one class of pixel is present.
    """
    fpr_limit = _check_limit(fpr_limit)
    gt = ground_truth
    dev = gt.device
    maps = _maps_to_tensor(anomaly_maps, dev)
    if _stack_shape(maps.shape) != gt.shape:
        raise ValueError(f"anomaly_maps {tuple(maps.shape)} and masks {gt.shape} differ in shape")
    scores = maps.reshape(-1)
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")
    nan = {"pixel_auroc": _NAN, "pixel_ap": _NAN, "pixel_f1max": _NAN, "aupro": _NAN}
    n_pos, n_neg = gt.num_defect, gt.num_normal
    if n_pos == 0 or n_neg == 0:
        return nan

    # Order inside a tie does not matter: only cumulative sums at tie ends are read.
    s_sorted, order = torch.sort(scores, descending=True)
    ends = torch.nonzero(s_sorted[1:] != s_sorted[:-1]).squeeze(1)
    del s_sorted
    ends = torch.cat((ends, ends.new_full((1,), scores.numel() - 1)))
    zero = ends.new_zeros(1)

    # Counts at each distinct threshold (int64, exact): predicted positives, TP, FP and steps.
    k_pred = ends + 1
    # index_select: the same gather as [idx], several times faster on CPU.
    tps = torch.cumsum(gt.labels.index_select(0, order), 0, dtype=torch.int64).index_select(0, ends)
    fps = k_pred - tps
    dtp = torch.diff(tps, prepend=zero)
    dfp = torch.diff(fps, prepend=zero)
    # ROC trapezoids from (0, 0): dfp * (tp_prev + tp) = dfp * (2 tp - dtp), summed exactly.
    twice_area = torch.sum(dfp * (2 * tps - dtp))

    # sklearn's AP: sum of (recall step) * precision = sum(dtp * tp / k) / n_pos.
    # F1 = 2 p r / (p + r) = 2 tp / (k + n_pos).
    tps_f = tps.to(torch.float64)
    k_f = k_pred.to(torch.float64)
    ap = torch.sum(dtp.to(torch.float64) * tps_f / k_f) / float(n_pos)
    f1max = 2.0 * torch.max(tps_f / (k_f + float(n_pos)))
    del tps_f, k_f, dtp, dfp, tps

    # AUPRO: normal pixels are the negatives, so FPR = fps / n_neg; the curve starts at (0, 0)
    # and has one point per threshold. Only the points up to the limit (and one beyond, to
    # interpolate) are needed, so PRO is accumulated over that prefix of pixels only.
    aupro_t = None
    if gt.pro_increment is not None:
        t = _max_count_within(fpr_limit, n_neg)
        k = 1 + int(torch.searchsorted(fps, fps.new_full((1,), t), right=True).item())
        n_pts = fps.numel() + 1
        m = min(k, n_pts - 1)  # thresholds needed: ends[:m]
        ends_m = ends[:m]
        stop = int(ends_m[-1].item()) + 1
        pro = torch.cumsum(gt.pro_increment.index_select(0, order[:stop]), 0).index_select(0, ends_m)
        # Rounding can overshoot 1 by an ulp; the curve is a fraction.
        pro = torch.cat((pro.new_zeros(1), pro)).clamp_(0.0, 1.0)
        x = torch.cat((pro.new_zeros(1), fps[:m].to(torch.float64) / float(n_neg)))
        area = torch.sum(0.5 * (pro[1:k] + pro[: k - 1]) * torch.diff(x[:k]))
        if k < n_pts:  # interpolate the segment that crosses the limit
            x0, x1, y0, y1 = x[k - 1], x[k], pro[k - 1], pro[k]
            y_at = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            part = 0.5 * (y0 + y_at) * (fpr_limit - x0)
            area = area + torch.where(x0 < fpr_limit, part, torch.zeros_like(part))
        aupro_t = area / fpr_limit

    parts = [twice_area.to(torch.float64), ap, f1max]
    if aupro_t is not None:
        parts.append(aupro_t)
    vals = torch.stack(parts).cpu().tolist()  # one device-to-host copy
    return {
        "pixel_auroc": vals[0] / (2.0 * n_pos * n_neg),
        "pixel_ap": vals[1],
        "pixel_f1max": vals[2],
        "aupro": vals[3] if aupro_t is not None else _NAN,
    }


def _max_count_within(fpr_limit: float, n_neg: int) -> int:
    """Largest integer c with float64(c / n_neg) <= fpr_limit, as the numpy path rounds it."""
    # Python's int / int is correctly rounded like numpy's float64(c) / float64(n), and
    # rounding is monotone, so the counts within the limit are exactly 0..c.
    c = int(math.floor(fpr_limit * n_neg))
    while (c + 1) / n_neg <= fpr_limit:
        c += 1
    while c >= 0 and c / n_neg > fpr_limit:
        c -= 1
    return c


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
