"""k-nearest-neighbour distances from query patches to a memory bank: faiss (CPU or GPU) or torch.

Distances are Euclidean (not squared); with k > 1 the score is the mean of the k distances, as
PatchCore's scorer does. Both back ends give the same numbers to float tolerance.
"""
from __future__ import annotations

import numpy as np
import torch

from ucad.errors import UcadError

BACKENDS = ("auto", "faiss", "torch")


def faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class NearestNeighbourScorer:
    def __init__(self, k: int = 1, backend: str = "auto", device: torch.device | str = "cpu",
                 faiss_on_gpu: bool = False, faiss_num_workers: int = 4, chunk_size: int = 8192):
        if k < 1:
            raise UcadError(f"--anomaly_scorer_num_nn must be at least 1, got {k}")
        if backend not in BACKENDS:
            raise UcadError(f"unknown nearest-neighbour backend '{backend}': choose {', '.join(BACKENDS)}")
        self.device = torch.device(device)
        if backend == "auto":
            # on a GPU the features are already there and torch's matmul beats a host round trip
            backend = "faiss" if (self.device.type == "cpu" or (faiss_on_gpu and faiss_has_gpu())) else "torch"
        if backend == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError:
                raise UcadError("faiss is not installed: pip install faiss-cpu (or faiss-gpu), "
                                "or choose --nn_backend torch") from None
        self.k = k
        self.backend = backend
        self.faiss_on_gpu = faiss_on_gpu and faiss_has_gpu()
        self.faiss_num_workers = faiss_num_workers
        self.chunk_size = chunk_size

    def describe(self) -> str:
        if self.backend == "faiss":
            return f"faiss ({'GPU' if self.faiss_on_gpu else 'CPU'}), k={self.k}"
        return f"torch on {self.device}, k={self.k}"

    def distances(self, queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """(Q, D) queries, (M, D) bank -> (Q,) mean distance to the k nearest bank rows."""
        k = min(self.k, bank.shape[0])
        if self.backend == "faiss":
            return self._faiss(queries, bank, k).to(queries.device)
        bank = bank.to(queries.device, torch.float32)
        bank_sq = (bank * bank).sum(dim=1)
        parts = []
        for start in range(0, queries.shape[0], self.chunk_size):
            chunk = queries[start:start + self.chunk_size].float()
            squared = (chunk * chunk).sum(dim=1, keepdim=True) - 2.0 * chunk @ bank.T + bank_sq[None]
            nearest = torch.topk(squared, k, dim=1, largest=False).indices
            # the expansion above only ranks; distances of the k winners are recomputed directly, because it
            # cancels catastrophically for near-identical vectors (a noise floor of sqrt(eps) * |x|)
            exact = torch.linalg.vector_norm(chunk[:, None, :] - bank[nearest], dim=2)
            parts.append(exact.mean(dim=1))
        return torch.cat(parts)

    def _faiss(self, queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
        import faiss

        faiss.omp_set_num_threads(max(1, self.faiss_num_workers))
        bank_np = np.ascontiguousarray(bank.detach().float().cpu().numpy())
        index = faiss.IndexFlatL2(bank_np.shape[1])
        if self.faiss_on_gpu:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(bank_np)
        query_np = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        squared, _ = index.search(query_np, k)
        return torch.from_numpy(np.sqrt(np.maximum(squared, 0.0)).mean(axis=1))
