"""Task-agnostic inference: each test image picks the stored task whose keys its frozen patch
features are closest to (mean over patches of the distance to the nearest key)."""
from __future__ import annotations

import torch

from ucad.nearest_neighbor import NearestNeighbourScorer


def key_distances(frozen_features: torch.Tensor, keys: torch.Tensor, nearest: NearestNeighbourScorer) -> torch.Tensor:
    """(N, P, D) frozen features of N images, (K, D) keys of one task -> (N,) mean nearest-key distance.

    `nearest` must be a k=1 scorer: a key set is matched by each patch's single closest key."""
    n, p, d = frozen_features.shape
    return nearest.distances(frozen_features.reshape(n * p, d), keys).reshape(n, p).mean(dim=1)


def route(distances_per_task: torch.Tensor) -> torch.Tensor:
    """(N, T) key distances -> (N,) chosen task index per image."""
    return torch.argmin(distances_per_task, dim=1)
