"""Keys: the few frozen patch features per task that test images are routed by.

Routing compares, per task, the mean over an image's patches of the distance to the nearest key, so keys must
cover the *typical* patches of a task. Greedy k-center coresets (the released code's choice) pick the most
outlying patches instead: on look-alike products that shifts the mean distance of normal patches and routes
images to the wrong task. k-means centroids (or plain random patches) cover the bulk of the distribution."""
from __future__ import annotations

import torch

from ucad.model.coreset import CoresetSampler
from ucad.model.knowledge import PackedKnowledge, pack_knowledge, vectors_in_budget
from ucad.runtime.errors import UcadError

KMEANS_ITERATIONS = 25


def select_keys(features: torch.Tensor, size: int, sampler: str, seed: int) -> torch.Tensor:
    """(N, D) frozen patch features of a task's training images -> (min(size, N), D) keys on the same device."""
    n = features.shape[0]
    if size >= n:
        return features.float().clone()
    if sampler == "random":
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
        return features[chosen.to(features.device)].float()
    if sampler != "kmeans":
        return CoresetSampler(sampler, seed=seed).subsample(features, size).float()
    try:
        import faiss
    except ImportError:
        raise UcadError("--key_sampler kmeans needs faiss (pip install faiss-cpu); or choose --key_sampler random") \
            from None
    data = features.detach().float().cpu().contiguous().numpy()
    # faiss subsamples to max_points_per_centroid * k points by default; keep every patch so the result does not
    # depend on that cap, and seed it so runs repeat. min_points_per_centroid only decides when faiss warns that
    # there are few points per centroid, which is the normal case for thousands of keys on one task's patches
    kmeans = faiss.Kmeans(data.shape[1], size, niter=KMEANS_ITERATIONS, seed=seed, verbose=False,
                          max_points_per_centroid=max(256, data.shape[0] // size + 1), min_points_per_centroid=1)
    kmeans.train(data)
    return torch.from_numpy(kmeans.centroids.copy()).to(features.device)


def task_keys(features: torch.Tensor, size: int, sampler: str, storage: str,
              seed: int) -> tuple[torch.Tensor, PackedKnowledge | None]:
    """A task's keys from its (N, D) frozen training patches, as routing uses them, and how --key_storage stores them
    (None: as they are, fp32). Routing and its statistics use exactly the keys a saved model will decode. `size` 0:
    as many as `storage` keeps in the paper's bytes."""
    keys = select_keys(features, size or vectors_in_budget(storage, features.shape[1]), sampler, seed=seed)
    packed = None if storage == "fp32" else pack_knowledge(keys, storage, features, seed, option="--key_storage")
    return (keys, None) if packed is None else (packed.decode(), packed)
