"""ucad.model.knowledge: every knowledge storage, its bytes against the paper's budget, its stored form, and decoding
without faiss."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch

from ucad.config import KNOWLEDGE_STORAGES
from ucad.model.knowledge import PCA_DIM, PackedKnowledge, pack_knowledge, vectors_in_budget
from ucad.model.nearest_neighbor import NearestNeighbourScorer
from ucad.model.task_memory import TaskMemory
from ucad.runtime.errors import UcadError

faiss = pytest.importorskip("faiss")

PAPER_BUDGET = 196 * 1024 * 4  # 784 KiB per task


def features(n=3000, dim=64, seed=0, rank=8):
    g = torch.Generator().manual_seed(seed)
    # low-rank structure plus noise, as patch features have
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, dim, generator=g) + 0.1 * torch.randn(n, dim,
                                                                                                      generator=g)


def test_the_papers_budget_in_vectors_of_each_storage():
    fits = {storage: vectors_in_budget(storage, 1024) for storage in KNOWLEDGE_STORAGES}
    # codebooks and principal directions come out of the budget: sq8 keeps 8 KiB of levels, pq a 512 KiB codebook,
    # pca_ 129 x 1024 fp16 (258 KiB) of directions and centre
    assert fits == {"fp32": 196, "fp16": 392, "sq8": 776, "pq": 2176, "pq_kept": 2176, "pca_fp16": 2104,
                    "pca_sq8": 4200}
    assert vectors_in_budget("pca_pq", 1024) == 29568  # PQ codes of the coefficients: 16 bytes a vector
    assert vectors_in_budget("fp32", 1024, budget=PAPER_BUDGET) == 196
    assert vectors_in_budget("pq", 64) == 2176  # budget and codebook both scale with the dimension


@pytest.mark.parametrize("storage", [*KNOWLEDGE_STORAGES, "pca_pq"])
def test_each_storage_fills_its_budget_and_no_more(storage):
    x, budget, reduced = features(20_000, dim=128, rank=16), 100_000, 32
    size = vectors_in_budget(storage, 128, budget, reduced_dim=reduced)
    packed = pack_knowledge(x[:size], storage, training=x, seed=0, reduced_dim=reduced)
    one_more = pack_knowledge(x[:size + 1], storage, training=x, seed=0, reduced_dim=reduced)
    assert packed.nbytes <= budget < one_more.nbytes
    assert packed.decode().shape == (size, 128) and packed.decode().dtype == torch.float32


def test_fp32_and_fp16_store_the_vectors():
    x = features()
    assert torch.equal(pack_knowledge(x[:50], "fp32").decode(), x[:50])
    half = pack_knowledge(x[:50], "fp16")
    assert half.nbytes == 50 * 64 * 2
    torch.testing.assert_close(half.decode(), x[:50], atol=1e-2, rtol=1e-3)


def test_sq8_decodes_in_torch_as_faiss_does():
    x = features()
    packed = pack_knowledge(x[:500], "sq8")
    assert packed.codes.shape == (500, 64) and packed.codes.dtype == torch.uint8 and packed.codebook.shape == (2, 64)
    quantiser = faiss.ScalarQuantizer(64, faiss.ScalarQuantizer.QT_8bit)
    quantiser.train(x[:500].numpy())
    np.testing.assert_array_equal(packed.codes.numpy(), quantiser.compute_codes(x[:500].numpy()))
    np.testing.assert_allclose(packed.decode().numpy(), quantiser.decode(packed.codes.numpy()), rtol=1e-6,
                               atol=1e-5)
    # half a level of each dimension's range at most
    span = x[:500].max(dim=0).values - x[:500].min(dim=0).values
    assert ((packed.decode() - x[:500]).abs() <= span / 255 * 0.5 + 1e-5).all()


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
    assert torch.equal(pack_knowledge(x[:500], "pq", training=x, seed=0).codes, packed.codes)  # seeded


def test_pq_kept_fits_its_codebook_to_the_outlying_vectors_a_coreset_keeps(capfd):
    from ucad.model.coreset import CoresetSampler

    x = features(20_000, dim=64, rank=8)
    kept = CoresetSampler("greedy_coreset", seed=0).subsample(x, 600)  # the most outlying patches

    def error(storage):
        return float(((pack_knowledge(kept, storage, training=x, seed=0).decode() - kept) ** 2).sum())

    assert error("pq_kept") < 0.8 * error("pq")
    assert "WARNING" not in capfd.readouterr().err  # 600 points for 256 centroids is meant, not warned about
    packed = pack_knowledge(kept, "pq_kept", training=x, seed=0)
    assert packed.nbytes == pack_knowledge(kept, "pq", training=x, seed=0).nbytes == 600 * 8 + 8 * 256 * 8 * 2
    # fewer kept vectors than a sub-space's 256 centroids: the codebook is learned from the task's patches, as pq's
    assert torch.equal(pack_knowledge(kept[:100], "pq_kept", training=x, seed=0).codes,
                       pack_knowledge(kept[:100], "pq", training=x, seed=0).codes)


@pytest.mark.parametrize("storage", ["pca_fp16", "pca_sq8", "pca_pq"])
def test_projected_vectors_decode_to_full_size_within_the_tasks_principal_subspace(storage):
    x = features(dim=256, rank=16)
    packed = pack_knowledge(x[:400], storage, training=x, seed=0, reduced_dim=32)
    assert packed.basis.shape == (32, 256) and packed.centre.shape == (256,)
    assert packed.basis.dtype == packed.centre.dtype == torch.float16
    decoded = packed.decode()
    relative_error = (decoded - x[:400]).norm(dim=1) / x[:400].norm(dim=1)
    # 16-d structure in 32 directions: nearly exact in fp16 or sq8; pca_pq keeps only 4 one-byte codes per vector
    assert relative_error.mean() < (0.6 if storage == "pca_pq" else 0.05)
    basis, centre = packed.basis.float(), packed.centre.float()
    offsets = decoded - centre
    outside = offsets - offsets @ torch.linalg.pinv(basis) @ basis
    assert outside.norm(dim=1).max() < 1e-3 * offsets.norm(dim=1).max()
    # a query's part outside the subspace still counts: its distance to every stored vector is at least that part
    query = x[:1] + 5.0 * torch.linalg.svd(basis, full_matrices=True).Vh[-1:]
    assert torch.cdist(query, decoded).min() >= 5.0 * 0.99


def test_projected_storage_names_the_dimension_it_needs():
    with pytest.raises(UcadError, match=f"--knowledge_storage pca_sq8 keeps {PCA_DIM} principal directions.*"
                                        "larger --target_embed_dimension than 64"):
        pack_knowledge(features(), "pca_sq8")


@pytest.mark.parametrize("storage", [*KNOWLEDGE_STORAGES, "pca_pq"])
def test_the_stored_form_reloads_to_the_same_scores_with_torch_only(storage):
    x = features(dim=256, rank=16)
    packed = pack_knowledge(x[:300], storage, training=x, seed=1, reduced_dim=32)
    memory = TaskMemory("t", x[:4], None, packed.decode(), packed=packed if storage != "fp32" else None)
    buffer = io.BytesIO()
    torch.save(memory.to_state(), buffer)
    buffer.seek(0)
    again = TaskMemory.from_state(torch.load(buffer, weights_only=True))
    assert again.memory_bytes()["knowledge"] == memory.memory_bytes()["knowledge"] == packed.nbytes
    queries = features(200, dim=256, seed=2, rank=16)
    scorer = NearestNeighbourScorer(backend="torch")
    assert torch.equal(scorer.distances(queries, again.knowledge), scorer.distances(queries, memory.knowledge))
    assert set(packed.state()) <= {"storage", "vectors", "codes", "codebook", "basis", "centre"}


def test_packed_state_round_trips():
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


# 6 images of 16 x 16 patches at 256-d; what fills 196 x 256 fp32 = 200,704 B: pca_sq8 keeps 129 x 256 fp16
# directions and centre, 2 x 128 fp32 levels and 1044 x 128 codes; pq_kept keeps every one of the 1536 patches
# (32 one-byte codes each) and a 32 x 256 x 8 fp16 codebook learned from them
@pytest.mark.parametrize("storage, kept, stored_bytes", [("pca_sq8", 1044, 200_704),
                                                         ("pq_kept", 1536, 1536 * 32 + 32 * 256 * 8 * 2)])
def test_a_run_fills_the_budget_reports_its_bytes_and_predict_scores_as_the_run(demo_root, tmp_path, storage, kept,
                                                                               stored_bytes):
    from click.testing import CliRunner

    from ucad.cli.run import main
    from ucad.persistence.model_file import load_model
    from ucad.predict import main as predict

    result = CliRunner().invoke(main, [
        "--cpu", "--epochs_num", "0", "--memory_size", "0", "--key_size", "8", "--basic_size", "0",
        "--save_patchcore_model", "--log_group", "g", "--log_project", "p", str(tmp_path),
        "ucad", "-b", "resnet18", "--weights", "random", "--pretrain_embed_dimension", "256",
        "--target_embed_dimension", "256", "--knowledge_storage", storage, "--no_scl",
        "dataset", "--resize", "128", "--imagesize", "128", "--num_workers", "1", "-d", "weave", "mvtec",
        str(demo_root)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"knowledge {stored_bytes:,} as {storage}" in result.output
    run_dir = tmp_path / "p" / "g_0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["memory_bytes_per_task"]["weave"]["knowledge"] == stored_bytes
    model = load_model(run_dir / "models" / "ucad_model.pt", torch.device("cpu"), weights="random")
    assert model.tasks[0].packed.storage == storage and model.tasks[0].knowledge.shape == (kept, 256)
    folder = demo_root / "weave" / "test"
    predicted = CliRunner().invoke(predict, [str(run_dir / "models" / "ucad_model.pt"), str(folder),
                                             str(tmp_path / "out"), "--cpu", "--no_pictures"], catch_exceptions=False)
    assert predicted.exit_code == 0, predicted.output
    scores = {str(folder / r["image"]): float(r["score"])
              for r in csv.DictReader(open(tmp_path / "out" / "predictions.csv"))}
    evaluated = {r["image"]: float(r["image_score"]) for r in csv.DictReader(open(run_dir / "scores_per_image.csv"))}
    assert set(scores) == set(evaluated) and len(scores) == 12  # 4 good and 2 x 4 defect images
    for image, score in evaluated.items():
        assert scores[image] == pytest.approx(score, abs=1e-5)


def test_the_budget_instrument_scores_a_storage_as_a_no_scl_run_does(demo_root, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    from ucad.cli.run import main

    network = ["-b", "resnet18", "--weights", "random", "-le", "layer2", "-le", "layer3"]
    result = CliRunner().invoke(main, [
        "--cpu", "--epochs_num", "0", "--memory_size", "16", "--key_size", "8", "--basic_size", "0", "--log_group",
        "g", "--log_project", "p", str(tmp_path), "ucad", *network, "--no_scl", "dataset", "--resize", "64",
        "--imagesize", "64", "--resize_mode", "square", "--num_workers", "1", "-d", "weave", "mvtec", str(demo_root)],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    oracle = next(r for r in csv.DictReader(open(tmp_path / "p" / "g_0" / "results_per_task.csv"))
                  if r["variant"] == "oracle")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "knowledge_budget.py"
    out = tmp_path / "budget.json"
    measured = subprocess.run([sys.executable, str(script), "--data", str(demo_root), "-d", "weave",
                               "--backbone", "resnet18", "--weights", "random", "-le", "layer2", "-le", "layer3",
                               "--imagesize", "64", "--storages", "fp32:16,pq,pq_kept,fp32:pq", "--cpu", "--json",
                               str(out)],
                              capture_output=True, text=True, timeout=600)
    assert measured.returncode == 0, measured.stdout + measured.stderr
    rows = json.loads(out.read_text())
    assert rows["fp32:16"][0]["image_auroc"] == pytest.approx(float(oracle["image_auroc"]), abs=1e-12)
    assert rows["fp32:16"][0]["pixel_ap"] == pytest.approx(float(oracle["pixel_ap"]), abs=1e-9)
    assert rows["fp32:16"][0]["bytes"] == 16 * 1024 * 4
    # 6 images of 8 x 8 patches: fewer than the 2176 PQ vectors the budget holds, so pq keeps them all, as fp32:pq
    assert rows["pq:2176"][0]["vectors"] == rows["fp32:2176"][0]["vectors"] == 384
    assert rows["pq:2176"][0]["bytes"] == rows["pq_kept:2176"][0]["bytes"] == 384 * 128 + 128 * 256 * 8 * 2
    assert rows["fp32:16"][0]["quantisation_error"] == 0
    # kept vectors and training patches are the same 384 here, so both learn one codebook
    assert 0 < rows["pq_kept:2176"][0]["quantisation_error"] == rows["pq:2176"][0]["quantisation_error"]
