"""Memory-bank reduction: PatchCore's greedy k-center coreset (exact and approximate) and identity. The greedy
variants keep an (N,) vector of distances to the selected set, never an N x N matrix, so they run on large banks
and on the GPU when the features live there."""
from __future__ import annotations

import torch
from tqdm import tqdm


class CoresetSampler:
    """Selects rows of a feature matrix, either a fraction `percentage` or a fixed `size`."""

    projection_dim = 128  # of the approximate variant's random projection, as PatchCore
    starting_points = 10  # random starts of the approximate variant, as PatchCore

    def __init__(self, name: str = "approx_greedy_coreset", percentage: float = 0.1, seed: int = 0):
        self.name, self.percentage, self.seed = name, percentage, seed

    def select(self, features: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Indices of the selected rows; `size` overrides the percentage (UCAD's fixed memory sizes)."""
        n = features.shape[0]
        target = size if size is not None else max(1, int(n * self.percentage))
        if self.name == "identity" or target >= n:
            return torch.arange(n, device=features.device)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        work = features.float()
        dim = self.projection_dim
        if self.name == "approx_greedy_coreset" and work.shape[1] > dim:
            work = work @ (torch.randn(work.shape[1], dim, generator=generator) / dim ** 0.5).to(work.device)
        # rows as columns: point @ (D x N) runs ~3x faster on CPU BLAS than (N x D) @ point
        work_t = work.T.contiguous()
        squared_norms = (work * work).sum(dim=1)
        del work

        def squared_distances(index: int) -> torch.Tensor:
            return (squared_norms - 2.0 * (work_t[:, index] @ work_t) + squared_norms[index]).clamp_min(0)

        # min over squared distances selects the same points as over distances and saves a sqrt per step
        if self.name == "approx_greedy_coreset":
            starts = torch.randperm(n, generator=generator)[: min(self.starting_points, n)].tolist()
            # PatchCore's approximation: the mean distance to the random starts seeds the running minimum
            min_distances = torch.stack([squared_distances(s).sqrt() for s in starts], dim=1).mean(dim=1) ** 2
            selected = []
        else:
            start = int(torch.randint(n, (1,), generator=generator))
            min_distances = squared_distances(start)
            min_distances[start] = -1.0
            selected = [start]
        with tqdm(total=target, desc=f"{self.name} {n} -> {target}", leave=False, disable=target < 2000,
                  initial=len(selected)) as progress:
            while len(selected) < target:
                index = int(torch.argmax(min_distances))
                selected.append(index)
                min_distances = torch.minimum(min_distances, squared_distances(index))
                min_distances[index] = -1.0  # with duplicate rows every distance can reach 0: never pick a row twice
                progress.update()
        return torch.tensor(selected, device=features.device, dtype=torch.long)

    def subsample(self, features: torch.Tensor, size: int | None = None) -> torch.Tensor:
        return features[self.select(features, size)]
