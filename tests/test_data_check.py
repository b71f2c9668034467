"""ucad.data.check: every image, mask and structure map of every task is opened before the first task trains,
and every problem is reported at once."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segment_anything_prep.label_maps import save_structure_map
import ucad.continual.experiment
from ucad.cli.run import main
from ucad.data.check import MAX_LISTED_PROBLEMS, check_data, relation_of_sizes
from ucad.data.layouts import list_tasks
from ucad.runtime.errors import UcadError
from ucad.data.structure_maps import default_structure_root

TINY = ["ucad", "-b", "resnet18", "--weights", "random", "-le", "layer2", "-le", "layer3", "--patchsize", "1",
        "--pretrain_embed_dimension", "32", "--target_embed_dimension", "32"]


def write_picture(path: Path, size=(40, 30), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def write_mask(path: Path, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0]), np.uint8)
    array[: size[1] // 2, : size[0] // 2] = 255
    Image.fromarray(array).save(path)
    return path


def two_regions(size=(40, 30)) -> np.ndarray:
    labels = np.ones((size[1], size[0]), np.int32)
    labels[:, size[0] // 2:] = 2
    return labels


def make_tree(root: Path, categories=("bottle", "cable"), size=(40, 30)) -> Path:
    """MVTec layout, 3 train / 1 good / 2 crack test images per category, with two-region structure maps."""
    maps = default_structure_root(root)
    for c, category in enumerate(categories):
        for i in range(3):
            write_picture(root / category / "train" / "good" / f"{i:03d}.png", size, seed=10 * c + i)
            save_structure_map(maps / category / "train" / "good" / f"{i:03d}.png", two_regions(size))
        write_picture(root / category / "test" / "good" / "000.png", size, seed=50)
        for i in range(2):
            write_picture(root / category / "test" / "crack" / f"{i:03d}.png", size, seed=60 + i)
            write_mask(root / category / "ground_truth" / "crack" / f"{i:03d}_mask.png", size)
    return root


def check(root: Path, with_maps: bool = True) -> list[str]:
    tasks = list_tasks("mvtec", root, [])
    return check_data(tasks, default_structure_root(root) if with_maps else None, workers=2, show=False)


def test_relation_of_sizes():
    assert relation_of_sizes((40, 30), (40, 30)) == "same"
    assert relation_of_sizes((40, 30), (20, 15)) == "scaled"
    assert relation_of_sizes((1001, 601), (500, 300)) == "scaled"  # a pixel of rounding
    assert relation_of_sizes((40, 30), (30, 40)) == "different"  # rotated
    assert relation_of_sizes((40, 30), (40, 40)) == "different"
    assert relation_of_sizes((40, 30), (40, 29)) == "different"  # one pixel short is not a scaled copy


def test_clean_data_passes_silently(tmp_path):
    assert check(make_tree(tmp_path / "data")) == []


def test_every_problem_of_every_task_is_reported_at_once(tmp_path):
    root = make_tree(tmp_path / "data")
    empty = root / "cable" / "test" / "good" / "000.png"
    empty.write_bytes(b"")  # the zero-byte image in the last task's test set
    truncated = root / "bottle" / "train" / "good" / "001.png"
    truncated.write_bytes(truncated.read_bytes()[:200])
    wide_mask = write_mask(root / "bottle" / "ground_truth" / "crack" / "001_mask.png", size=(40, 20))
    with pytest.raises(UcadError) as info:
        check(root)
    message = str(info.value)
    assert message.startswith("3 problem(s) in the data, found before training")
    assert f"image '{empty}' is empty (0 bytes)" in message
    assert f"image '{truncated}' cannot be read" in message
    assert f"mask '{wide_mask}' is 40x20 but its image '{root / 'bottle' / 'test' / 'crack' / '001.png'}' is " \
           "40x30" in message


def test_at_most_20_problems_are_listed_then_counted(tmp_path):
    root = make_tree(tmp_path / "data")
    for i in range(25):
        (root / "cable" / "test" / "good" / f"{100 + i}.png").write_bytes(b"")
    with pytest.raises(UcadError) as info:
        check(root)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("25 problem(s)")
    assert len(lines) == 1 + MAX_LISTED_PROBLEMS + 1 and lines[-1].strip() == "... and 5 more"


def test_scaled_masks_and_maps_are_resized_with_one_note_per_task(tmp_path):
    root = make_tree(tmp_path / "data")
    for i in range(2):
        write_mask(root / "bottle" / "ground_truth" / "crack" / f"{i:03d}_mask.png", size=(80, 60))
    save_structure_map(default_structure_root(root) / "cable" / "train" / "good" / "000.png", two_regions((20, 15)))
    notes = check(root)
    assert len(notes) == 2
    assert notes[0].startswith("note: task 'bottle': 2 mask(s) are a scaled copy of their image's size")
    assert "80x60 for 40x30" in notes[0]
    assert notes[1].startswith("note: task 'cable': 1 structure map(s) are a scaled copy")


def test_structure_map_of_another_shape_names_both_files(tmp_path):
    root = make_tree(tmp_path / "data")
    bad = save_structure_map(default_structure_root(root) / "cable" / "train" / "good" / "002.png",
                             two_regions((30, 40)))
    with pytest.raises(UcadError) as info:
        check(root)
    assert f"structure map '{bad}' is 30x40 but its image '{root / 'cable' / 'train' / 'good' / '002.png'}' " \
           "is 40x30" in str(info.value)
    assert "make_structure_maps.py --overwrite" in str(info.value)


def test_maps_with_fewer_than_two_regions_warn_once_or_fail_the_task(tmp_path):
    root = make_tree(tmp_path / "data")
    maps = default_structure_root(root)
    save_structure_map(maps / "bottle" / "train" / "good" / "000.png", np.zeros((30, 40), np.int32))
    save_structure_map(maps / "bottle" / "train" / "good" / "001.png", np.full((30, 40), 7, np.int32))
    notes = check(root)
    assert notes == [f"warning: task 'bottle': 2 of 3 structure maps have fewer than 2 regions (label 0 = no region), "
                     f"e.g. '{maps / 'bottle' / 'train' / 'good' / '000.png'}'; those images take no part in prompt "
                     "training (SCL)"]
    save_structure_map(maps / "bottle" / "train" / "good" / "002.png", np.zeros((30, 40), np.int32))
    with pytest.raises(UcadError, match="task 'bottle': every structure map \\(3\\) has fewer than 2 regions"):
        check(root)
    assert check(root, with_maps=False) == []  # --no_scl needs no maps


def test_missing_maps_are_one_line_with_the_way_to_make_them(tmp_path):
    root = make_tree(tmp_path / "data")
    shutil.rmtree(default_structure_root(root) / "cable")
    with pytest.raises(UcadError) as info:
        check(root)
    assert "3 structure map(s) missing under" in str(info.value) and "--no_scl" in str(info.value)


def test_a_bad_file_in_the_last_task_stops_the_run_before_the_first_task_trains(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "data")
    (root / "cable" / "test" / "crack" / "001.png").write_bytes(b"")

    def never(*args, **kwargs):
        raise AssertionError("a task was trained although the data has a problem")

    monkeypatch.setattr(ucad.continual.experiment, "learn_task", never)
    monkeypatch.setattr(ucad.continual.experiment, "UcadModel", never)  # not even the backbone is built
    result = CliRunner().invoke(main, ["--cpu", "--log_project", "p", str(tmp_path / "results")] + TINY
                                + ["dataset", "--resize", "32", "--imagesize", "32", "mvtec", str(root)])
    assert result.exit_code == 2, result.output
    assert "error: 1 problem(s) in the data, found before training" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "results" / "p").exists() or not any((tmp_path / "results" / "p").iterdir())


def test_real_magnetic_tile_data_passes_the_check():
    real = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"
    if not real.is_dir():
        pytest.skip(f"{real} not present")
    tasks = list_tasks("mvtec", real.parent, ["magnetic_tile"])
    assert check_data(tasks, None, workers=2, show=False) == []
