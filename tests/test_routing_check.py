"""benchmarks/routing_check.py: every key storage and routing rule compared on the same frozen features."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "routing_check.py"


def test_routing_check_reports_accuracy_margin_and_bytes_per_task_of_pq_keys(demo_root, tmp_path):
    out = tmp_path / "routing.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--data", str(demo_root), "-d", "weave", "-d", "washer",
                             "--backbone", "resnet18", "--weights", "random", "-le", "layer2", "-le", "layer3",
                             "--imagesize", "64", "--cpu", "--key_size", "40", "--key_storage", "pq",
                             "--routings", "mean,calibrated", "--seeds", "0,1", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(out.read_text())
    assert sorted((r["seed"], r["routing"]) for r in results) == [(0, "calibrated"), (0, "mean"), (1, "calibrated"),
                                                                   (1, "mean")]
    codes_and_codebook = 40 * 128 + 128 * 256 * 8 * 2  # 1024-d: 128 one-byte codes per key, an fp16 codebook
    for r in results:
        assert set(r["per_task"]) == {"weave", "washer"}
        for name, t in r["per_task"].items():
            assert 0 <= t["routing_accuracy"] <= 1 and t["routing_margin"] >= 0
            test_images = len(list((demo_root / name / "test").rglob("*.png")))
            assert len(t["misrouted"]) == round((1 - t["routing_accuracy"]) * test_images)
            assert all(f"/{name}/test/" in image and task != name for image, task in t["misrouted"].items())
        assert r["bytes_per_task"] == codes_and_codebook + (4 if r["routing"] == "calibrated" else 0)
    assert "kmeans / mean" in result.stdout and "worst" in result.stdout


def test_routing_check_lists_the_images_it_routes_wrong(demo_root, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "weave").symlink_to(demo_root / "weave")
    (data / "weave_twin").symlink_to(demo_root / "weave")  # the same images: a twin product no rule can tell apart
    out = tmp_path / "routing.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--data", str(data), "-d", "weave", "-d", "weave_twin",
                             "--backbone", "resnet18", "--weights", "random", "-le", "layer2", "-le", "layer3",
                             "--imagesize", "64", "--cpu", "--key_size", "8", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    per_task = json.loads(out.read_text())[0]["per_task"]
    misrouted = {**per_task["weave"]["misrouted"], **per_task["weave_twin"]["misrouted"]}
    # each image lies in both test sets and goes to one twin: it is misrouted exactly once
    assert len(misrouted) == len(list((demo_root / "weave" / "test").rglob("*.png")))
    assert "misrouted test images (of 1 runs" in result.stdout
    for image, task in per_task["weave"]["misrouted"].items():
        assert task == "weave_twin" and f"  1 x -> weave_twin: {image}" in result.stdout
