"""UcadModel.score with a ScoreCache, as the continual evaluator uses it phase after phase, gives the numbers of
scoring from scratch, and computes each task's key distances and patch scores only once."""
from __future__ import annotations

import torch

from ucad.config import ModelConfig
from ucad.model.task_memory import TaskMemory
from ucad.model.ucad_model import BANKS, KNOWLEDGE, UNLIMITED, ScoreCache, UcadModel


def tiny_model(tasks: int = 3, seed: int = 0) -> UcadModel:
    model = UcadModel(ModelConfig(backbone="resnet18", layers=("layer2", "layer3"), weights="random", imagesize=32,
                                  resize=32, pretrain_embed_dimension=16, target_embed_dimension=16),
                      torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    for t in range(tasks):
        images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
        features = model.embed(images).reshape(-1, 16).detach()
        model.tasks.append(TaskMemory(f"t{t}", features[: 5 + t], None, features[::3], features[::2]))
    return model


def test_cached_scoring_phase_after_phase_equals_scoring_from_scratch():
    model = tiny_model()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cache = ScoreCache(BANKS)
    for phase in range(len(model.tasks)):
        for task, bank in ((None, KNOWLEDGE), (None, UNLIMITED), (0, KNOWLEDGE)):
            cached = model.score(images, task=task, bank=bank, tasks=phase + 1, cache=cache, maps=False)
            fresh = model.score(images, task=task, bank=bank, tasks=phase + 1, batch_size=2)
            assert torch.equal(cached.routed_task, fresh.routed_task)
            torch.testing.assert_close(cached.key_distances, fresh.key_distances, rtol=1e-6, atol=0)
            torch.testing.assert_close(cached.patch_scores, fresh.patch_scores, rtol=1e-5, atol=1e-5)
            assert cached.anomaly_maps is None and fresh.anomaly_maps.shape == (5, 32, 32)
        assert sorted(cache.key_distance) == list(range(phase + 1))


def test_a_cache_computes_each_task_once(monkeypatch):
    model = tiny_model()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    searched, scored = [], []
    key_index, score_patches = model.key_index, model.score_patches
    monkeypatch.setattr(model, "key_index", lambda tasks: searched.append(list(tasks)) or key_index(tasks))
    monkeypatch.setattr(model, "score_patches", lambda images, task, *args: scored.append((task, images.shape[0]))
                        or score_patches(images, task, *args))
    cache = ScoreCache(BANKS)
    for phase in range(3):
        model.score(images, tasks=phase + 1, cache=cache, maps=False)
        model.score(images, tasks=phase + 1, cache=cache, maps=False)  # again: nothing new to compute
    assert searched == [[0], [1], [2]]  # each phase searches only the newest task's keys
    assert sum(n for _, n in scored) <= 3 * images.shape[0]  # an image is scored at most once per task
    assert cache.nbytes > 0
