"""ucad.model.knowledge: fp32 / fp16 / product-quantised knowledge, its bytes, and decoding without faiss."""
from __future__ import annotations

import pytest
import torch

from ucad.runtime.errors import UcadError
from ucad.model.knowledge import PQ_BITS, PQ_SUBVECTOR_DIM, VECTOR_DTYPES, PackedKnowledge, pack_knowledge

pytest.importorskip("faiss")

PAPER_BUDGET = 196 * 1024 * 4  # 784 KiB per task


def vectors_in_budget(storage: str, budget_bytes: int, dim: int) -> int:
    """How many knowledge vectors of `dim` fit in `budget_bytes` with this storage (codebook included)."""
    if storage in VECTOR_DTYPES:
        return budget_bytes // (VECTOR_DTYPES[storage].itemsize * dim)
    codebook = (dim // PQ_SUBVECTOR_DIM) * 2 ** PQ_BITS * PQ_SUBVECTOR_DIM * 2
    return max(0, (budget_bytes - codebook) // (dim // PQ_SUBVECTOR_DIM))


def features(n=3000, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # low-rank structure plus noise, as patch features have
    return torch.randn(n, 8, generator=g) @ torch.randn(8, dim, generator=g) + 0.1 * torch.randn(n, dim, generator=g)


def test_budget_of_the_paper_fits_2x_fp16_and_about_10x_pq_vectors():
    assert vectors_in_budget("fp32", PAPER_BUDGET, 1024) == 196
    assert vectors_in_budget("fp16", PAPER_BUDGET, 1024) == 392
    assert 2000 <= vectors_in_budget("pq", PAPER_BUDGET, 1024) <= 2200  # 128 B codes + a 512 KiB fp16 codebook


def test_fp32_and_fp16_store_the_vectors():
    x = features()
    assert torch.equal(pack_knowledge(x[:50], "fp32").decode(), x[:50])
    half = pack_knowledge(x[:50], "fp16")
    assert half.nbytes == 50 * 64 * 2
    torch.testing.assert_close(half.decode(), x[:50], atol=1e-2, rtol=1e-3)


def test_pq_codes_reconstruct_closely_and_count_their_bytes():
    x = features()
    packed = pack_knowledge(x[:500], "pq", training=x, seed=0)
    assert packed.codes.shape == (500, 8) and packed.codes.dtype == torch.uint8
    assert packed.codebook.shape == (8, 256, 8) and packed.codebook.dtype == torch.float16
    assert packed.nbytes == 500 * 8 + 8 * 256 * 8 * 2
    decoded = packed.decode()
    relative_error = (decoded - x[:500]).norm(dim=1) / x[:500].norm(dim=1)
    assert relative_error.mean() < 0.5  # one bit per dimension on this unstructured toy data
    # each vector is still recognisably itself: its reconstruction is its nearest stored vector
    assert (torch.cdist(x[:500], decoded).argmin(dim=1) == torch.arange(500)).float().mean() > 0.9
    # the nearest neighbour of a query among PQ vectors equals the search against their reconstruction (ADC)
    assert torch.equal(pack_knowledge(x[:500], "pq", training=x, seed=0).codes, packed.codes)  # seeded


def test_packed_state_round_trips_and_decodes_with_torch_only():
    x = features()
    packed = pack_knowledge(x[:100], "pq", training=x, seed=1)
    again = PackedKnowledge.from_state(packed.state())
    assert torch.equal(again.decode(), packed.decode())
    assert set(packed.state()) == {"storage", "codes", "codebook"}


def test_pq_needs_a_dimension_its_subvectors_divide():
    with pytest.raises(UcadError, match="target_embed_dimension"):
        pack_knowledge(torch.randn(10, 60), "pq")
    with pytest.raises(UcadError, match="only 100"):
        pack_knowledge(torch.randn(100, 64), "pq")
    with pytest.raises(UcadError, match="^--key_storage pq learns 256 centroids"):  # keys name their own option
        pack_knowledge(torch.randn(100, 64), "pq", option="--key_storage")


def test_a_run_reports_bytes_and_saves_pq_knowledge_that_reloads(demo_root, tmp_path):
    import json

    from click.testing import CliRunner

    from ucad.cli.run import main
    from ucad.persistence.model_file import load_model

    result = CliRunner().invoke(main, [
        "--cpu", "--epochs_num", "0", "--memory_size", "40", "--key_size", "8", "--basic_size", "0",
        "--save_patchcore_model", "--log_group", "g", "--log_project", "p", str(tmp_path),
        "ucad", "-b", "resnet18", "--weights", "random", "--pretrain_embed_dimension", "64",
        "--target_embed_dimension", "64", "--knowledge_storage", "pq", "--no_scl",
        "dataset", "--resize", "64", "--imagesize", "64", "--num_workers", "1", "-d", "weave", "mvtec",
        str(demo_root)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "knowledge 33,088 as pq" in result.output  # 40 x 8 code bytes + the 8 x 256 x 8 fp16 codebook
    run_dir = tmp_path / "p" / "g_0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["memory_bytes_per_task"]["weave"]["knowledge"] == 33088
    model = load_model(run_dir / "models" / "ucad_model.pt", torch.device("cpu"), weights="random")
    assert model.tasks[0].packed.storage == "pq" and model.tasks[0].knowledge.shape == (40, 64)
