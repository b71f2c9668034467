"""Images by their real depth and type: every mode a camera or a converter writes becomes the 8-bit RGB picture a
viewer shows, and one that cannot is one line naming the file and its mode."""
from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from ucad.data.check import check_data
from ucad.data.layouts import list_tasks
from ucad.runtime.errors import UcadError
from ucad.data.decode import ImageGeometry, load_image

GEOMETRY = ImageGeometry(16, 16, "square")


def picture(seed: int = 0) -> np.ndarray:
    """An 8-bit grey picture with every level from 0 to 255."""
    return np.random.default_rng(seed).permutation(256).reshape(16, 16).astype(np.uint8)


def test_float_tiff_in_0_1_is_the_8_bit_picture_not_black(tmp_path):
    levels = picture()
    Image.fromarray(levels).save(tmp_path / "eight.png")
    Image.fromarray(levels.astype(np.float32) / 255).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    assert np.array_equal(load_image(tmp_path / "float.tif", GEOMETRY), load_image(tmp_path / "eight.png", GEOMETRY))


def test_float_tiff_outside_0_1_is_scaled_by_its_range(tmp_path):
    Image.fromarray(picture().astype(np.float32) * 4.0 - 100.0).save(tmp_path / "wide.tif")
    out = load_image(tmp_path / "wide.tif", GEOMETRY)
    assert np.array_equal(out[0], picture()) and np.array_equal(out[0], out[2])


def test_32_bit_integer_tiff_holding_16_bit_values_is_the_8_bit_picture(tmp_path):
    levels = picture()
    Image.fromarray(levels).save(tmp_path / "eight.png")
    Image.fromarray(levels.astype(np.int32) * 257).save(tmp_path / "wide.tif")
    assert Image.open(tmp_path / "wide.tif").mode == "I"
    assert np.array_equal(load_image(tmp_path / "wide.tif", GEOMETRY), load_image(tmp_path / "eight.png", GEOMETRY))


def test_two_32_bit_integer_pictures_stay_different(tmp_path):
    """Scaled by 2**32 - 1 every picture was black, and every image score equal."""
    for name, seed in (("a", 1), ("b", 2)):
        Image.fromarray(picture(seed).astype(np.int32) * 257).save(tmp_path / f"{name}.tif")
    a, b = load_image(tmp_path / "a.tif", GEOMETRY), load_image(tmp_path / "b.tif", GEOMETRY)
    assert a.max() == 255 and not np.array_equal(a, b)


def test_a_mode_that_is_no_picture_is_one_line_naming_file_and_mode(tmp_path):
    path = tmp_path / "nan.tif"
    values = np.zeros((16, 16), np.float32)
    values[3, 3] = np.nan
    Image.fromarray(values).save(path)
    with pytest.raises(UcadError, match=r"image '.*nan\.tif' holds NaN or infinite values \(mode F\)"):
        load_image(path, GEOMETRY)


def test_the_data_check_says_how_wide_images_are_scaled(tmp_path):
    root = tmp_path / "data" / "part"
    for i in range(2):
        for folder in ("train/good", "test/good"):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture(i).astype(np.int32) * 257).save(root / folder / f"{i:03d}.tif")
    (root / "test" / "crack").mkdir()
    (root / "ground_truth" / "crack").mkdir(parents=True)
    Image.fromarray(picture(5).astype(np.float32) / 255).save(root / "test" / "crack" / "000.tif")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(root / "ground_truth" / "crack" / "000_mask.png")
    Image.fromarray(np.full((16, 16), np.nan, np.float32)).save(root / "test" / "crack" / "001.tif")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(root / "ground_truth" / "crack" / "001_mask.png")
    tasks = list_tasks("mvtec", root.parent, [])
    with pytest.raises(UcadError, match=r"001\.tif' holds NaN or infinite values"):
        check_data(tasks, None, workers=1, show=False)
    (root / "test" / "crack" / "001.tif").unlink()
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    notes = check_data(list_tasks("mvtec", root.parent, []), None, workers=1, show=False)
    assert any("4 image(s) are 32-bit integer (mode I) without a stored bit depth: scaled by the 16 bits" in note
               for note in notes), notes
    assert any("1 image(s) are 32-bit float (mode F) in [0, 1]" in note for note in notes), notes


def test_ordinary_8_bit_pictures_decode_as_before(tmp_path):
    """PIL's own conversion, untouched: grey, palette and colour PNG and JPEG."""
    levels = picture()
    rgb = np.stack([levels, levels[::-1], levels.T], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=90)
    Image.fromarray(levels).save(tmp_path / "grey.png")
    for name in ("rgb.png", "rgb.jpg", "grey.png"):
        expected = np.asarray(Image.open(tmp_path / name).convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(load_image(tmp_path / name, ImageGeometry(16, 16, "crop")), expected)
