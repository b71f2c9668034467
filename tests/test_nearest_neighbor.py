"""ucad.model.nearest_neighbor.NearestNeighbourScorer: faiss and torch back ends against brute force (torch.cdist)."""
from __future__ import annotations

import pytest
import torch

from ucad.model.nearest_neighbor import NearestNeighbourScorer

faiss = pytest.importorskip("faiss")


def brute_force(queries: torch.Tensor, bank: torch.Tensor, k: int, squared: bool = False) -> torch.Tensor:
    """Mean (squared) Euclidean distance to the k nearest bank rows, in float64 with the exact (non-mm) formula."""
    d = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
    k = min(k, bank.shape[0])
    nearest = d.topk(k, dim=1, largest=False).values
    return (nearest ** 2 if squared else nearest).mean(dim=1).float()


EUCLIDEAN = {"patch_distance": "euclidean"}  # most tests below pin the plain distance; squared is tested on its own


def data(q=300, m=120, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q, d, generator=g), torch.randn(m, d, generator=g)


@pytest.mark.parametrize("k", [1, 3])
def test_faiss_torch_and_brute_force_agree(k):
    queries, bank = data()
    expected = brute_force(queries, bank, k)
    by_faiss = NearestNeighbourScorer(k=k, backend="faiss", **EUCLIDEAN).distances(queries, bank)
    by_torch = NearestNeighbourScorer(k=k, backend="torch", **EUCLIDEAN).distances(queries, bank)
    assert by_faiss.shape == by_torch.shape == (300,)
    assert by_faiss.dtype == by_torch.dtype == torch.float32
    torch.testing.assert_close(by_faiss, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(by_torch, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(by_faiss, by_torch, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_torch_backend_chunks_queries(k):
    queries, bank = data(q=101, seed=1)
    whole = NearestNeighbourScorer(k=k, backend="torch", **EUCLIDEAN).distances(queries, bank)
    chunked = NearestNeighbourScorer(k=k, backend="torch", chunk_size=7, **EUCLIDEAN).distances(queries, bank)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(chunked, brute_force(queries, bank, k), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_k_larger_than_bank_uses_every_row(backend):
    queries, bank = data(q=20, m=2, d=8, seed=2)
    got = NearestNeighbourScorer(k=5, backend=backend, **EUCLIDEAN).distances(queries, bank)
    expected = torch.cdist(queries.double(), bank.double()).mean(dim=1).float()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_single_row_bank_and_scaled_features(backend):
    # large-magnitude features (like unnormalised ViT tokens) still agree with brute force
    queries, bank = data(q=50, m=1, d=64, seed=3)
    queries, bank = queries * 30.0, bank * 30.0
    got = NearestNeighbourScorer(k=1, backend=backend, **EUCLIDEAN).distances(queries, bank)
    torch.testing.assert_close(got, brute_force(queries, bank, 1), atol=1e-3, rtol=1e-5)


def test_auto_picks_faiss_on_cpu():
    scorer = NearestNeighbourScorer(k=1, backend="auto", device="cpu")
    assert scorer.backend == "faiss"
    assert "faiss" in scorer.describe()
    assert NearestNeighbourScorer(k=1, backend="auto").backend == "faiss"  # the default device is the CPU


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("k", [1, 3])
def test_default_is_squared_l2_as_faiss_index_flat_l2(backend, k):
    # the released code scores patches with faiss IndexFlatL2, which returns squared distances
    queries, bank = data(q=80, m=40, d=24, seed=5)
    scorer = NearestNeighbourScorer(k=k, backend=backend)
    assert scorer.squared and "squared" in scorer.describe()
    got = scorer.distances(queries, bank)
    torch.testing.assert_close(got, brute_force(queries, bank, k, squared=True), atol=1e-3, rtol=1e-5)
    index = faiss.IndexFlatL2(24)
    index.add(bank.numpy())
    faiss_squared, _ = index.search(queries.numpy(), k)
    torch.testing.assert_close(got, torch.from_numpy(faiss_squared).mean(dim=1), atol=1e-3, rtol=1e-5)


def test_double_and_non_contiguous_inputs():
    queries, bank = data(q=40, m=30, d=16, seed=4)
    q64, b64 = queries.double(), bank.double()
    strided_bank = bank.T.contiguous().T  # non-contiguous (column-major) view equal to bank
    assert not strided_bank.is_contiguous()
    expected = brute_force(queries, bank, 3)
    for backend in ("faiss", "torch"):
        scorer = NearestNeighbourScorer(k=3, backend=backend, **EUCLIDEAN)
        torch.testing.assert_close(scorer.distances(q64, b64), expected, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(scorer.distances(queries, strided_bank), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("scale", [1.0, 3.0, 20.0])
def test_query_equal_to_a_bank_row_scores_zero(backend, scale):
    # normal test patches often (nearly) coincide with memory rows: the ||q||^2 - 2 q.b + ||b||^2 expansion
    # cancels catastrophically there and must not leave a noise floor of sqrt(eps * ||q||^2)
    bank = torch.randn(196, 1024, generator=torch.Generator().manual_seed(0)) * scale
    queries = torch.cat([bank[:50], bank[50:60] + 1e-2])
    got = NearestNeighbourScorer(k=1, backend=backend, **EUCLIDEAN).distances(queries, bank)
    expected = brute_force(queries, bank, 1)
    torch.testing.assert_close(got, expected, atol=1e-4 * scale, rtol=1e-4)


# ----------------------------------------------------------------------------- faiss on the GPU (a stand-in faiss)
class _FakeGpuFaiss:
    """Real faiss CPU search behind the GPU entry points, recording which GPU and which resources were used."""

    def __init__(self, real):
        self.real = real
        self.resources_made = 0
        self.placements = []  # (resources object, device ordinal) per index moved to a GPU
        self.IndexFlatL2 = real.IndexFlatL2
        self.omp_set_num_threads = real.omp_set_num_threads
        fake = self

        class StandardGpuResources:
            def __init__(self):
                fake.resources_made += 1

        self.StandardGpuResources = StandardGpuResources

    def get_num_gpus(self):
        return 2

    def index_cpu_to_gpu(self, resources, device, index):
        self.placements.append((resources, device))
        return index


@pytest.fixture
def gpu_faiss(monkeypatch):
    import sys

    from ucad.model import nearest_neighbor

    fake = _FakeGpuFaiss(faiss)
    monkeypatch.setitem(sys.modules, "faiss", fake)
    nearest_neighbor.faiss_gpu_resources.cache_clear()
    yield fake
    nearest_neighbor.faiss_gpu_resources.cache_clear()


def test_faiss_gpu_index_uses_the_selected_gpu_and_one_resources_object(gpu_faiss):
    queries, bank = data()
    scorer = NearestNeighbourScorer(k=1, backend="auto", device=torch.device("cuda", 1), faiss_on_gpu=True)
    assert scorer.backend == "faiss" and scorer.faiss_on_gpu
    assert "GPU 1" in scorer.describe()
    first = scorer.distances(queries, bank)
    scorer.distances(queries[:10], bank)
    NearestNeighbourScorer(k=1, backend="faiss", device="cuda:1", faiss_on_gpu=True).distances(queries, bank)
    assert gpu_faiss.resources_made == 1  # one per process, not per search or per scorer
    assert [device for _, device in gpu_faiss.placements] == [1, 1, 1]  # never silently GPU 0
    torch.testing.assert_close(first, NearestNeighbourScorer(k=1, backend="torch").distances(queries, bank),
                               atol=1e-3, rtol=1e-4)


def test_cpu_run_never_puts_faiss_on_a_gpu(gpu_faiss):
    queries, bank = data()
    scorer = NearestNeighbourScorer(k=1, backend="auto", device="cpu", faiss_on_gpu=True)
    assert scorer.backend == "faiss" and not scorer.faiss_on_gpu
    scorer.distances(queries, bank)
    assert gpu_faiss.placements == [] and gpu_faiss.resources_made == 0
    assert "CPU" in scorer.describe()


def test_faiss_threads_do_not_change_torchs():
    """faiss sets OpenMP's thread count, which torch shares; torch must keep its own afterwards."""
    pytest.importorskip("faiss")
    before = torch.get_num_threads()
    scorer = NearestNeighbourScorer(1, "faiss", faiss_num_workers=before + 3)
    scorer.distances(torch.randn(50, 8), torch.randn(20, 8))
    assert torch.get_num_threads() == before
