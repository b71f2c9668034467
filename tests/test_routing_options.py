"""--routing and --key_storage: what each routing rule compares, on hand-made cases, and end to end."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from test_cli import TINY, dataset, global_options, run
from ucad.config import LearningConfig, ModelConfig
from ucad.learning.task import learn_task
from ucad.model.coreset import CoresetSampler
from ucad.model.ucad_model import UcadModel
from ucad.runtime.timing import PhaseTimer
from ucad.config import ROUTINGS
from ucad.model.router import TaskKeyIndex, route, routing_scores, routing_statistics


def two_tasks():
    """A tight task A (keys at the origin, its normal patches at distance 1) and a wide task B (keys at (10, 0), its
    normal patches spread 5 around them), each image 4 patches of 2-d features."""
    keys_a, keys_b = torch.zeros(1, 2), torch.tensor([[10.0, 0.0]])
    ring = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    normal_a = ring[None].repeat(3, 1, 1)
    normal_b = keys_b + 5 * ring[None].repeat(3, 1, 1)
    return keys_a, keys_b, normal_a, normal_b


def scores_of(image, keys, normals, routing):
    distances = TaskKeyIndex(keys).distances(image)
    statistics = [routing_statistics(normal, k, routing) for k, normal in zip(keys, normals)]
    return torch.stack([routing_scores(distances[:, t], image, statistics[t], routing) for t in range(len(keys))],
                       dim=1)


def test_calibration_routes_right_where_the_mean_distance_routes_wrong():
    keys_a, keys_b, normal_a, normal_b = two_tasks()
    # an image of the wide task B whose patches lie 5.5 from B's keys: 4.5 from A's, yet 4.5^2 is far outside A's
    # normal distances (1) and 5.5^2 within B's (25)
    image = torch.tensor([[[4.5, 0.0]] * 4])
    assert route(scores_of(image, [keys_a, keys_b], [normal_a, normal_b], "mean")).item() == 0  # wrong: A
    calibrated = scores_of(image, [keys_a, keys_b], [normal_a, normal_b], "calibrated")
    assert route(calibrated).item() == 1  # right: B
    torch.testing.assert_close(calibrated, torch.tensor([[4.5 ** 2 / 1.0, 5.5 ** 2 / 25.0]]))


def test_mean_routing_is_the_plain_key_distance_and_keeps_nothing():
    keys_a, keys_b, normal_a, normal_b = two_tasks()
    assert routing_statistics(normal_a, keys_a, "mean") == {}
    image = torch.randn(2, 4, 2)
    torch.testing.assert_close(scores_of(image, [keys_a, keys_b], [normal_a, normal_b], "mean"),
                               TaskKeyIndex([keys_a, keys_b]).distances(image))


def test_gaussian_routing_compares_the_image_mean_feature_to_each_task():
    g = torch.Generator().manual_seed(0)
    normal_a = torch.randn(20, 6, 3, generator=g)  # image means near 0
    normal_b = torch.randn(20, 6, 3, generator=g) + torch.tensor([3.0, 0.0, 0.0])
    keys = [normal_a.reshape(-1, 3)[:4], normal_b.reshape(-1, 3)[:4]]
    images = torch.stack([torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g) + torch.tensor([3.0, 0, 0])])
    for routing in ("gaussian", "calibrated_gaussian"):
        assert route(scores_of(images, keys, [normal_a, normal_b], routing)).tolist() == [0, 1]
    statistics = routing_statistics(normal_a, keys[0], "gaussian")
    assert set(statistics) == {"image_mean", "image_variance", "image_distance_scale"}
    assert statistics["image_mean"].shape == (3,)


@pytest.mark.parametrize("routing", [r for r in ROUTINGS if r != "mean"])
def test_a_run_with_each_routing_stores_its_statistics_in_the_model(routing, demo_root, tmp_path):
    code, output = run(["--save_patchcore_model"] + global_options(tmp_path) + TINY
                       + ["--routing", routing, "--key_storage", "fp16"]
                       + dataset(demo_root, "weave", "washer")[:1] + ["--train_val_split", "0.75"]
                       + dataset(demo_root, "weave", "washer")[1:])
    assert code == 0, output
    run_dir = tmp_path / "p" / "g_0"
    from ucad.persistence.model_file import load_model

    model = load_model(run_dir / "models" / "ucad_model.pt", torch.device("cpu"))
    assert model.config.routing == routing and all(task.routing for task in model.tasks)
    assert all(task.packed_keys.storage == "fp16" for task in model.tasks)
    summary = json.loads((run_dir / "summary.json").read_text())
    routing_bytes = sum(v.numel() * v.element_size() for v in model.tasks[0].routing.values())
    assert summary["memory_bytes_per_task"]["weave"]["keys"] == 16 * 64 * 2 + routing_bytes


def test_pq_keys_keep_their_bytes_and_a_saved_model_routes_as_the_run(demo_root, tmp_path):
    options = global_options(tmp_path, epochs=0)
    options[options.index("--key_size") + 1] = "40"
    code, output = run(["--save_patchcore_model"] + options + TINY + ["--key_storage", "pq"]
                       + dataset(demo_root, "weave", "washer"))
    assert code == 0, output
    run_dir = tmp_path / "p" / "g_0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["memory_bytes_per_task"]["weave"]["keys"] == 40 * 8 + 8 * 256 * 8 * 2  # codes + fp16 codebook
    from ucad.evaluate import main as evaluate
    from ucad.persistence.model_file import load_model

    model = load_model(run_dir / "models" / "ucad_model.pt", torch.device("cpu"))
    for task in model.tasks:
        assert task.packed_keys.storage == "pq" and task.keys.shape == (40, 64)
        torch.testing.assert_close(task.keys, task.packed_keys.decode(), rtol=0, atol=0)
    from click.testing import CliRunner

    result = CliRunner().invoke(evaluate, ["--cpu", "--output_path", str(tmp_path / "ev"),
                                           str(run_dir / "models" / "ucad_model.pt"), "dataset", "--num_workers",
                                           "1", "mvtec", str(demo_root)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    routed = {r["image"]: r["routed_task"] for r in csv.DictReader(open(tmp_path / "ev" / "scores_per_image.csv"))}
    final = [r for r in csv.DictReader(open(run_dir / "scores_per_image.csv")) if r["phase"] == "1"]
    assert final and all(routed[r["image"]] == r["routed_task"] for r in final)


@pytest.mark.parametrize("held_out", [True, False], ids=["held_out_images", "training_images"])
def test_statistics_are_measured_at_the_precision_test_images_are_routed_at(held_out):
    """fp16, as UcadModel.frozen_features gives test images: the held-out images' frozen features, or the training
    features the keys come from rounded to it; fp32 statistics would be those of other features."""
    model = UcadModel(ModelConfig(backbone="resnet18", layers=("layer2", "layer3"), weights="random", imagesize=32,
                                  resize=32, pretrain_embed_dimension=16, target_embed_dimension=16,
                                  routing="calibrated_gaussian"), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    images, validation = (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g) for n in (6, 3))
    config = LearningConfig(memory_size=8, key_size=4, basic_size=0, train_prompt=False)
    memory, _ = learn_task(model, 0, "t", images, None, CoresetSampler(seed=0), config, PhaseTimer(),
                           validation if held_out else None)
    full = model.features(validation if held_out else images)
    for features, same in ((full.half(), True), (full, False)):
        scale = TaskKeyIndex([memory.keys]).distances(features)[:, 0].mean()
        mean = features.float().mean(dim=1).mean(dim=0)
        assert torch.equal(memory.routing["key_distance_scale"], scale) is same
        assert torch.equal(memory.routing["image_mean"], mean) is same
