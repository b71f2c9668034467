"""How a task's knowledge (its memory of normal patch features) is stored: the paper's budget is 196 x 1024
float32 = 784 KiB per task; fp16 stores twice as many vectors in those bytes, product quantisation about ten times.

Scoring always runs on the decoded float32 vectors, so a nearest-neighbour distance to PQ-coded knowledge is the
asymmetric distance faiss's IndexPQ computes (exact query, reconstructed memory). Decoding needs torch only, so a
saved model scores on a machine without faiss."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ucad.runtime.errors import UcadError

VECTOR_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
PQ_BITS = 8  # 256 centroids per sub-space: one byte per code
PQ_SUBVECTOR_DIM = 8  # 1024-d features -> 128 codes (bytes) per vector
PQ_TRAINING_POINTS = 65536


@dataclass
class PackedKnowledge:
    """Stored knowledge: `vectors` (fp32/fp16), or PQ `codes` (N, M) uint8 with `codebook` (M, 256, d) fp16."""

    storage: str
    vectors: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    codebook: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.vectors, self.codes, self.codebook) if t is not None)

    def decode(self) -> torch.Tensor:
        """(N, D) float32 on the device the packed tensors are on."""
        if self.storage != "pq":
            return self.vectors.float()
        m = self.codebook.shape[0]
        sub_vectors = self.codebook.float()[torch.arange(m, device=self.codes.device), self.codes.long()]
        return sub_vectors.reshape(self.codes.shape[0], -1)

    def state(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> "PackedKnowledge":
        return cls(**{key: value.to(device) if torch.is_tensor(value) else value for key, value in state.items()})


def pack_knowledge(selected: torch.Tensor, storage: str, training: torch.Tensor | None = None,
                   seed: int = 0, option: str = "--knowledge_storage") -> PackedKnowledge:
    """selected: the (N, D) vectors to keep (the knowledge coreset, or the keys); training: the task's patch features
    the PQ codebook is learned from (default: `selected`); option: the command-line option named in errors."""
    if storage in VECTOR_DTYPES:
        return PackedKnowledge(storage, vectors=selected.to(VECTOR_DTYPES[storage]))
    try:
        import faiss
    except ImportError:
        raise UcadError(f"{option} pq needs faiss to learn the codebook (pip install faiss-cpu)") from None
    dim = selected.shape[1]
    if dim % PQ_SUBVECTOR_DIM:
        raise UcadError(f"{option} pq needs a feature size divisible by {PQ_SUBVECTOR_DIM}, got {dim} "
                        "(--target_embed_dimension)")
    training = selected if training is None else training
    if training.shape[0] < 2 ** PQ_BITS:
        raise UcadError(f"{option} pq learns {2 ** PQ_BITS} centroids per sub-space from the task's patch "
                        f"features, but this task has only {training.shape[0]}: use fp16 or fp32 for so small a task")
    if training.shape[0] > PQ_TRAINING_POINTS:
        chosen = torch.randperm(training.shape[0], generator=torch.Generator().manual_seed(seed))[:PQ_TRAINING_POINTS]
        training = training[chosen.to(training.device)]
    subspaces = dim // PQ_SUBVECTOR_DIM
    quantiser = faiss.ProductQuantizer(dim, subspaces, PQ_BITS)
    quantiser.cp.seed = seed
    quantiser.train(np.ascontiguousarray(training.detach().float().cpu().numpy()))
    codebook = faiss.vector_to_array(quantiser.centroids).reshape(subspaces, 2 ** PQ_BITS, PQ_SUBVECTOR_DIM)
    codebook = torch.from_numpy(codebook).half()  # stored in fp16: the codebook is part of the task's bytes
    # encode against the fp16 codebook that is stored, so decoding reproduces exactly what was chosen
    sub_vectors = selected.detach().float().cpu().reshape(len(selected), subspaces, PQ_SUBVECTOR_DIM).transpose(0, 1)
    nearest = torch.cdist(sub_vectors, codebook.float()).argmin(dim=2)  # (M, N): each sub-vector's centroid
    codes = nearest.T.to(torch.uint8).contiguous()
    return PackedKnowledge("pq", codes=codes.to(selected.device), codebook=codebook.to(selected.device))
