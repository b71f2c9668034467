"""Wall-clock time per phase, with CUDA synchronised so GPU work is charged to the right phase."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.items: dict[str, int] = defaultdict(int)

    @contextmanager
    def phase(self, name: str, items: int = 0):
        _sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.seconds[name] += time.perf_counter() - start
            self.items[name] += items

    def load(self, timings: dict) -> None:
        """Adds timings recorded by as_dict (a resumed run's checkpoint) to these."""
        for name, timing in timings.items():
            self.seconds[name] += timing["seconds"]
            self.items[name] += timing["items"]

    def as_dict(self) -> dict:
        return {name: {"seconds": round(spent, 3), "items": self.items[name], "items_per_second":
                       round(self.items[name] / spent, 2) if self.items[name] and spent > 0 else None}
                for name, spent in self.seconds.items()}


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
