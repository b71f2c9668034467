"""One data-layout listing: the structure-map maker and the training run see the same files, and a layout is one
registration (the CLI's `dataset NAME` choices and the maker's detection come from the registry)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from segment_anything_prep.label_maps import detect_layout, find_images
from test_datasets import make_mvtec, make_visa, make_visa_converted, write_image
from ucad.cli.run import dataset_command
from ucad.data.layouts import LAYOUTS, DataLayout, Sample, TaskSamples, list_tasks, register_layout
from ucad.runtime.errors import UcadError


def training_images(name: str, root: Path, split: float = 1.0) -> list[Path]:
    tasks = list_tasks(name, root, [], split, seed=0)
    return sorted((s.image_path for t in tasks for s in t.train + t.validation), key=str)


@pytest.mark.parametrize("layout, make", [("mvtec", make_mvtec), ("visa", make_visa), ("visa", make_visa_converted)])
def test_the_maker_maps_exactly_the_images_a_run_trains_on(tmp_path, layout, make):
    root = make(tmp_path / "data")
    # files that are no data: macOS resource forks and hidden folders, wherever they are
    for image in list(root.rglob("*.png")) + list(root.rglob("*.JPG")):
        (image.parent / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / ".Trash" / "train" / "good").mkdir(parents=True)
    write_image(root / ".Trash" / "train" / "good" / "000.png")
    assert detect_layout(root) == layout or (layout == "visa" and detect_layout(root) == "mvtec")
    assert find_images(root) == training_images(layout, root)
    # held-out images (--train_val_split) have maps too: they come from the same training folders
    assert find_images(root) == training_images(layout, root, split=0.5)
    with_test = find_images(root, include_test=True)
    tasks = list_tasks(layout, root, [])
    assert with_test == sorted((s.image_path for t in tasks for s in t.train + t.test), key=str)


def test_visa_without_its_split_file_is_refused_by_both_alike(tmp_path):
    """Once the maker mapped every Normal image of such a folder while the run refused it."""
    root = make_visa(tmp_path / "visa")
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(UcadError, match="split_csv/1cls.csv") as run_error:
        list_tasks("visa", root, [])
    with pytest.raises(UcadError, match="split_csv/1cls.csv") as maker_error:
        find_images(root)
    assert str(run_error.value) == str(maker_error.value)


def test_the_maker_does_not_need_test_masks(tmp_path):
    """Maps are for training images: a test mask missing (which the run refuses) does not stop the maker."""
    root = make_mvtec(tmp_path / "mvtec")
    next(root.rglob("*_mask.png")).unlink()
    with pytest.raises(UcadError, match="has no mask"):
        list_tasks("mvtec", root, [])
    assert len(find_images(root, include_test=True)) == 8


def test_dataset_choices_are_the_registered_layouts():
    name = next(p for p in dataset_command.params if p.name == "name")
    assert tuple(name.type.choices) == tuple(LAYOUTS) == ("mvtec", "visa")


def test_a_new_layout_is_one_registration(tmp_path, monkeypatch):
    """A flat layout (ROOT/<category>/normal/*.png, test images in ROOT/<category>/check/*.png), registered once:
    the run lists it by name and the maker recognises it."""
    monkeypatch.setattr("ucad.data.layouts.LAYOUTS", dict(LAYOUTS))  # the registration ends with the test
    root = tmp_path / "flat"
    for i in range(3):
        write_image(root / "tiles" / "normal" / f"{i}.png", seed=i)
    write_image(root / "tiles" / "check" / "0.png", seed=9)

    def list_flat(data_root: Path, category: str, need_masks: bool = True) -> TaskSamples:
        folder = data_root / category
        train = [Sample(p, None, False, "good") for p in sorted((folder / "normal").glob("*.png"))]
        test = [Sample(p, None, False, "good") for p in sorted((folder / "check").glob("*.png"))]
        return TaskSamples(category, data_root, train, test)

    register_layout(DataLayout("flat", "a flat layout (ROOT/<category>/normal/*.png)",
                               lambda r: any((p / "normal").is_dir() for p in r.iterdir()),
                               lambda r: sorted(p.name for p in r.iterdir() if (p / "normal").is_dir()), list_flat))
    assert detect_layout(root) == "flat"
    assert [t.category for t in list_tasks("flat", root, [])] == ["tiles"]
    assert find_images(root) == sorted((root / "tiles" / "normal").glob("*.png"))
    shutil.rmtree(root / "tiles")
    with pytest.raises(UcadError, match="flat layout"):  # the registry's descriptions make the hint
        find_images(root)
