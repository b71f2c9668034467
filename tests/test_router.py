"""ucad.model.router.TaskKeyIndex: one search over all tasks' keys gives what one nearest-neighbour search per task gives."""
from __future__ import annotations

import pytest
import torch

from ucad.runtime.errors import UcadError
from ucad.model.nearest_neighbor import NearestNeighbourScorer
from ucad.model.router import TaskKeyIndex, route


def tasks_and_images(sizes, dim=24, images=7, patches=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), dim, generator=g) * 3.0
    key_sets = [c + torch.randn(size, dim, generator=g) for c, size in zip(centres, sizes)]
    truth = torch.randint(0, len(sizes), (images,), generator=g)
    frozen = torch.stack([centres[t] + 1.5 * torch.randn(patches, dim, generator=g) for t in truth])
    return key_sets, frozen, truth


def loop(frozen, key_sets, backend, patch_distance):
    """The reference: per task, each patch's nearest key by the knowledge scorer, averaged over the image."""
    nearest = NearestNeighbourScorer(k=1, backend=backend, patch_distance=patch_distance)
    n, p, d = frozen.shape
    return torch.stack([nearest.distances(frozen.reshape(n * p, d), keys).reshape(n, p).mean(dim=1)
                        for keys in key_sets], dim=1)


@pytest.mark.parametrize("patch_distance", ["squared", "euclidean"])
@pytest.mark.parametrize("sizes", [[20, 20, 20, 20], [20, 3, 31, 1, 8]], ids=["equal", "unequal"])
@pytest.mark.parametrize("block_elements", [1 << 25, 500], ids=["one-block", "many-blocks"])
def test_one_search_equals_the_per_task_loop(patch_distance, sizes, block_elements):
    key_sets, frozen, truth = tasks_and_images(sizes)
    index = TaskKeyIndex(key_sets, patch_distance, block_elements=block_elements)
    together = index.distances(frozen)
    assert together.shape == (frozen.shape[0], len(sizes))
    by_torch_loop = loop(frozen, key_sets, "torch", patch_distance)
    # same ranking formula, same exact recomputation of each winner, same reduction: the per-task loop's numbers
    torch.testing.assert_close(together, by_torch_loop, rtol=1e-6, atol=0)
    assert torch.equal(route(together), route(by_torch_loop))
    pytest.importorskip("faiss")
    by_faiss_loop = loop(frozen, key_sets, "faiss", patch_distance)
    torch.testing.assert_close(together, by_faiss_loop, rtol=1e-4, atol=1e-4)
    assert torch.equal(route(together), route(by_faiss_loop))


def test_patch_distances_are_the_nearest_key_within_each_task():
    key_sets, frozen, _ = tasks_and_images([5, 9, 2], images=3)
    patches = frozen.reshape(-1, frozen.shape[-1])
    per_patch = TaskKeyIndex(key_sets).patch_distances(patches)
    expected = torch.stack([torch.cdist(patches.double(), keys.double()).min(dim=1).values ** 2
                            for keys in key_sets], dim=1).float()
    torch.testing.assert_close(per_patch, expected, rtol=1e-5, atol=1e-5)


def test_half_precision_features_route_like_their_float_copy():
    key_sets, frozen, truth = tasks_and_images([16, 16, 16], seed=4)
    half = frozen.half()
    index = TaskKeyIndex(key_sets)
    torch.testing.assert_close(index.distances(half), index.distances(half.float()), rtol=0, atol=0)
    assert torch.equal(route(index.distances(half)), truth)


def test_euclidean_distance():
    key_sets, frozen, _ = tasks_and_images([4, 6])
    index = TaskKeyIndex(key_sets, "euclidean")
    torch.testing.assert_close(index.distances(frozen), loop(frozen, key_sets, "torch", "euclidean"), rtol=1e-6, atol=0)


def test_no_tasks_is_a_user_error():
    with pytest.raises(UcadError, match="at least one learned task"):
        TaskKeyIndex([])


@pytest.mark.cuda
def test_one_search_on_the_gpu_equals_the_cpu_loop():
    key_sets, frozen, _ = tasks_and_images([20, 3, 31, 8], seed=2)
    gpu = torch.device("cuda")
    on_gpu = TaskKeyIndex([k.to(gpu) for k in key_sets]).distances(frozen.to(gpu)).cpu()
    by_loop = loop(frozen, key_sets, "torch", "squared")
    torch.testing.assert_close(on_gpu, by_loop, rtol=1e-4, atol=1e-4)
    assert torch.equal(route(on_gpu), route(by_loop))
