"""Task-agnostic inference: each test image picks the stored task whose keys its frozen patch
features are closest to (mean over patches of the distance to the nearest key).

`TaskKeyIndex` routes against every task at once: all keys in one matrix with the task each key belongs
to, one matrix product per block of patches and a minimum within each task's segment of keys. It gives
the numbers of the per-task loop (`key_distances` with a torch k=1 scorer, kept as the reference): the
same ranking formula and the same exact recomputation of each winner's distance. With hundreds of tasks
this replaces hundreds of small searches (and Python round trips) by one large product.
"""
from __future__ import annotations

import torch

from ucad.errors import UcadError
from ucad.nearest_neighbor import PATCH_DISTANCES, NearestNeighbourScorer

# elements of the largest temporary (patches x keys, or patches x tasks x dim) made per block: 128 MiB in fp32
BLOCK_ELEMENTS = 1 << 25


def key_distances(frozen_features: torch.Tensor, keys: torch.Tensor, nearest: NearestNeighbourScorer) -> torch.Tensor:
    """(N, P, D) frozen features of N images, (K, D) keys of one task -> (N,) mean nearest-key distance.

    `nearest` must be a k=1 scorer: a key set is matched by each patch's single closest key."""
    n, p, d = frozen_features.shape
    return nearest.distances(frozen_features.reshape(n * p, d), keys).reshape(n, p).mean(dim=1)


def route(distances_per_task: torch.Tensor) -> torch.Tensor:
    """(N, T) key distances -> (N,) chosen task index per image."""
    return torch.argmin(distances_per_task, dim=1)


class TaskKeyIndex:
    """The keys of several tasks, searched together: `distances` gives every image's mean nearest-key distance
    to each task in one pass."""

    def __init__(self, key_sets: list[torch.Tensor], patch_distance: str = "squared",
                 device: torch.device | str | None = None, block_elements: int = BLOCK_ELEMENTS):
        if not key_sets:
            raise UcadError("routing needs at least one learned task; the model holds none")
        if patch_distance not in PATCH_DISTANCES:
            raise UcadError(f"--patch_distance '{patch_distance}': choose {' or '.join(PATCH_DISTANCES)}")
        device = torch.device(device) if device is not None else key_sets[0].device
        sizes = [int(keys.shape[0]) for keys in key_sets]
        if min(sizes) < 1:
            raise UcadError("a stored task has no keys: the model file is damaged; learn the task again")
        self.keys = torch.cat([keys.to(device, torch.float32) for keys in key_sets])
        self.keys_squared = (self.keys * self.keys).sum(dim=1)
        self.squared = patch_distance == "squared"
        self.block_elements = block_elements
        self.task_count = len(key_sets)
        largest = max(sizes)
        # (T, largest) key rows per task; shorter tasks are padded with a column that always loses (+inf)
        starts = torch.tensor([0] + sizes[:-1]).cumsum(0)
        offsets = torch.arange(largest)[None].expand(self.task_count, largest)
        padded = starts[:, None] + offsets
        padded[offsets >= torch.tensor(sizes)[:, None]] = self.keys.shape[0]
        self.padded_rows = padded.to(device)
        self.uniform = len(set(sizes)) == 1  # the common case: a plain reshape finds each task's segment

    @classmethod
    def from_tasks(cls, tasks, patch_distance: str = "squared", device=None) -> "TaskKeyIndex":
        """From UcadModel.tasks (anything with a .keys (K, D) tensor)."""
        return cls([task.keys for task in tasks], patch_distance, device)

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size()

    def patch_distances(self, patches: torch.Tensor) -> torch.Tensor:
        """(Q, D) patch features -> (Q, T) distance of each patch to its nearest key within each task."""
        keys_total, dim = self.keys.shape
        tasks, largest = self.padded_rows.shape
        rows = max(1, self.block_elements // max(keys_total + 1, tasks * largest, tasks * dim))
        parts = []
        for start in range(0, patches.shape[0], rows):
            chunk = patches[start:start + rows].to(self.keys.device, torch.float32)
            # the ranking formula of NearestNeighbourScorer's torch path, against all tasks' keys at once
            ranking = (chunk * chunk).sum(dim=1, keepdim=True) - 2.0 * chunk @ self.keys.T + self.keys_squared[None]
            if self.uniform:
                local = ranking.view(-1, tasks, largest).argmin(dim=2)
            else:
                losing = torch.full((ranking.shape[0], 1), float("inf"), device=ranking.device)
                local = torch.cat([ranking, losing], dim=1)[:, self.padded_rows.flatten()].view(-1, tasks, largest)
                local = local.argmin(dim=2)
            winners = self.padded_rows.gather(1, local.T).T  # (Q, T) global key row of each task's nearest key
            # exact distance of each winner, computed as the per-task search does (the expansion above cancels
            # catastrophically for near-identical vectors)
            # (in place on the gathered keys: k - q squares to the same bits as q - k, one temporary fewer)
            difference = self.keys[winners].sub_(chunk[:, None, :])
            exact = difference.mul_(difference).sum(dim=2) if self.squared else torch.linalg.vector_norm(difference, dim=2)
            parts.append(exact)
        return torch.cat(parts)

    def distances(self, frozen_features: torch.Tensor) -> torch.Tensor:
        """(N, P, D) frozen features of N images -> (N, T) mean nearest-key distance per task."""
        n, p, d = frozen_features.shape
        per_patch = self.patch_distances(frozen_features.reshape(n * p, d))
        # the mean over each image's patches, reduced along a contiguous axis as the per-task loop reduces
        return per_patch.view(n, p, self.task_count).transpose(1, 2).contiguous().mean(dim=2)
