"""ucad.model.keys: key samplers (k-means, random, the released greedy coresets) and the routing margin."""
from __future__ import annotations

import pytest
import torch

from ucad.model.coreset import CoresetSampler
from ucad.config import KEY_SAMPLERS
from ucad.model.keys import select_keys
from ucad.model.router import TaskKeyIndex, route, routing_margin

pytest.importorskip("faiss")


def two_lookalike_tasks(seed: int = 0, dim: int = 64):
    """Task A: a bulk of typical patches plus 10 % rare ones in three far clusters (a product's specks and
    edges); task B: a bulk beside A's, without rare patches. Test images of A show typical patches only."""
    g = torch.Generator().manual_seed(seed)
    centres = 8.0 * torch.nn.functional.normalize(torch.randn(3, dim, generator=g), dim=1)
    rare = centres[torch.randint(0, 3, (200,), generator=g)] + 0.3 * torch.randn(200, dim, generator=g)
    task_a = torch.cat([torch.randn(2000, dim, generator=g), rare])
    shift = torch.zeros(dim)
    shift[0] = 2.0
    task_b = shift + torch.randn(2000, dim, generator=g)
    images_a = torch.randn(8, 49, dim, generator=g)
    return task_a, task_b, images_a


@pytest.mark.parametrize("sampler", KEY_SAMPLERS)
def test_every_sampler_gives_keys_of_the_requested_size_repeatably(sampler):
    features = torch.randn(500, 16, generator=torch.Generator().manual_seed(1))
    keys = select_keys(features, 20, sampler, seed=3)
    assert keys.shape == (20, 16) and keys.dtype == torch.float32
    assert torch.equal(keys, select_keys(features, 20, sampler, seed=3))
    if sampler != "kmeans":  # the others pick real patches
        assert all((features == key).all(dim=1).any() for key in keys)
    assert select_keys(features[:10], 20, sampler, seed=3).shape == (10, 16)  # fewer patches than keys: all


def test_greedy_samplers_are_the_released_coresets():
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(2))
    for name in ("approx_greedy_coreset", "greedy_coreset"):
        assert torch.equal(select_keys(features, 12, name, seed=5), CoresetSampler(name, seed=5).subsample(features, 12))


def test_kmeans_keys_are_centroids_of_the_bulk():
    g = torch.Generator().manual_seed(4)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    features = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centres])
    keys = select_keys(features, 3, "kmeans", seed=0)
    assert torch.cdist(keys, centres).min(dim=0).values.max() < 0.1




def test_kmeans_keys_route_lookalike_tasks_that_greedy_keys_confuse():
    task_a, task_b, images_a = two_lookalike_tasks()
    routed = {}
    for sampler in KEY_SAMPLERS:
        keys = [select_keys(task, 16, sampler, seed=0) for task in (task_a, task_b)]
        distances = TaskKeyIndex(keys).distances(images_a)
        routed[sampler] = (route(distances) == 0).float().mean().item()
    # greedy k-center spends A's keys on its outliers, so A's typical patches look closer to B
    assert routed["greedy_coreset"] < 0.5 and routed["approx_greedy_coreset"] < 0.5
    assert routed["kmeans"] == 1.0 and routed["random"] == 1.0


def test_routing_margin_is_the_relative_gap_to_the_runner_up():
    distances = torch.tensor([[1.0, 2.0, 3.0], [4.0, 2.0, 2.5], [5.0, 5.0, 9.0]])
    torch.testing.assert_close(routing_margin(distances), torch.tensor([1.0, 0.25, 0.0]))
    assert torch.isinf(routing_margin(torch.tensor([[3.0]]))).all()  # one task: no rival


def test_every_accepted_seed_gives_a_key_seed_faiss_takes():
    """seed * 1000 + task exceeds a C int from --seed 2147484 on (a date such as 20240101, say)."""
    from ucad.config import LearningConfig

    for seed in (0, 2_147_483, 2_147_484, 20240101, 2 ** 32 - 1):
        task_seed = LearningConfig(seed=seed).task_seed(14)
        assert 0 <= task_seed < 2 ** 31
        select_keys(torch.randn(300, 8), 4, "kmeans", seed=task_seed)
    assert LearningConfig(seed=7).task_seed(3) == 7003  # small seeds keep the numbers they always gave


def test_key_size_zero_fills_the_papers_bytes_with_the_storage_chosen():
    from ucad.model.keys import task_keys
    from ucad.model.knowledge import vectors_in_budget

    features = torch.randn(5000, 1024, generator=torch.Generator().manual_seed(0))
    keys, packed = task_keys(features, 0, "random", "pca_sq8", seed=0)
    assert keys.shape == (vectors_in_budget("pca_sq8", 1024), 1024) == (4200, 1024)
    assert packed.nbytes <= 196 * 1024 * 4 < packed.nbytes + 128  # the paper's bytes, less than one key left over
    assert torch.equal(keys, packed.decode())
