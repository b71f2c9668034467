"""What one learned task keeps: keys (its identity), a prompt, knowledge (its normal patches) and thresholds; and its
stored form, which model files and checkpoints hold (ucad.persistence.model_file)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

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

    def to_state(self, scoring_only: bool = False) -> dict:
        """The stored form: tensors on the CPU and plain values, by name (it loads with weights_only). Packed knowledge
        and keys stay packed (their bytes are the point). `scoring_only` leaves out the unlimited knowledge and its
        thresholds, a reference variant that scoring never uses (bank names are the fields' names)."""
        packed, keys = self.packed, self.packed_keys
        return _moved({"name": self.name, "keys": None if keys is not None else self.keys,
                       "keys_packed": keys.state() if keys is not None else None, "prompt_state": self.prompt_state,
                       "knowledge": None if packed is not None else self.knowledge,
                       "knowledge_packed": packed.state() if packed is not None else None,
                       "knowledge_unlimited": None if scoring_only else self.knowledge_unlimited,
                       "thresholds": {bank: asdict(threshold) for bank, threshold in self.thresholds.items()
                                      if not (scoring_only and bank == "knowledge_unlimited")},
                       "extra": self.extra, "routing": self.routing}, "cpu")

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> TaskMemory:
        """The task `to_state` stored (as model files of format 2 store it too), its tensors on `device`; packed
        knowledge and keys are decoded for scoring and routing."""
        state = _moved(state, device)
        packed, keys = (PackedKnowledge.from_state(state[name], device) if state.get(name) else None
                        for name in ("knowledge_packed", "keys_packed"))
        thresholds = {bank: Threshold.from_dict(values) for bank, values in (state.get("thresholds") or {}).items()}
        return cls(name=state["name"], keys=keys.decode() if keys is not None else state["keys"], packed=packed,
                   knowledge=packed.decode() if packed is not None else state["knowledge"], thresholds=thresholds,
                   knowledge_unlimited=state.get("knowledge_unlimited"), prompt_state=state["prompt_state"],
                   extra=state.get("extra", {}), routing=state.get("routing") or {}, packed_keys=keys)


def _moved(value, device):
    """`value` with every tensor in it (through nested dicts) detached and on `device`."""
    if isinstance(value, dict):
        return {key: _moved(item, device) for key, item in value.items()}
    return value.detach().to(device) if isinstance(value, torch.Tensor) else value
