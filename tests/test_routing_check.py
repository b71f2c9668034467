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
        assert all(0 <= t["routing_accuracy"] <= 1 and t["routing_margin"] >= 0 for t in r["per_task"].values())
        assert r["bytes_per_task"] == codes_and_codebook + (4 if r["routing"] == "calibrated" else 0)
    assert "kmeans / mean" in result.stdout and "worst" in result.stdout
