"""Where "normal" ends, per task: an image and a pixel threshold, each a high quantile (--threshold_quantile) of the
scores of the task's held-out normal training images (dataset --train_val_split) under the task's own prompt and
knowledge, right after the task is learned. Test labels never take part, so the F1 / precision / recall at these
thresholds are what a user would see on the line; the F1-max beside them picks its threshold on the test labels and
is only an upper bound."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ucad.model.anomaly_map import image_scores
from ucad.model.scoring import BANKS
from ucad.results.metrics import precision_recall_f1


@dataclass(frozen=True)
class Threshold:
    image: float  # an image whose score exceeds this is anomalous
    pixel: float  # a pixel whose anomaly-map value exceeds this is anomalous
    quantile: float
    images: int  # held-out normal images it was computed from

    @classmethod
    def from_dict(cls, values: dict) -> "Threshold":
        return cls(float(values["image"]), float(values["pixel"]), float(values["quantile"]), int(values["images"]))


@torch.no_grad()
def calibrate(model, task: int, normal_images: torch.Tensor, quantile: float, batch_size: int) -> dict[str, Threshold]:
    """Thresholds of `task` (for each of its knowledge banks) from (N,3,S,S) uint8 held-out normal images of it."""
    patch_scores = model.score_patches(normal_images, task, BANKS, batch_size=batch_size)
    return {bank: Threshold(float(np.quantile(image_scores(scores).numpy(), quantile)),
                            float(np.quantile(model.anomaly_maps(scores).cpu().numpy(), quantile)), quantile,
                            int(scores.shape[0]))
            for bank, scores in patch_scores.items()}


def per_image(tasks, routes: torch.Tensor, bank: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(N,) image and pixel thresholds of each image's routed task; None when a routed task has none."""
    chosen = [tasks[int(t)].thresholds.get(bank) for t in routes.tolist()]
    if not chosen or any(t is None for t in chosen):
        return None
    return (torch.tensor([t.image for t in chosen], dtype=torch.float32),
            torch.tensor([t.pixel for t in chosen], dtype=torch.float32))


def metrics_at_threshold(labels: np.ndarray, scores: torch.Tensor, maps: torch.Tensor, pixel_labels,
                         thresholds: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """Image and pixel precision / recall / F1 of the decisions 'score > threshold of the routed task'; maps (N,S,S)
    and pixel_labels (N*S*S,) bool on the same device; nan everywhere without thresholds."""
    if thresholds is None:
        image = pixel = (float("nan"),) * 3
    else:
        image_threshold, pixel_threshold = thresholds
        image = precision_recall_f1(labels, scores.cpu() > image_threshold)
        pixel = precision_recall_f1(pixel_labels, maps > pixel_threshold.to(maps.device)[:, None, None])
    return {f"{level}_{name}_at_threshold": value
            for level, (precision, recall, f1) in (("image", image), ("pixel", pixel))
            for name, value in (("f1", f1), ("precision", precision), ("recall", recall))}
