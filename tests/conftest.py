"""Shared fixtures: a small demo data set with offline structure maps, made once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segment_anything_prep.make_structure_maps import make_structure_maps
from ucad.demo.data import generate_demo_dataset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: without one they are skipped, saying why."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """3 demo products at 64 px, 6 training and 4+4+4 test images each, with Felzenszwalb structure maps."""
    root = tmp_path_factory.mktemp("demo") / "demo_data"
    generate_demo_dataset(root, categories=["weave", "washer", "pcb_chip"], seed=0, image_size=64, n_train=6,
                          n_test_good=4, n_test_defect=4)
    make_structure_maps(root, method="felzenszwalb", progress=False, log=lambda *a, **k: None)
    return root
