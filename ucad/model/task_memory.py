"""What one learned task keeps: keys (its identity), a prompt, knowledge (its normal patches) and thresholds."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ucad.learning.thresholds import Threshold
from ucad.model.knowledge import PackedKnowledge


@dataclass
class TaskMemory:
    name: str
    keys: torch.Tensor | None  # (key_size, D) frozen features: task identity (decoded where packed)
    prompt_state: dict[str, torch.Tensor] | None  # None in PatchCore mode (no prompt)
    knowledge: torch.Tensor  # (memory_size, D) prompted features: what normal looks like
    knowledge_unlimited: torch.Tensor | None = None  # (basic_size, D) the larger-memory variant
    extra: dict = field(default_factory=dict)
    thresholds: dict[str, Threshold] = field(default_factory=dict)  # bank name -> its thresholds
    packed: PackedKnowledge | None = None  # how `knowledge` is stored (fp32 / fp16 / PQ codes); None = fp32
    routing: dict[str, torch.Tensor] = field(default_factory=dict)  # what --routing keeps beside the keys
    packed_keys: PackedKnowledge | None = None  # how `keys` are stored (fp16 / PQ codes); None = as they are

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this task keeps for routing and scoring (the unlimited variant is a reference, not counted)."""
        def size(tensors):
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)
        knowledge = self.packed.nbytes if self.packed is not None else size([self.knowledge])
        keys = self.packed_keys.nbytes if self.packed_keys is not None else size([self.keys])
        return {"keys": keys + size(self.routing.values()), "prompt": size((self.prompt_state or {}).values()),
                "knowledge": knowledge}
