"""ucad.model.coreset.CoresetSampler: identity, exact greedy k-center (against a brute force written here), the
approximate variant, coverage on clustered data, errors, and the memory bound on a large bank."""
from __future__ import annotations

import time

import pytest
import torch

from ucad.model.coreset import CoresetSampler


def brute_force_k_center(features: torch.Tensor, size: int, seed: int) -> list[int]:
    """Textbook greedy k-center with a full N x N distance matrix (only for small N).

    Start index: the sampler draws it as `torch.randint(n, (1,))` from a CPU generator seeded with `seed`,
    reproduced here. Then repeatedly add the point farthest from the selected set."""
    n = features.shape[0]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start = int(torch.randint(n, (1,), generator=generator))
    x = features.double()
    full = torch.cdist(x, x)  # N x N, fine for a few hundred points
    selected = [start]
    min_dist = full[start].clone()
    while len(selected) < size:
        index = int(torch.argmax(min_dist))
        selected.append(index)
        min_dist = torch.minimum(min_dist, full[index])
    return selected


def clustered(points_per_cluster=60, clusters=5, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g) * 50.0
    data = torch.cat([c + 0.01 * torch.randn(points_per_cluster, dim, generator=g) for c in centres])
    labels = torch.arange(clusters).repeat_interleave(points_per_cluster)
    perm = torch.randperm(len(data), generator=g)  # clusters must not be contiguous blocks
    return data[perm], labels[perm]


def test_identity_returns_all_rows():
    x = torch.randn(37, 8)
    sampler = CoresetSampler("identity", percentage=0.1)
    assert torch.equal(sampler.select(x), torch.arange(37))
    assert torch.equal(sampler.select(x, size=5), torch.arange(37))  # identity ignores the size too
    assert torch.equal(sampler.subsample(x), x)


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("size", [1, 2, 10, 40])
def test_exact_greedy_equals_brute_force(seed, size):
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(100 + seed))
    got = CoresetSampler("greedy_coreset", seed=seed).select(x, size=size).tolist()
    assert got == brute_force_k_center(x, size, seed)


def test_exact_greedy_percentage_and_high_dim_is_not_projected():
    # the exact variant works on the raw features, whatever their dimension
    x = torch.randn(250, 200, generator=torch.Generator().manual_seed(3))
    got = CoresetSampler("greedy_coreset", percentage=0.1, seed=4).select(x).tolist()
    assert len(got) == 25
    assert got == brute_force_k_center(x, 25, 4)


def test_target_at_least_n_returns_everything():
    x = torch.randn(12, 4)
    for name in ("greedy_coreset", "approx_greedy_coreset"):
        assert torch.equal(CoresetSampler(name).select(x, size=12), torch.arange(12))
        assert torch.equal(CoresetSampler(name).select(x, size=50), torch.arange(12))
        assert torch.equal(CoresetSampler(name, percentage=1.0).select(x), torch.arange(12))


@pytest.mark.parametrize("dim", [16, 300])  # 300 > 128: the random projection is used
def test_approx_sizes_unique_and_seeded(dim):
    x = torch.randn(500, dim, generator=torch.Generator().manual_seed(5))
    fixed = CoresetSampler("approx_greedy_coreset", seed=0).select(x, size=37)
    assert fixed.shape == (37,) and fixed.dtype == torch.long
    assert len(set(fixed.tolist())) == 37
    assert 0 <= fixed.min() and fixed.max() < 500

    by_percentage = CoresetSampler("approx_greedy_coreset", percentage=0.1, seed=0).select(x)
    assert by_percentage.shape == (50,)
    assert len(set(by_percentage.tolist())) == 50
    tiny = CoresetSampler("approx_greedy_coreset", percentage=0.001, seed=0).select(x)
    assert tiny.shape == (1,)  # never zero rows

    again = CoresetSampler("approx_greedy_coreset", seed=0).select(x, size=37)
    assert torch.equal(fixed, again)
    other = CoresetSampler("approx_greedy_coreset", seed=1).select(x, size=37)
    assert not torch.equal(fixed, other)
    assert torch.equal(CoresetSampler("approx_greedy_coreset", seed=0).subsample(x, size=37), x[fixed])


def test_exact_greedy_depends_on_seed_only_through_the_start():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(9))
    a = CoresetSampler("greedy_coreset", seed=0).select(x, size=20)
    b = CoresetSampler("greedy_coreset", seed=0).select(x, size=20)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["greedy_coreset", "approx_greedy_coreset"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_five_points_cover_five_clusters(name, seed):
    x, labels = clustered()
    chosen = CoresetSampler(name, seed=seed).select(x, size=5)
    assert sorted(labels[chosen].tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("name", ["greedy_coreset", "approx_greedy_coreset"])
def test_no_row_is_selected_twice_with_duplicate_features(name):
    # 4 distinct feature vectors, each repeated 10 times (e.g. a flat background): asking for 6 rows must
    # give 6 different rows, not the same index again once every distance has dropped to zero
    distinct = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    x = distinct.repeat(10, 1)
    chosen = CoresetSampler(name, seed=0).select(x, size=6).tolist()
    assert len(chosen) == 6
    assert len(set(chosen)) == 6
    # the first four picks already cover every distinct vector
    assert len({tuple(x[i].tolist()) for i in chosen}) == 4


@pytest.mark.parametrize("name", ["greedy_coreset", "approx_greedy_coreset"])
def test_large_bank_without_n_by_n_matrix(name):
    # 200k x 64: an N x N float matrix would be 160 GB; the sampler must only keep (N,) vectors
    x = torch.randn(200_000, 64, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    chosen = CoresetSampler(name, seed=0).select(x, size=50)
    elapsed = time.perf_counter() - start
    assert chosen.shape == (50,)
    assert len(set(chosen.tolist())) == 50
    assert elapsed < 10.0, f"{name} took {elapsed:.1f}s for 50 of 200k rows"
