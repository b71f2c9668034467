"""How a task's knowledge (its memory of normal patch features) is stored: the paper's budget is 196 x 1024
float32 = 784 KiB per task; fp16 stores twice as many vectors in those bytes, sq8 (one byte per dimension) four
times, product quantisation (pq) about ten times. pq learns its codebook from a sample of the task's patches,
pq_kept from the kept vectors themselves: a coreset keeps the outlying patches, which a codebook fitted to the bulk
of the patches reconstructs worst, and a codebook fitted to exactly what it encodes reconstructs them best. The pca_
storages keep each vector as its coefficients on the task's own leading principal directions (learned from its
patches, stored in fp16 with their centre), held as fp16 or sq8 (pca_pq, PQ codes of them, is there for
comparisons): a 128-d coefficient vector costs an eighth of a 1024-d one, so several thousand vectors fit.

Scoring always runs on the decoded float32 vectors, so a nearest-neighbour distance to quantised knowledge is the
asymmetric distance faiss's IndexPQ computes (exact query, reconstructed memory), and a projected vector decodes
back to the full dimension (centre + coefficients @ basis): the part of a query outside the task's principal
subspace still counts in its distance. Decoding needs torch only, so a saved model scores without faiss."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ucad.runtime.errors import UcadError

VECTOR_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
PROJECTED = "pca_"  # storage prefix: coefficients on the task's principal directions
PCA_DIM = 128  # principal directions kept per task: (128 + 1) x 1024 fp16 = 258 KiB of the paper's 784 KiB
PQ_BITS = 8  # 256 centroids per sub-space: one byte per code
PQ_SUBVECTOR_DIM = 8  # 1024-d features -> 128 codes (bytes) per vector
SQ_LEVELS = 255  # faiss's QT_8bit: code k of a dimension stands for low + (k + 0.5) / 255 * span
TRAINING_POINTS = 65536  # patches the PCA and the PQ codebook are learned from, at most
PAPER_VECTORS = 196  # the paper's knowledge per task, in fp32: the bytes --memory_size 0 fills


@dataclass
class PackedKnowledge:
    """Stored knowledge: `vectors` (fp32/fp16), or uint8 `codes` with their `codebook`: PQ (N, M) codes with an
    (M, 256, d) fp16 codebook, sq8 (N, d) codes with the (2, d) fp32 lowest level and span of each dimension. With a
    `basis` (r, D) and `centre` (D,), fp16, these hold coefficients on the task's principal directions."""

    storage: str
    vectors: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    codebook: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    centre: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state().values() if torch.is_tensor(t))

    def decode(self) -> torch.Tensor:
        """(N, D) float32 on the device the packed tensors are on."""
        if self.vectors is not None:
            inner = self.vectors.float()
        elif self.codebook.dim() == 3:  # PQ: a centroid table per sub-space
            m = self.codebook.shape[0]
            inner = self.codebook.float()[torch.arange(m, device=self.codes.device), self.codes.long()]
            inner = inner.reshape(self.codes.shape[0], -1)
        else:
            low, span = self.codebook
            inner = low + (self.codes.float() + 0.5) * (span / SQ_LEVELS)
        return inner if self.basis is None else self.centre.float() + inner @ self.basis.float()

    def state(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> "PackedKnowledge":
        return cls(**{key: value.to(device) if torch.is_tensor(value) else value for key, value in state.items()})


def vectors_in_budget(storage: str, dim: int, budget: int | None = None, reduced_dim: int = PCA_DIM) -> int:
    """How many `dim`-d vectors `storage` keeps in `budget` bytes (default: the paper's, 196 fp32 vectors), its
    codebook and principal directions included."""
    budget = PAPER_VECTORS * dim * 4 if budget is None else budget
    if storage.startswith(PROJECTED):
        budget, dim = budget - (reduced_dim + 1) * dim * 2, reduced_dim
    inner = storage.removeprefix(PROJECTED)
    if inner in VECTOR_DTYPES:
        fixed, per_vector = 0, dim * VECTOR_DTYPES[inner].itemsize
    elif inner == "sq8":
        fixed, per_vector = 2 * dim * 4, dim
    else:
        fixed, per_vector = dim * 2 ** PQ_BITS * 2, dim // PQ_SUBVECTOR_DIM
    return max(0, (budget - fixed) // per_vector)


def pack_knowledge(selected: torch.Tensor, storage: str, training: torch.Tensor | None = None, seed: int = 0,
                   option: str = "--knowledge_storage", reduced_dim: int = PCA_DIM) -> PackedKnowledge:
    """selected: the (N, D) vectors to keep (the knowledge coreset, or the keys); training: the task's patch features
    the principal directions and pq's codebook are learned from (default: `selected`); option: the command-line
    option named in errors."""
    if storage in VECTOR_DTYPES:
        return PackedKnowledge(storage, vectors=selected.to(VECTOR_DTYPES[storage]))
    try:
        import faiss
    except ImportError:
        raise UcadError(f"{option} {storage} needs faiss to learn its codes (pip install faiss-cpu)") from None
    training = selected if training is None else training
    if storage == "pq_kept" and selected.shape[0] >= 2 ** PQ_BITS:  # else too few to fit 256 centroids: the patches
        training = selected
    if training.shape[0] > TRAINING_POINTS:
        chosen = torch.randperm(training.shape[0], generator=torch.Generator().manual_seed(seed))[:TRAINING_POINTS]
        training = training[chosen.to(training.device)]
    kept, training = (np.ascontiguousarray(x.detach().float().cpu().numpy()) for x in (selected, training))
    parts, inner = {}, storage.removeprefix(PROJECTED)
    if storage.startswith(PROJECTED):
        if selected.shape[1] <= reduced_dim:
            raise UcadError(f"{option} {storage} keeps {reduced_dim} principal directions of the features: it needs "
                            f"a larger --target_embed_dimension than {selected.shape[1]}")
        pca = faiss.PCAMatrix(selected.shape[1], reduced_dim)
        pca.train(training)
        parts["centre"] = torch.from_numpy(faiss.vector_to_array(pca.mean)).half()
        parts["basis"] = torch.from_numpy(faiss.vector_to_array(pca.A).reshape(reduced_dim, -1)).half()
        # coefficients on the stored fp16 directions, so decoding reproduces exactly what was chosen
        kept, training = ((torch.from_numpy(x) - parts["centre"].float()) @ parts["basis"].float().T
                          for x in (kept, training))
        kept, training = np.ascontiguousarray(kept.numpy()), np.ascontiguousarray(training.numpy())
    if inner in VECTOR_DTYPES:
        parts["vectors"] = torch.from_numpy(kept).to(VECTOR_DTYPES[inner])
    elif inner == "sq8":  # the range of each dimension over the vectors kept: none is clipped
        quantiser = faiss.ScalarQuantizer(kept.shape[1], faiss.ScalarQuantizer.QT_8bit)
        quantiser.train(kept)
        parts["codes"] = torch.from_numpy(quantiser.compute_codes(kept))
        parts["codebook"] = torch.from_numpy(faiss.vector_to_array(quantiser.trained).reshape(2, -1))
    else:
        parts.update(_product_quantised(kept, training, seed, f"{option} {storage}"))
    return PackedKnowledge(storage, **{name: value.to(selected.device) for name, value in parts.items()})


def _product_quantised(kept: np.ndarray, training: np.ndarray, seed: int, option: str) -> dict:
    import faiss

    dim = kept.shape[1]
    if dim % PQ_SUBVECTOR_DIM:
        raise UcadError(f"{option} needs a feature size divisible by {PQ_SUBVECTOR_DIM}, got {dim} "
                        "(--target_embed_dimension)")
    if training.shape[0] < 2 ** PQ_BITS:
        raise UcadError(f"{option} learns {2 ** PQ_BITS} centroids per sub-space from the task's patch "
                        f"features, but this task has only {training.shape[0]}: use fp16 or fp32 for so small a task")
    subspaces = dim // PQ_SUBVECTOR_DIM
    quantiser = faiss.ProductQuantizer(dim, subspaces, PQ_BITS)
    quantiser.cp.seed = seed
    quantiser.cp.min_points_per_centroid = 1  # a codebook fitted to a few thousand kept vectors is meant so
    quantiser.train(training)
    codebook = faiss.vector_to_array(quantiser.centroids).reshape(subspaces, 2 ** PQ_BITS, PQ_SUBVECTOR_DIM)
    codebook = torch.from_numpy(codebook).half()  # stored in fp16: the codebook is part of the task's bytes
    # encode against the fp16 codebook that is stored, so decoding reproduces exactly what was chosen
    sub_vectors = torch.from_numpy(kept).reshape(len(kept), subspaces, PQ_SUBVECTOR_DIM).transpose(0, 1)
    nearest = torch.cdist(sub_vectors, codebook.float()).argmin(dim=2)  # (M, N): each sub-vector's centroid
    return {"codes": nearest.T.to(torch.uint8).contiguous(), "codebook": codebook}
