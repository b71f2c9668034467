"""ContinualEvaluator fills missing key distances with grouped searches: the numbers of one search per test set."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ucad import evaluation
from ucad.evaluation import ContinualEvaluator
from ucad.router import TaskKeyIndex
from ucad.timing import PhaseTimer


def _evaluator(tasks=4, test_sets=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = SimpleNamespace(tasks=[SimpleNamespace(keys=torch.randn(7 + t, 12, generator=g)) for t in range(tasks)],
                            device=torch.device("cpu"), config=SimpleNamespace(mode="ucad"))
    model.key_index = lambda unseen: TaskKeyIndex([model.tasks[k].keys for k in unseen])  # as UcadModel.key_index
    evaluator = ContinualEvaluator(model, PhaseTimer())
    for i in range(test_sets):
        n = 2 + i
        test_set = evaluation.TestSet(i, f"t{i}", torch.zeros(n, 3, 8, 8, dtype=torch.uint8), torch.zeros(n, 8, 8),
                           np.zeros(n), [])
        test_set.frozen = torch.randn(n, 5, 12, generator=g).half()  # cached: no backbone needed
        evaluator.add_test_set(test_set)
    return evaluator, model


@pytest.mark.parametrize("group_bytes", [1 << 28, 200], ids=["one-group", "many-groups"])
def test_grouped_routing_equals_one_search_per_test_set(monkeypatch, group_bytes):
    monkeypatch.setattr(evaluation, "ROUTING_GROUP_BYTES", group_bytes)
    evaluator, model = _evaluator()
    for phase in range(4):  # test set j appears at phase j; the last one (index 4) is never reached
        evaluator._fill_key_distances(phase)
        for test_set in evaluator.test_sets[: phase + 1]:
            assert sorted(test_set.key_distance) == list(range(phase + 1))
    for test_set in evaluator.test_sets[:4]:
        expected = TaskKeyIndex([t.keys for t in model.tasks]).distances(test_set.frozen)
        got = torch.stack([test_set.key_distance[k] for k in range(4)], dim=1)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert evaluator.test_sets[4].key_distance == {}
