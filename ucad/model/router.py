"""Task-agnostic inference: each test image picks the stored task whose keys its frozen patch features are closest
to (mean over patches of the distance to the nearest key: `--routing mean`, the released rule).

Distances of different tasks are not on one scale, though: a task whose normal patches are spread wide attracts
every image that is far from everything. `calibrated` divides each task's distance by its mean on the task's own
normal images; `gaussian` compares the diagonal Mahalanobis distance of the image's mean frozen feature to a
Gaussian of the task's normal images, calibrated alike; `calibrated_gaussian` averages the two. Each keeps a few
numbers per task, fixed once the task is learned (`UcadModel.routing_statistics`)."""
from __future__ import annotations

import torch

from ucad.runtime.errors import UcadError
from ucad.model.nearest_neighbor import exact_distances, ranking

# keeps the Gaussian's variances away from zero, relative to their mean (a constant feature would divide by zero)
VARIANCE_FLOOR = 1e-6

# elements of the largest temporary (patches x keys, or patches x tasks x dim) made per block: 128 MiB in fp32
BLOCK_ELEMENTS = 1 << 25


def route(distances_per_task: torch.Tensor) -> torch.Tensor:
    """(N, T) key distances -> (N,) chosen task index per image."""
    return torch.argmin(distances_per_task, dim=1)


def routing_statistics(frozen: torch.Tensor, keys: torch.Tensor, routing: str,
                       patch_distance: str = "squared") -> dict[str, torch.Tensor]:
    """What `routing` needs of a task beyond its keys, from (N, P, D) frozen features of its normal images."""
    statistics = {}
    if routing in ("calibrated", "calibrated_gaussian"):
        distances = TaskKeyIndex([keys], patch_distance, frozen.device).distances(frozen)[:, 0]
        statistics["key_distance_scale"] = distances.mean().clamp_min(1e-12)
    if routing in ("gaussian", "calibrated_gaussian"):
        pooled = frozen.float().mean(dim=1)
        mean, variance = pooled.mean(dim=0), pooled.var(dim=0, unbiased=False)
        variance = variance + VARIANCE_FLOOR * variance.mean().clamp_min(1e-12)
        statistics.update(image_mean=mean, image_variance=variance)
        statistics["image_distance_scale"] = _mahalanobis(pooled, mean, variance).mean().clamp_min(1e-12)
    return statistics


def routing_scores(key_distances: torch.Tensor, frozen: torch.Tensor, statistics: dict[str, torch.Tensor],
                   routing: str) -> torch.Tensor:
    """(N,) what routing compares for one task: its mean nearest-key distances `key_distances`, or their calibrated
    or image-level counterparts (lower = more likely this task). `frozen`: the images' (N, P, D) frozen features."""
    if routing == "mean":
        return key_distances
    scores = []
    if routing in ("calibrated", "calibrated_gaussian"):
        scores.append(key_distances / statistics["key_distance_scale"].to(key_distances.device))
    if routing in ("gaussian", "calibrated_gaussian"):
        mean, variance = statistics["image_mean"].to(frozen.device), statistics["image_variance"].to(frozen.device)
        image = _mahalanobis(frozen.float().mean(dim=1), mean, variance) / statistics["image_distance_scale"]
        scores.append(image.to(key_distances.device))
    return sum(scores) / len(scores)


def task_distances(index: TaskKeyIndex, frozen: torch.Tensor, statistics: list[dict[str, torch.Tensor]],
                   routing: str) -> torch.Tensor:
    """(N, T) what routing compares (`route` picks the smallest) for each task of `index`, whose statistics are
    `statistics` in the same order, from the images' (N, P, D) frozen features."""
    distances = index.distances(frozen).unbind(1)
    return torch.stack([routing_scores(d, frozen, task, routing) for d, task in zip(distances, statistics)], dim=1)


