"""What only a GPU can show: the CUDA paths give the CPU's numbers. Every test here is marked `cuda` (skipped
without a GPU; `python3 -m pytest -m cuda tests` runs them and the CUDA variants elsewhere)."""
from __future__ import annotations

import pytest
import torch

from ucad.model.coreset import CoresetSampler
from ucad.model.nearest_neighbor import NearestNeighbourScorer, faiss_has_gpu

pytestmark = pytest.mark.cuda
GPU = torch.device("cuda", 0)


def _data(q=500, m=300, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q, d, generator=g), torch.randn(m, d, generator=g)


@pytest.mark.parametrize("k", [1, 3])
def test_torch_search_on_the_gpu_equals_the_cpu(k):
    queries, bank = _data()
    on_cpu = NearestNeighbourScorer(k, backend="torch").distances(queries, bank)
    scorer = NearestNeighbourScorer(k, backend="auto", device=GPU)
    assert scorer.backend == "torch"  # no faiss GPU asked for: torch on the GPU
    on_gpu = scorer.distances(queries.to(GPU), bank.to(GPU))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not faiss_has_gpu(), reason="needs a faiss GPU build (pip install .[gpu])")
def test_faiss_gpu_search_equals_faiss_cpu():
    queries, bank = _data()
    on_cpu = NearestNeighbourScorer(1, backend="faiss").distances(queries, bank)
    last = torch.device("cuda", torch.cuda.device_count() - 1)  # the selected GPU, not always GPU 0
    scorer = NearestNeighbourScorer(1, backend="faiss", device=last, faiss_on_gpu=True)
    assert scorer.faiss_on_gpu
    torch.testing.assert_close(scorer.distances(queries.to(last), bank.to(last)).cpu(), on_cpu, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", ["greedy_coreset", "approx_greedy_coreset"])
def test_coreset_on_the_gpu_selects_the_cpu_rows(name):
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(6, 32, generator=g) * 10
    features = (centres[torch.arange(600) % 6] + torch.randn(600, 32, generator=g))
    sampler = CoresetSampler(name, seed=0)
    on_cpu = sampler.select(features, 6)
    on_gpu = sampler.select(features.to(GPU), 6)
    assert torch.as_tensor(on_gpu).cpu().tolist() == torch.as_tensor(on_cpu).tolist()


def test_cli_runs_on_the_gpu(demo_root, tmp_path):
    from click.testing import CliRunner

    from ucad.cli.run import main

    args = ["--gpu", "0", "--seed", "0", "--epochs_num", "1", "--memory_size", "16", "--key_size", "16",
            "--basic_size", "32", "--log_group", "g", "--log_project", "p", "--save_patchcore_model", str(tmp_path),
            "ucad", "-b", "resnet18", "--weights", "random", "-le", "layer2", "-le", "layer3", "--patchsize", "3",
            "--pretrain_embed_dimension", "64", "--target_embed_dimension", "64", "--faiss_on_gpu",
            "dataset", "--resize", "64", "--imagesize", "64", "--batch_size", "4", "--num_workers", "1",
            "-d", "weave", "-d", "washer", "mvtec", str(demo_root)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "device: cuda:0" in result.output
    assert (tmp_path / "p" / "g_0" / "models" / "ucad_model.pt").is_file()
