"""k-nearest-neighbour distances from query patches to a memory bank: faiss (CPU or GPU) or torch.

Distances are squared L2 by default, as the released code's faiss `IndexFlatL2` returns them (its patch scores
are squared distances before upsampling and smoothing); `patch_distance="euclidean"` takes the square root.
With k > 1 the score is the mean of the k distances, as PatchCore's scorer does. Both back ends give the same
numbers to float tolerance. faiss on a GPU needs a faiss GPU build (`pip install .[gpu]`) and `--faiss_on_gpu`."""
from __future__ import annotations

import functools

import numpy as np
import torch

from ucad.runtime.errors import UcadError


def faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@functools.cache
def faiss_gpu_resources():
    """The process's one faiss StandardGpuResources: it reserves scratch memory on every GPU it is used on and
    creates streams and handles, so making one per search costs far more than the search."""
    import faiss

    return faiss.StandardGpuResources()


def ranking(queries: torch.Tensor, bank: torch.Tensor, bank_squared: torch.Tensor) -> torch.Tensor:
    """(Q, D) queries, (M, D) bank and its squared norms -> (Q, M) squared distances by the expansion
    |q|^2 - 2 q.b + |b|^2: one matrix product, good for ranking but not for the distances themselves."""
    return (queries * queries).sum(dim=1, keepdim=True) - 2.0 * queries @ bank.T + bank_squared[None]


def exact_distances(queries: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor, squared: bool) -> torch.Tensor:
    """(Q, D) queries and (Q, k) bank rows chosen for them -> (Q, k) distances computed directly. The expansion in
    `ranking` cancels catastrophically for near-identical vectors (a noise floor of sqrt(eps) * |x|), which would
    give normal patches spurious scores."""
    difference = bank[rows].sub_(queries[:, None, :])
    return difference.mul_(difference).sum(dim=2) if squared else torch.linalg.vector_norm(difference, dim=2)


class NearestNeighbourScorer:
    def __init__(self, k: int = 1, backend: str = "auto", device: torch.device | str = "cpu",
                 faiss_on_gpu: bool = False, faiss_num_workers: int | None = None, chunk_size: int = 8192,
                 patch_distance: str = "squared"):
        self.device = torch.device(device)
        # the faiss GPU index goes on the run's device: never on a GPU when the run is on the CPU
        self.faiss_on_gpu = faiss_on_gpu and self.device.type == "cuda" and faiss_has_gpu()
        if backend == "auto":
            # on a GPU the features are already there and torch's matmul beats a host round trip
            backend = "faiss" if (self.device.type == "cpu" or self.faiss_on_gpu) else "torch"
        if backend == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError:
                raise UcadError("faiss is not installed: pip install faiss-cpu (or faiss-gpu), "
                                "or choose --nn_backend torch") from None
        self.k, self.backend, self.chunk_size = k, backend, chunk_size
        self.faiss_num_workers, self.patch_distance = faiss_num_workers, patch_distance
        self.squared = patch_distance == "squared"

    def describe(self) -> str:
        where = f"GPU {self.gpu_index}" if self.faiss_on_gpu else "CPU"
        engine = f"faiss ({where})" if self.backend == "faiss" else f"torch on {self.device}"
        return f"{engine}, k={self.k}, {self.patch_distance} L2"

    @property
    def gpu_index(self) -> int:
        """CUDA ordinal of the run's GPU; faiss counts the devices CUDA_VISIBLE_DEVICES shows, as torch does."""
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def distances(self, queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """(Q, D) queries, (M, D) bank -> (Q,) mean (squared or plain) L2 distance to the k nearest bank rows."""
        k = min(self.k, bank.shape[0])
        if self.backend == "faiss":
            return self._faiss(queries, bank, k).to(queries.device)
        bank = bank.to(queries.device, torch.float32)
        bank_squared = (bank * bank).sum(dim=1)
        parts = []
        for start in range(0, queries.shape[0], self.chunk_size):
            chunk = queries[start:start + self.chunk_size].float()
            nearest = torch.topk(ranking(chunk, bank, bank_squared), k, dim=1, largest=False).indices
            parts.append(exact_distances(chunk, bank, nearest, self.squared).mean(dim=1))
        return torch.cat(parts)

    def _faiss(self, queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
        import faiss

        # faiss's thread count is OpenMP's, which torch shares: without restoring it, --faiss_num_workers 8 would
        # silently run every later torch op with 8 threads (oversubscribing a small machine, and changing the
        # rounding of features, so a run and a later ucad.predict of the same images would differ in the last bits)
        torch_threads = torch.get_num_threads()
        if self.faiss_num_workers is not None:
            faiss.omp_set_num_threads(max(1, self.faiss_num_workers))
        try:
            index = faiss.IndexFlatL2(bank.shape[1])
            if self.faiss_on_gpu:
                index = faiss.index_cpu_to_gpu(faiss_gpu_resources(), self.gpu_index, index)
            index.add(np.ascontiguousarray(bank.detach().float().cpu().numpy()))
            squared, _ = index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
        finally:
            torch.set_num_threads(torch_threads)
        squared = np.maximum(squared, 0.0)
        return torch.from_numpy((squared if self.squared else np.sqrt(squared)).mean(axis=1))
