"""Anomaly-detection metrics and continual-learning summaries.

Every curve metric sorts the scores once (descending) and reads cumulative sums at the last index of each run of
tied scores, so a threshold never splits a tie: this reproduces sklearn's roc_auc_score / average_precision_score
and the official MVTec AD AUPRO code, while staying fast on millions of pixels. Image metrics run in numpy; pixel
metrics in torch on the test set's device, from a PixelGroundTruth built once per test set (scored many times)."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")
_NAN = float("nan")


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
    ends = np.append(np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s_sorted.size - 1)
    return order, ends


def _binary_from_sorted(y_sorted: np.ndarray, ends: np.ndarray):
    """(auroc, ap, f1max) from labels in descending-score order."""
    tps = np.cumsum(y_sorted, dtype=np.int64)[ends]
    fps = (ends + 1) - tps
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    if n_pos == 0 or n_neg == 0:
        return _NAN, _NAN, _NAN
    # The ROC curve starts at (0, 0); its trapezoids on integer counts are exact up to the final division.
    auroc = float(np.trapezoid(np.append(0, tps), np.append(0, fps)) / (n_pos * n_neg))
    # sklearn's AP: sum over distinct thresholds of (recall step) * precision, no interpolation.
    precision, recall = tps / (ends + 1.0), tps / float(n_pos)
    ap = float(np.sum(np.diff(recall, prepend=0.0) * precision))
    f1 = np.divide(2.0 * precision * recall, precision + recall, out=np.zeros_like(precision), where=tps > 0)
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


def one_class_note(normal_images: int, anomalous_images: int, defect_pixels: int | None = None) -> str:
    """Why metrics of a test set are left empty (nan), or '' when every one can be computed. Without
    `defect_pixels`, every anomalous image is taken to have defect pixels in its mask."""
    if anomalous_images == 0:
        return ("its test set has no anomalous image, so no image or pixel metric can be computed (they need normal "
                "and anomalous test images)")
    notes = [] if normal_images else ["its test set has no normal image, so image AUROC, AP and F1-max cannot be "
                                      "computed (they need normal and anomalous test images)"]
    if defect_pixels == 0:
        notes.append("its masks hold no defect pixel, so no pixel metric can be computed")
    return "; ".join(notes)


def roc_auc(labels, scores) -> float:
    return binary_metrics(labels, scores)[0]


def average_precision(labels, scores) -> float:
    return binary_metrics(labels, scores)[1]


def precision_recall_f1(labels, predicted) -> tuple[float, float, float]:
    """Precision, recall and F1 of binary decisions (numpy or torch, any shape, any device). Flagging nothing has
    precision 0 (sklearn's zero_division=0); all three are nan without positives, since recall is then undefined."""
    labels = torch.as_tensor(labels).reshape(-1) != 0
    predicted = torch.as_tensor(predicted, device=labels.device).reshape(-1) != 0
    if labels.shape != predicted.shape:
        raise ValueError(f"labels ({labels.numel()}) and decisions ({predicted.numel()}) differ in size")
    positives = int(labels.sum())
    if positives == 0:
        return _NAN, _NAN, _NAN
    true_positives, flagged = int((labels & predicted).sum()), int(predicted.sum())
    precision = true_positives / flagged if flagged else 0.0
    return precision, true_positives / positives, 2.0 * true_positives / (flagged + positives)


def _stack_shape(shape) -> tuple:
    """The (N, H, W) shape of an (H, W), (N, H, W) or (N, 1, H, W) stack."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 2:
        return (1,) + shape
    if len(shape) == 4 and shape[1] == 1:
        return (shape[0],) + shape[2:]
    return shape


def _binary_masks(masks) -> np.ndarray:
    """The (N, H, W) bool stack of defect pixels: > 0.5, so that bool, {0, 1} and {0, 255} masks agree."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().float()  # also for bfloat16, which numpy lacks
    masks = np.asarray(masks)
    shape = _stack_shape(masks.shape)
    if len(shape) != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {masks.shape}")
    return masks.reshape(shape) > 0.5


def _pro_weights(gt: np.ndarray):
    """Per-pixel PRO increments (flat float64, or None without regions) and the region count of an
    (N, H, W) bool stack: 1 / (area * region count) on each region's pixels, 0 on normal ones."""
    # 3x3 connectivity within each image, none across images: one label() call for the stack.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labeled, n_regions = ndimage.label(gt, structure=structure)
    if n_regions == 0:
        return None, 0
    labeled = labeled.ravel()
    increment = np.concatenate(([0.0], 1.0 / (np.bincount(labeled)[1:] * float(n_regions))))
    return increment[labeled], n_regions


def _check_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return fpr_limit


def compute_task_metrics(image_labels, image_scores, masks, anomaly_maps, fpr_limit: float,
                         ground_truth: PixelGroundTruth | None = None) -> dict:
    """Image and pixel metrics of one task; the pixel ones are nan without maps or without ground truth, which is
    `ground_truth` (`masks` may then be None) or else is built from `masks` on the CPU."""
    out = dict(zip(IMAGE_KEYS, binary_metrics(image_labels, image_scores)))
    out.update(dict.fromkeys(PIXEL_KEYS, _NAN))
    if anomaly_maps is None or (ground_truth is None and masks is None):
        return out
    if ground_truth is None:
        ground_truth = PixelGroundTruth(masks)
    elif masks is not None and _stack_shape(np.shape(masks)) != ground_truth.shape:
        raise ValueError(f"masks {tuple(np.shape(masks))} do not match the ground truth {ground_truth.shape}")
    out.update(pixel_metrics_torch(ground_truth, anomaly_maps, fpr_limit))
    return out


class PixelGroundTruth:
    """What the pixel metrics of a test set need from its (N, H, W), (H, W) or (N, 1, H, W) masks, on `device`:
    the flattened bool `labels` and the `pro_increment` of the 8-connected defect regions of each image."""

    def __init__(self, masks, device="cpu"):
        self.device = torch.device(device)
        gt = _binary_masks(masks)
        self.shape = tuple(gt.shape)
        self.num_defect = int(np.count_nonzero(gt))
        self.num_normal = int(gt.size) - self.num_defect
        pro_increment, self.num_regions = _pro_weights(gt)
        self.labels = torch.as_tensor(gt.ravel(), device=self.device)
        self.pro_increment = None if pro_increment is None else torch.as_tensor(pro_increment, device=self.device)


def pixel_metrics_torch(ground_truth: PixelGroundTruth, anomaly_maps, fpr_limit: float) -> dict:
    """Pixel AUROC, AP, F1-max and AUPRO of `anomaly_maps` (numpy, or torch of any real dtype on any device) on the
    ground truth's device, accumulated in float64 / int64; all nan when only one class of pixel is present."""
    fpr_limit = _check_limit(fpr_limit)
    gt = ground_truth
    if not isinstance(anomaly_maps, torch.Tensor):
        anomaly_maps = np.ascontiguousarray(anomaly_maps)  # torch takes no negative strides
    maps = torch.as_tensor(anomaly_maps, device=gt.device).detach()
    if maps.is_complex():
        raise ValueError(f"scores must be real, got dtype {maps.dtype}")
    if maps.dtype in (torch.float16, torch.bfloat16):
        maps = maps.float()  # exact, so ties are the same as in half precision
    elif maps.dtype == torch.bool:
        maps = maps.to(torch.uint8)
    if _stack_shape(maps.shape) != gt.shape:
        raise ValueError(f"anomaly_maps {tuple(maps.shape)} and masks {gt.shape} differ in shape")
    scores = maps.reshape(-1)
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")
    n_pos, n_neg = gt.num_defect, gt.num_normal
    if n_pos == 0 or n_neg == 0:
        return dict.fromkeys(PIXEL_KEYS, _NAN)

    # Order inside a tie does not matter: only cumulative sums at tie ends are read.
    s_sorted, order = torch.sort(scores, descending=True)
    ends = torch.unique_consecutive(s_sorted, return_counts=True)[1].cumsum(0) - 1
    del s_sorted  # millions of scores: freed before the cumulative sums
    # Counts at each distinct threshold (int64, exact): predicted positives k, TP, FP and their steps.
    k_pred = ends + 1
    # index_select: the same gather as [idx], several times faster on CPU.
    tps = torch.cumsum(gt.labels.index_select(0, order), 0, dtype=torch.int64).index_select(0, ends)
    fps = k_pred - tps
    dtp = torch.diff(tps, prepend=tps.new_zeros(1))
    # ROC trapezoids from (0, 0): dfp * (tp_prev + tp) = dfp * (2 tp - dtp), summed exactly.
    twice_area = torch.sum(torch.diff(fps, prepend=fps.new_zeros(1)) * (2 * tps - dtp))
    # sklearn's AP: sum of (recall step) * precision = sum(dtp * tp / k) / n_pos; F1 = 2 tp / (k + n_pos).
    tps_f, k_f = tps.to(torch.float64), k_pred.to(torch.float64)
    ap = torch.sum(dtp.to(torch.float64) * tps_f / k_f) / float(n_pos)
    f1max = 2.0 * torch.max(tps_f / (k_f + float(n_pos)))
    del tps_f, k_f, dtp, tps  # freed before the AUPRO's own buffers of the same size
    parts = [twice_area.to(torch.float64), ap, f1max]
    if gt.pro_increment is not None:
        parts.append(_aupro(gt.pro_increment, order, ends, fps, n_neg, fpr_limit))
    twice_auroc, ap, f1max, *aupro = torch.stack(parts).cpu().tolist()  # one device-to-host copy
    return {"pixel_auroc": twice_auroc / (2.0 * n_pos * n_neg), "pixel_ap": ap, "pixel_f1max": f1max,
            "aupro": aupro[0] if aupro else _NAN}


def _aupro(pro_increment, order, ends, fps, n_neg: int, fpr_limit: float) -> torch.Tensor:
    """Normalised area under the PRO curve up to the FPR limit, a 0-d float64 tensor. Normal pixels are the
    negatives (FPR = fps / n_neg); the curve starts at (0, 0), one point per threshold. Only the points up to the
    limit (and one beyond, to interpolate) are needed, so PRO is accumulated over that prefix of pixels only."""
    fpr = fps.to(torch.float64) / float(n_neg)
    k = 1 + int(torch.searchsorted(fpr, fpr_limit, right=True))  # curve points within the limit, (0, 0) included
    ends_m = ends[:min(k, fpr.numel())]  # the thresholds needed
    pro = torch.cumsum(pro_increment.index_select(0, order[:int(ends_m[-1]) + 1]), 0).index_select(0, ends_m)
    pro = torch.cat((pro.new_zeros(1), pro)).clamp_(0.0, 1.0)  # rounding can overshoot 1 by an ulp
    x = torch.cat((fpr.new_zeros(1), fpr[:ends_m.numel()]))
    area = torch.sum(0.5 * (pro[1:k] + pro[: k - 1]) * torch.diff(x[:k]))
    if k <= fpr.numel():  # interpolate the segment that crosses the limit
        x0, x1, y0, y1 = x[k - 1], x[k], pro[k - 1], pro[k]
        y_at = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        part = 0.5 * (y0 + y_at) * (fpr_limit - x0)
        area = area + torch.where(x0 < fpr_limit, part, torch.zeros_like(part))
    return area / fpr_limit


def _as_matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be a non-empty T x T array, got shape {R.shape}")
    return R


def _mean_of_known(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else _NAN


def final_average(R) -> float:
    """Mean over tasks of the last row of the accuracy matrix (nan entries ignored)."""
    return _mean_of_known(_as_matrix(R)[-1])


def forgetting_measure(R) -> float:
    """Mean over j < T-1 of (best R[l][j] for l in [j, T-2]) - R[T-1][j]; nan when T == 1."""
    R = _as_matrix(R)
    if R.shape[0] == 1:
        return _NAN
    # Only rows l in [j, T-2] count for task j, whatever the caller stored above the diagonal; fmax skips nan.
    earlier = np.where(np.tril(np.ones((R.shape[0] - 1,) * 2, dtype=bool)), R[:-1, :-1], np.nan)
    return _mean_of_known(np.fmax.reduce(earlier, axis=0) - R[-1, :-1])
