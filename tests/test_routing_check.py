"""benchmarks/routing_check.py: the routing of a run's last phase, for every key storage, routing rule and seed."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_cli import dataset, global_options, run

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "routing_check.py"
RANDOM_RESNET = ["--backbone", "resnet18", "--weights", "random", "-le", "layer2", "-le", "layer3", "--imagesize", "64"]


def routing_check(tmp_path, *options: str) -> tuple[list[dict], str]:
    out = tmp_path / "routing.json"
    result = subprocess.run([sys.executable, str(SCRIPT), *RANDOM_RESNET, "--cpu", "--json", str(out), *options],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text()), result.stdout


def picture(kind: str, seed: int) -> Image.Image:
    """'dark': faint noise near black; 'stripes': black and white vertical bars, each with a little noise."""
    noise = np.random.default_rng(seed).integers(0, 20, (64, 64, 3))
    base = np.zeros((64, 64, 3)) if kind == "dark" else np.repeat((np.arange(64) // 4 % 2 * 230)[None, :, None], 64,
                                                                  axis=0).repeat(3, axis=2)
    return Image.fromarray((base + noise).astype(np.uint8))


@pytest.fixture
def two_kinds(tmp_path) -> Path:
    """Task 'dark' and task 'stripes', 5 training images each; dark's test set holds one striped image (stray.png)."""
    root = tmp_path / "kinds"
    seed = 0
    for task in ("dark", "stripes"):
        for folder, count in (("train", 5), ("test", 4)):
            (root / task / folder / "good").mkdir(parents=True)
            for i in range(count):
                kind = "stripes" if (task, folder, i) == ("dark", "test", 3) else task
                name = "stray" if kind != task else f"{i:03d}"
                seed += 1
                picture(kind, seed).save(root / task / folder / "good" / f"{name}.png")
    return root


def test_routing_check_gives_exact_figures_and_bytes_per_task_of_pq_keys(two_kinds, tmp_path):
    results, stdout = routing_check(tmp_path, "--data", str(two_kinds), "-d", "dark", "-d", "stripes",
                                    "--train_val_split", "0.8", "--key_size", "40", "--key_storage", "pq",
                                    "--routings", "mean,calibrated", "--seeds", "0,1")
    assert sorted((r["seed"], r["routing"]) for r in results) == [(0, "calibrated"), (0, "mean"), (1, "calibrated"),
                                                                   (1, "mean")]
    stray = str(two_kinds / "dark" / "test" / "good" / "stray.png")
    codes_and_codebook = 40 * 128 + 128 * 256 * 8 * 2  # 1024-d: 128 one-byte codes per key, an fp16 codebook
    for r in results:
        dark, stripes = r["per_task"]["dark"], r["per_task"]["stripes"]
        assert (dark["routing_accuracy"], dark["misrouted"]) == (0.75, {stray: "stripes"})
        assert (stripes["routing_accuracy"], stripes["misrouted"]) == (1.0, {})
        assert dark["routing_margin"] > 0 and stripes["routing_margin"] > 0
        assert r["bytes_per_task"] == codes_and_codebook + (4 if r["routing"] == "calibrated" else 0)
    for routing in ("mean", "calibrated"):
        assert f"kmeans / {routing}" in stdout
    for name, accuracy in (("mean", "0.875 ± 0.000"), ("worst", "0.750 ± 0.000")):  # a row per routing rule
        assert stdout.count(f"| {name:<7} | {accuracy:>15} |") == 2
    assert f"  4 x -> stripes: {stray}" in stdout
    for r in results:  # a route to trust or not for every test image, from the held-out image of each task
        assert sum(row["images"] for row in r["per_task"].values()) == 8
        assert 0 <= sum(row["untrusted"] for row in r["per_task"].values()) <= 8
    assert stdout.count("routes not trusted") == 4  # a line per seed and rule


def test_routing_check_routes_as_the_run_with_the_same_settings(demo_root, tmp_path):
    """The run's split, keys, calibration on held-out images and test-time routing: the check's figures are those
    of the run's last phase."""
    code, output = run(global_options(tmp_path, epochs=0) + ["ucad", "-b", "resnet18", *RANDOM_RESNET[2:-2],
                                                             "--routing", "calibrated"]
                       + dataset(demo_root, "weave", "washer")[:1] + ["--train_val_split", "0.75"]
                       + dataset(demo_root, "weave", "washer")[1:])
    assert code == 0, output
    run_dir = tmp_path / "p" / "g_0"
    [result], _ = routing_check(tmp_path, "--data", str(demo_root), "-d", "weave", "-d", "washer",
                                "--resize_mode", "crop", "--key_size", "16", "--train_val_split", "0.75",
                                "--routings", "calibrated", "--auroc_cost", "--memory_size", "16")
    every = list(csv.DictReader(open(run_dir / "results_per_task.csv")))
    rows = [r for r in every if r["variant"] == "task_agnostic"]
    assert len(rows) == 2
    for row in rows:
        figures = result["per_task"][row["task"]]
        assert figures["routing_accuracy"] == pytest.approx(float(row["routing_accuracy"]), abs=1e-9)
        assert figures["routing_margin"] == pytest.approx(float(row["routing_margin"]), rel=1e-5)
        oracle = next(r for r in every if r["variant"] == "oracle" and r["task"] == row["task"])
        assert figures["oracle_image_auroc"] == pytest.approx(float(oracle["image_auroc"]), abs=1e-3)
        assert figures["auroc_cost"] == pytest.approx(float(oracle["image_auroc"]) - float(row["image_auroc"]),
                                                      abs=1e-3)
    images = [r for r in csv.DictReader(open(run_dir / "scores_per_image.csv")) if r["phase"] == "1"]
    misrouted = {r["image"]: r["routed_task"] for r in images if r["routed_task"] != r["test_set"]}
    assert misrouted == {**result["per_task"]["weave"]["misrouted"], **result["per_task"]["washer"]["misrouted"]}


def test_routing_check_lists_the_images_it_routes_wrong(demo_root, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "weave").symlink_to(demo_root / "weave")
    (data / "weave_twin").symlink_to(demo_root / "weave")  # the same images: a twin product no rule can tell apart
    results, stdout = routing_check(tmp_path, "--data", str(data), "-d", "weave", "-d", "weave_twin",
                                    "--key_size", "8")
    per_task = results[0]["per_task"]
    misrouted = {**per_task["weave"]["misrouted"], **per_task["weave_twin"]["misrouted"]}
    # each image lies in both test sets and goes to one twin: it is misrouted exactly once
    assert len(misrouted) == len(list((demo_root / "weave" / "test").rglob("*.png")))
    assert "misrouted test images (of 1 runs" in stdout
    for image, task in per_task["weave"]["misrouted"].items():
        assert task == "weave_twin" and f"  1 x -> weave_twin: {image}" in stdout