def _mahalanobis(pooled: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """(N, D) image descriptors -> (N,) mean squared standardised distance to a diagonal Gaussian."""
    return ((pooled - mean) ** 2 / variance).mean(dim=1)


def routing_margin(distances_per_task: torch.Tensor) -> torch.Tensor:
    """(N, T) key distances -> (N,) relative margin (second best - best) / best: how clearly an image was routed.
    With a single task there is no rival: +inf."""
    if distances_per_task.shape[1] < 2:
        return torch.full((distances_per_task.shape[0],), float("inf"))
    best_two = torch.topk(distances_per_task, 2, dim=1, largest=False).values
    return (best_two[:, 1] - best_two[:, 0]) / best_two[:, 0].clamp_min(1e-12)


def route_trust_threshold(held_out_margins: list[torch.Tensor], quantile: float) -> float | None:
    """The smallest margin a trusted route has: `quantile` of the routing margins of held-out normal images of the
    tasks (each measured against the tasks learned up to its own, so later rivals can only make real margins
    smaller: the threshold errs towards flagging). None where no task has a finite held-out margin to go by."""
    margins = torch.cat([m.flatten().float().cpu() for m in held_out_margins]) if held_out_margins else torch.empty(0)
    margins = margins[torch.isfinite(margins)]
    return float(torch.quantile(margins, quantile)) if margins.numel() else None


class TaskKeyIndex:
    """The keys of every task in one matrix: one product per block of patches (`ranking`), a minimum within each
    task's segment of keys, then that key's distance computed exactly, as the knowledge scorer does. With hundreds
    of tasks this replaces hundreds of small searches by one large product."""

    def __init__(self, key_sets: list[torch.Tensor], patch_distance: str = "squared",
                 device: torch.device | str | None = None, block_elements: int = BLOCK_ELEMENTS):
        if not key_sets:
            raise UcadError("routing needs at least one learned task; the model holds none")
        device = torch.device(device) if device is not None else key_sets[0].device
        sizes = [int(keys.shape[0]) for keys in key_sets]
        if min(sizes) < 1:
            raise UcadError("a stored task has no keys: the model file is damaged; learn the task again")
        self.keys = torch.cat([keys.to(device, torch.float32) for keys in key_sets])
        self.keys_squared = (self.keys * self.keys).sum(dim=1)
        self.squared, self.block_elements = patch_distance == "squared", block_elements
        # (T, largest) key rows per task; shorter tasks are padded with a column that always loses (+inf)
        starts, offsets = torch.tensor([0] + sizes[:-1]).cumsum(0), torch.arange(max(sizes))
        padded = torch.where(offsets < torch.tensor(sizes)[:, None], starts[:, None] + offsets, self.keys.shape[0])
        self.padded_rows = padded.to(device)
        self.uniform = len(set(sizes)) == 1  # the common case: a plain reshape finds each task's segment

    def patch_distances(self, patches: torch.Tensor) -> torch.Tensor:
        """(Q, D) patch features -> (Q, T) distance of each patch to its nearest key within each task."""
        keys_total, dim = self.keys.shape
        tasks, largest = self.padded_rows.shape
        rows = max(1, self.block_elements // max(keys_total + 1, tasks * largest, tasks * dim))
        parts = []
        for start in range(0, patches.shape[0], rows):
            chunk = patches[start:start + rows].to(self.keys.device, torch.float32)
            ranked = ranking(chunk, self.keys, self.keys_squared)
            if not self.uniform:
                losing = torch.full((ranked.shape[0], 1), float("inf"), device=ranked.device)
                ranked = torch.cat([ranked, losing], dim=1)[:, self.padded_rows.flatten()]
            local = ranked.view(-1, tasks, largest).argmin(dim=2)
            winners = self.padded_rows.gather(1, local.T).T  # (Q, T) global key row of each task's nearest key
            parts.append(exact_distances(chunk, self.keys, winners, self.squared))
        return torch.cat(parts)

    def distances(self, frozen_features: torch.Tensor) -> torch.Tensor:
        """(N, P, D) frozen features of N images -> (N, T) mean nearest-key distance per task."""
        per_patch = self.patch_distances(frozen_features.flatten(0, 1)).unflatten(0, frozen_features.shape[:2])
        # the mean over each image's patches, reduced along a contiguous axis
        return per_patch.transpose(1, 2).contiguous().mean(dim=2)
