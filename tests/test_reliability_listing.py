"""Every file in the folder counted: images in sub-folders (batches) are taken, a dangling link, a repeated row of
VisA's split file and two images that would share a structure map or an output are errors naming them, and a
category typed in another Unicode normalisation than the folder's is found."""
from __future__ import annotations

import csv
import os
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segment_anything_prep.label_maps import find_images
from ucad.data.check import check_data
from ucad.data.layouts import list_tasks
from ucad.runtime.errors import UcadError


def write_image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(path)
    return path


def write_mask(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((12, 16), np.uint8)
    mask[2:6, 2:6] = 255
    Image.fromarray(mask).save(path)
    return path


def make_category(root: Path, name: str = "bottle") -> Path:
    """3 training images, 2 good and 2 crack test images with masks."""
    folder = root / name
    for i in range(3):
        write_image(folder / "train" / "good" / f"{i:03d}.png", i)
    for i in range(2):
        write_image(folder / "test" / "good" / f"{i:03d}.png", 10 + i)
        write_image(folder / "test" / "crack" / f"{i:03d}.png", 20 + i)
        write_mask(folder / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    return folder


def test_training_images_in_a_sub_folder_are_taken(tmp_path):
    folder = make_category(tmp_path)
    for i in range(4):
        write_image(folder / "train" / "good" / "batch2" / f"{i:03d}.png", 30 + i)
    write_image(folder / "train" / "good" / ".ipynb_checkpoints" / "000.png")  # hidden folders stay no data
    (task,) = list_tasks("mvtec", tmp_path, [])
    assert len(task.train) == 7
    assert folder / "train" / "good" / "batch2" / "003.png" in [s.image_path for s in task.train]
    assert len(find_images(tmp_path)) == 7  # the structure-map maker makes a map for each


def test_test_images_in_a_sub_folder_are_taken_with_their_masks(tmp_path):
    folder = make_category(tmp_path)
    write_image(folder / "test" / "crack" / "batch2" / "000.png", 40)
    write_mask(folder / "ground_truth" / "crack" / "batch2" / "000_mask.png")
    write_image(folder / "test" / "good" / "batch2" / "005.png", 41)
    (task,) = list_tasks("mvtec", tmp_path, [])
    assert len(task.test) == 6
    nested = next(s for s in task.test if s.image_path.parent.name == "batch2" and s.is_anomalous)
    assert nested.defect_type == "crack"
    assert nested.mask_path == folder / "ground_truth" / "crack" / "batch2" / "000_mask.png"
    (folder / "ground_truth" / "crack" / "batch2" / "000_mask.png").unlink()
    with pytest.raises(UcadError, match=r"batch2/000\.png' has no mask: expected '.*ground_truth/crack/batch2/"):
        list_tasks("mvtec", tmp_path, [])


@pytest.mark.parametrize("where", ["train/good", "test/crack"])
def test_a_dangling_link_is_a_data_check_error_naming_it(tmp_path, where):
    folder = make_category(tmp_path)
    link = folder / where / "007.png"
    os.symlink(tmp_path / "gone" / "007.png", link)
    if where == "test/crack":
        write_mask(folder / "ground_truth" / "crack" / "007_mask.png")
    tasks = list_tasks("mvtec", tmp_path, [])
    assert link in [s.image_path for s in tasks[0].train + tasks[0].test]
    with pytest.raises(UcadError, match=f"image '{link}' is a symbolic link to '{tmp_path / 'gone' / '007.png'}', "
                                        "which does not exist: fix or remove the link"):
        check_data(tasks, None, workers=1, show=False)


@pytest.mark.parametrize("where, meant", [("train", "train/good/"), ("test", "test/good/ (normal) or test/<defect")])
def test_an_image_outside_a_class_folder_or_a_dangling_folder_link_is_an_error(tmp_path, where, meant):
    folder = make_category(tmp_path)
    loose = write_image(folder / where / "000.png")
    with pytest.raises(UcadError, match=f"image '{loose}' lies in {where}/ itself, where no image is read: move it "
                                        f"into {re.escape(meant)}"):
        list_tasks("mvtec", tmp_path, [])
    loose.unlink()
    os.symlink(tmp_path / "elsewhere" / "scratch", folder / where / "scratch")
    with pytest.raises(UcadError, match="scratch', which does not exist: fix or remove the link"):
        list_tasks("mvtec", tmp_path, [])


def test_a_repeated_row_of_the_visa_split_file_names_the_line(tmp_path):
    rows = [["object", "split", "label", "image", "mask"]]
    for i in range(3):
        write_image(tmp_path / "candle" / "Data" / "Images" / "Normal" / f"{i:04d}.JPG", i)
        rows.append(["candle", "train", "normal", f"candle/Data/Images/Normal/{i:04d}.JPG", ""])
    write_image(tmp_path / "candle" / "Data" / "Images" / "Anomaly" / "0000.JPG", 9)
    write_mask(tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "0000.png")
    anomaly = ["candle", "test", "anomaly", "candle/Data/Images/Anomaly/0000.JPG",
               "candle/Data/Masks/Anomaly/0000.png"]
    (tmp_path / "split_csv").mkdir()
    for extra, line, first in (([anomaly, anomaly], 6, 5),  # the same row twice: scored twice
                               ([["candle", "test", "normal", rows[1][3], ""], anomaly], 5, 2)):  # train and test
        with open(tmp_path / "split_csv" / "1cls.csv", "w", newline="") as handle:
            csv.writer(handle).writerows(rows + extra)
        with pytest.raises(UcadError) as error:
            list_tasks("visa", tmp_path, ["candle"])
        image = extra[-1][3] if line == 6 else rows[1][3]
        assert f"line {line} repeats the image {image} of line {first}" in str(error.value)
        assert "remove one of the two rows" in str(error.value)


def test_two_images_with_one_stem_are_an_error_naming_both(tmp_path):
    folder = make_category(tmp_path)
    write_image(folder / "train" / "good" / "000.tif", 50)
    with pytest.raises(UcadError) as error:
        list_tasks("mvtec", tmp_path, [])
    message = str(error.value)
    train = folder / "train" / "good"
    assert str(train / "000.png") in message and str(train / "000.tif") in message
    assert "share one structure map" in message


def test_two_test_images_with_one_output_name_are_an_error(tmp_path):
    folder = make_category(tmp_path)
    write_image(folder / "test" / "good" / "batch1" / "000.png", 60)
    write_image(folder / "test" / "crack" / "batch1" / "000.png", 61)
    write_mask(folder / "ground_truth" / "crack" / "batch1" / "000_mask.png")
    with pytest.raises(UcadError, match="would both be saved as 'batch1_000'"):
        list_tasks("mvtec", tmp_path, [])


def test_a_category_typed_in_another_unicode_normalisation_is_found(tmp_path):
    stored = unicodedata.normalize("NFD", "wéave")  # as macOS writes it
    typed = unicodedata.normalize("NFC", "wéave")  # as a keyboard on Linux types it
    make_category(tmp_path, stored)
    make_category(tmp_path, "washer")
    tasks = list_tasks("mvtec", tmp_path, [typed, "washer"])
    assert [t.category for t in tasks] == [stored, "washer"] and len(tasks[0].train) == 3
    with pytest.raises(UcadError, match="given twice"):
        list_tasks("mvtec", tmp_path, [typed, stored])


def test_a_data_path_typed_in_another_unicode_normalisation_says_so(tmp_path):
    make_category(tmp_path / unicodedata.normalize("NFD", "données"))
    with pytest.raises(UcadError, match="differs from it only in how accented letters are encoded"):
        list_tasks("mvtec", tmp_path / unicodedata.normalize("NFC", "données"), [])
