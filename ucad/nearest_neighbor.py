"""k-nearest-neighbour distances from query patches to a memory bank: faiss (CPU or GPU) or torch.

Distances are squared L2 by default, as the released code's faiss `IndexFlatL2` returns them (its patch scores
are squared distances before upsampling and smoothing); `patch_distance="euclidean"` takes the square root.
With k > 1 the score is the mean of the k distances, as PatchCore's scorer does. Both back ends give the same
numbers to float tolerance.

faiss on a GPU needs a faiss GPU build (`pip install .[gpu]`, which replaces faiss-cpu) and `--faiss_on_gpu`; the
index then lives on the run's own GPU (`--gpu N`), all searches of the process share one set of GPU resources
(scratch memory, streams, cuBLAS handle: costly to create), and a run on the CPU never puts faiss on a GPU.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ucad.errors import UcadError

BACKENDS = ("auto", "faiss", "torch")
PATCH_DISTANCES = ("squared", "euclidean")


def faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@functools.lru_cache(maxsize=None)
def faiss_gpu_resources():
    """The process's one faiss StandardGpuResources: it reserves scratch memory on every GPU it is used on and
    creates streams and handles, so making one per search costs far more than the search."""
    import faiss

    return faiss.StandardGpuResources()


class NearestNeighbourScorer:
    def __init__(self, k: int = 1, backend: str = "auto", device: torch.device | str = "cpu",
                 faiss_on_gpu: bool = False, faiss_num_workers: int = 4, chunk_size: int = 8192,
                 patch_distance: str = "squared"):
        if k < 1:
            raise UcadError(f"--anomaly_scorer_num_nn must be at least 1, got {k}")
        if backend not in BACKENDS:
            raise UcadError(f"unknown nearest-neighbour backend '{backend}': choose {', '.join(BACKENDS)}")
        if patch_distance not in PATCH_DISTANCES:
            raise UcadError(f"--patch_distance '{patch_distance}': choose {' or '.join(PATCH_DISTANCES)}")
        self.device = torch.device(device)
        if backend == "auto":
            # on a GPU the features are already there and torch's matmul beats a host round trip
            on_gpu_faiss = faiss_on_gpu and self.device.type == "cuda" and faiss_has_gpu()
            backend = "faiss" if (self.device.type == "cpu" or on_gpu_faiss) else "torch"
        if backend == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError:
                raise UcadError("faiss is not installed: pip install faiss-cpu (or faiss-gpu), "
                                "or choose --nn_backend torch") from None
        self.k = k
        self.backend = backend
        # the faiss GPU index goes on the run's device: never on a GPU when the run is on the CPU
        self.faiss_on_gpu = faiss_on_gpu and self.device.type == "cuda" and faiss_has_gpu()
        self.faiss_num_workers = faiss_num_workers
        self.chunk_size = chunk_size
        self.squared = patch_distance == "squared"
        self.patch_distance = patch_distance

    def describe(self) -> str:
        if self.backend == "faiss":
            where = f"GPU {self.gpu_index}" if self.faiss_on_gpu else "CPU"
            return f"faiss ({where}), k={self.k}, {self.patch_distance} L2"
        return f"torch on {self.device}, k={self.k}, {self.patch_distance} L2"

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
        bank_sq = (bank * bank).sum(dim=1)
        parts = []
        for start in range(0, queries.shape[0], self.chunk_size):
            chunk = queries[start:start + self.chunk_size].float()
            squared = (chunk * chunk).sum(dim=1, keepdim=True) - 2.0 * chunk @ bank.T + bank_sq[None]
            nearest = torch.topk(squared, k, dim=1, largest=False).indices
            # the expansion above only ranks; distances of the k winners are recomputed directly, because it
            # cancels catastrophically for near-identical vectors (a noise floor of sqrt(eps) * |x|)
            difference = chunk[:, None, :] - bank[nearest]
            exact = (difference * difference).sum(dim=2) if self.squared else torch.linalg.vector_norm(difference, dim=2)
            parts.append(exact.mean(dim=1))
        return torch.cat(parts)

    def _faiss(self, queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
        import faiss

        # faiss's thread count is OpenMP's, which torch shares: without restoring it, --faiss_num_workers 8 would
        # silently run every later torch op with 8 threads (oversubscribing a small machine, and changing the
        # rounding of features, so a run and a later ucad.predict of the same images would differ in the last bits)
        torch_threads = torch.get_num_threads()
        faiss.omp_set_num_threads(max(1, self.faiss_num_workers))
        try:
            return self._faiss_search(queries, bank, k)
        finally:
            torch.set_num_threads(torch_threads)

    def _faiss_search(self, queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
        import faiss

        bank_np = np.ascontiguousarray(bank.detach().float().cpu().numpy())
        index = faiss.IndexFlatL2(bank_np.shape[1])
        if self.faiss_on_gpu:
            index = faiss.index_cpu_to_gpu(faiss_gpu_resources(), self.gpu_index, index)
        index.add(bank_np)
        query_np = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        squared, _ = index.search(query_np, k)
        squared = np.maximum(squared, 0.0)
        return torch.from_numpy((squared if self.squared else np.sqrt(squared)).mean(axis=1))
