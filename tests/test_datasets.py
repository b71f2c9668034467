"""ucad.data.layouts (listing MVTec-layout and VisA trees) and ucad.data.decode (decoding images and masks) on tiny
trees written here with PIL, plus the real magnetic-tile data when it is present."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ucad.data.layouts import list_mvtec_task, list_tasks, list_visa_task
from ucad.runtime.errors import UcadError
from ucad.data.decode import ImageGeometry, load_image, load_images, load_mask, load_masks

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"


def write_image(path: Path, size=(40, 30), mode="RGB", value=None, seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    array = rng.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    Image.fromarray(array, mode=mode).save(path)
    return path


def write_mask(path: Path, size=(40, 30), on_value=255, box=(5, 5, 15, 15)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = on_value
    Image.fromarray(array, mode="L").save(path)
    return path


def make_mvtec(root: Path, category="bottle", train=3, good=2, defects=(("crack", 2), ("hole", 1))) -> Path:
    folder = root / category
    for i in range(train):
        write_image(folder / "train" / "good" / f"{i:03d}.png", seed=i)
    for i in range(good):
        write_image(folder / "test" / "good" / f"{i:03d}.png", seed=10 + i)
    for defect, count in defects:
        for i in range(count):
            write_image(folder / "test" / defect / f"{i:03d}.png", seed=20 + i)
            write_mask(folder / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def make_visa(root: Path, categories=("candle", "pcb1"), train=3, normal_test=2, anomalies=2) -> Path:
    rows = [("object", "split", "label", "image", "mask")]
    for c in categories:
        for i in range(train + normal_test):
            rel = f"{c}/Data/Images/Normal/{i:04d}.JPG"
            write_image(root / rel, size=(60, 40), seed=i)
            rows.append((c, "train" if i < train else "test", "normal", rel, ""))
        for i in range(anomalies):
            rel = f"{c}/Data/Images/Anomaly/{i:03d}.JPG"
            mask_rel = f"{c}/Data/Masks/Anomaly/{i:03d}.png"
            write_image(root / rel, size=(60, 40), seed=50 + i)
            write_mask(root / mask_rel, size=(60, 40), on_value=1)  # VisA masks are 0/1, not 0/255
            rows.append((c, "test", "anomaly", rel, mask_rel))
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return root


def make_visa_converted(root: Path, category="candle") -> Path:
    """VisA after the official conversion to the MVTec layout (amazon-science/spot-diff prepare_data.py, 1cls):
    <cat>/train/good/*.JPG, <cat>/test/{good,bad}/*.JPG, masks <cat>/ground_truth/bad/<stem>.png (0/255),
    i.e. named like the image, without MVTec's '_mask' suffix."""
    folder = root / category
    for i in range(3):
        write_image(folder / "train" / "good" / f"{i:04d}.JPG", seed=i)
    write_image(folder / "test" / "good" / "0100.JPG", seed=5)
    for i in range(2):
        write_image(folder / "test" / "bad" / f"{i:03d}.JPG", seed=7 + i)
        write_mask(folder / "ground_truth" / "bad" / f"{i:03d}.png")
    return root


# ----------------------------------------------------------------------------- listing
def test_mvtec_listing(tmp_path):
    root = make_mvtec(tmp_path)
    task = list_mvtec_task(root, "bottle")
    assert task.category == "bottle" and task.root == root
    assert len(task.train) == 3 and all(not s.is_anomalous and s.mask_path is None for s in task.train)
    assert len(task.test) == 5
    anomalous = [s for s in task.test if s.is_anomalous]
    assert sorted(s.defect_type for s in anomalous) == ["crack", "crack", "hole"]
    for s in anomalous:
        assert s.mask_path == root / "bottle" / "ground_truth" / s.defect_type / f"{s.image_path.stem}_mask.png"
    assert all(s.mask_path is None and s.defect_type == "good" for s in task.test if not s.is_anomalous)


def test_list_tasks_order_discovery_and_split(tmp_path):
    root = make_mvtec(tmp_path, "bottle", train=10)
    make_mvtec(tmp_path, "cable")
    (tmp_path / "not_a_category").mkdir()
    tasks = list_tasks("mvtec", root, ["cable", "bottle"])
    assert [t.category for t in tasks] == ["cable", "bottle"]  # the order given is the task order
    assert [t.category for t in list_tasks("mvtec", root, [])] == ["bottle", "cable"]  # found, sorted
    split = list_tasks("mvtec", root, ["bottle"], train_val_split=0.5, seed=0)[0]
    assert len(split.train) == 5
    again = list_tasks("mvtec", root, ["bottle"], train_val_split=0.5, seed=0)[0]
    assert [s.image_path for s in split.train] == [s.image_path for s in again.train]
    assert len(split.test) == 5  # the test set is untouched


def test_root_that_is_itself_a_category(tmp_path):
    make_mvtec(tmp_path, "tile")
    tasks = list_tasks("mvtec", tmp_path / "tile", [])
    assert len(tasks) == 1 and tasks[0].category == "tile"
    assert len(tasks[0].train) == 3


def test_visa_as_distributed(tmp_path):
    root = make_visa(tmp_path)
    task = list_visa_task(root, "pcb1")
    assert len(task.train) == 3 and len(task.test) == 4
    anomalous = [s for s in task.test if s.is_anomalous]
    assert len(anomalous) == 2
    for s in anomalous:
        assert s.image_path.is_file() and s.mask_path.is_file()
        assert s.mask_path.parent == root / "pcb1" / "Data" / "Masks" / "Anomaly"
    assert all(s.mask_path is None for s in task.train)
    tasks = list_tasks("visa", root, [])
    assert [t.category for t in tasks] == ["candle", "pcb1"]


def test_visa_converted_to_mvtec_layout(tmp_path):
    root = make_visa_converted(tmp_path)
    task = list_visa_task(root, "candle")
    assert len(task.train) == 3 and len(task.test) == 3
    anomalous = [s for s in task.test if s.is_anomalous]
    assert [s.mask_path.name for s in anomalous] == ["000.png", "001.png"]
    assert [t.category for t in list_tasks("visa", root, ["candle"])] == ["candle"]
    masks = load_masks(anomalous, ImageGeometry(32, 32, "square"), workers=1)
    assert masks.sum() > 0


# ----------------------------------------------------------------------------- bad input
def test_missing_data_path(tmp_path):
    missing = tmp_path / "no_such_folder"
    for name in ("mvtec", "visa"):
        with pytest.raises(UcadError) as info:
            list_tasks(name, missing, ["bottle"])
        assert str(missing) in str(info.value)
        assert "DATA_PATH" in str(info.value)
    a_file = write_image(tmp_path / "x.png")
    with pytest.raises(UcadError, match="not a folder"):
        list_tasks("mvtec", a_file, ["bottle"])


def test_misspelt_category_lists_and_suggests(tmp_path):
    root = make_mvtec(tmp_path, "bottle")
    make_mvtec(tmp_path, "metal_nut")
    with pytest.raises(UcadError) as info:
        list_tasks("mvtec", root, ["botle"])
    message = str(info.value)
    assert "'botle'" in message and str(root) in message
    assert "Did you mean bottle" in message
    assert "Categories found: bottle, metal_nut" in message
    assert "-d" in message


def test_misspelt_visa_category(tmp_path):
    root = make_visa(tmp_path)
    with pytest.raises(UcadError) as info:
        list_tasks("visa", root, ["pcb_1"])
    message = str(info.value)
    assert "'pcb_1'" in message and "Did you mean pcb1" in message and "candle" in message


def test_checks_every_category_before_training(tmp_path):
    root = make_mvtec(tmp_path, "bottle")
    with pytest.raises(UcadError, match="'cabel'"):
        list_tasks("mvtec", root, ["bottle", "cabel"])
    with pytest.raises(UcadError, match="twice"):
        list_tasks("mvtec", root, ["bottle", "bottle"])


def test_defect_image_without_mask(tmp_path):
    root = make_mvtec(tmp_path)
    (root / "bottle" / "ground_truth" / "hole" / "000_mask.png").unlink()
    with pytest.raises(UcadError) as info:
        list_mvtec_task(root, "bottle")
    message = str(info.value)
    assert str(root / "bottle" / "test" / "hole" / "000.png") in message
    assert "000_mask.png" in message


def test_visa_defect_without_mask(tmp_path):
    root = make_visa(tmp_path)
    missing = root / "candle" / "Data" / "Masks" / "Anomaly" / "001.png"
    missing.unlink()
    with pytest.raises(UcadError) as info:
        list_visa_task(root, "candle")
    assert str(root / "candle" / "Data" / "Images" / "Anomaly" / "001.JPG") in str(info.value)
    assert str(missing) in str(info.value)


def test_empty_train_folder(tmp_path):
    root = make_mvtec(tmp_path, train=0)
    (root / "bottle" / "train" / "good").mkdir(parents=True, exist_ok=True)
    (root / "bottle" / "train" / "good" / "notes.txt").write_text("not an image")
    with pytest.raises(UcadError) as info:
        list_tasks("mvtec", root, ["bottle"])
    assert str(root / "bottle" / "train" / "good") in str(info.value)
    assert "no images" in str(info.value)


def test_missing_train_good_folder(tmp_path):
    root = make_mvtec(tmp_path)
    (root / "bottle" / "train" / "good").rename(root / "bottle" / "train" / "ok")
    with pytest.raises(UcadError, match="train/good"):
        list_mvtec_task(root, "bottle")


@pytest.mark.parametrize("workers", [1, 3])
def test_unreadable_image_names_the_file(tmp_path, workers):
    root = make_mvtec(tmp_path)
    broken = root / "bottle" / "train" / "good" / "001.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png" * 3)
    task = list_mvtec_task(root, "bottle")  # listing does not decode
    with pytest.raises(UcadError) as info:
        load_images(task.train, ImageGeometry(32, 32, "crop"), workers=workers, show=False)
    assert str(broken) in str(info.value)
    assert "cannot read image" in str(info.value)


def test_unreadable_and_missing_mask(tmp_path):
    broken = tmp_path / "m.png"
    broken.write_bytes(b"garbage")
    with pytest.raises(UcadError, match=str(broken)):
        load_mask(broken, ImageGeometry(16, 16, "crop"))
    with pytest.raises(UcadError, match="does not exist"):
        load_mask(tmp_path / "none.png", ImageGeometry(16, 16, "crop"))


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16"])
def test_grayscale_and_other_modes_become_rgb(tmp_path, mode):
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    gray = np.tile(np.arange(0, 240, 6, dtype=np.uint8), (30, 1))  # 30 x 40 ramp
    if mode == "I;16":
        Image.fromarray(gray.astype(np.uint16)).save(path)  # 16-bit grayscale PNG
    else:
        Image.fromarray(gray, mode="L").convert(mode).save(path)
    out = load_image(path, ImageGeometry(30, 30, "square"))
    assert out.shape == (3, 30, 30) and out.dtype == np.uint8
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])
    if mode != "I;16":
        assert out.max() > 100  # the content survives


def test_load_images_stacks_uint8(tmp_path):
    root = make_mvtec(tmp_path)
    task = list_mvtec_task(root, "bottle")
    batch = load_images(task.test, ImageGeometry(36, 32, "crop"), workers=2, show=False)
    assert batch.shape == (5, 3, 32, 32) and batch.dtype == torch.uint8
    masks = load_masks(task.test, ImageGeometry(36, 32, "crop"), workers=2)
    assert masks.shape == (5, 32, 32) and masks.dtype == torch.uint8
    assert set(masks.unique().tolist()) <= {0, 1}
    good = [i for i, s in enumerate(task.test) if not s.is_anomalous]
    assert masks[good].sum() == 0


def test_crop_cuts_a_border_defect_that_square_keeps(tmp_path):
    # a 128 x 64 (w x h) image with a bright defect in the 16 leftmost columns
    array = np.full((64, 128, 3), 40, np.uint8)
    array[:, :16] = 250
    image_path = tmp_path / "wide.png"
    Image.fromarray(array).save(image_path)
    mask_path = write_mask(tmp_path / "wide_mask.png", size=(128, 64), box=(0, 20, 16, 40))

    crop = ImageGeometry(resize=64, imagesize=64, resize_mode="crop")
    square = ImageGeometry(resize=64, imagesize=64, resize_mode="square")
    cropped, squashed = load_image(image_path, crop), load_image(image_path, square)
    assert cropped.shape == squashed.shape == (3, 64, 64)
    assert cropped.max() < 100  # the centre crop (columns 32..95) lost the defect
    assert squashed[:, :, :7].min() > 200  # squashed to half width, the defect spans columns 0..7
    assert load_mask(mask_path, crop).sum() == 0
    kept = load_mask(mask_path, square)
    assert kept.sum() > 0 and kept[:, 8:].sum() == 0


def test_crop_geometry_of_resize_then_centre_crop(tmp_path):
    array = np.zeros((100, 200), np.uint8)
    array[:, 100:] = 255  # right half white
    path = tmp_path / "half.png"
    Image.fromarray(array).save(path)
    out = load_image(path, ImageGeometry(resize=50, imagesize=40, resize_mode="crop"))[0]
    # 200 x 100 -> 100 x 50, centre 40 x 40 crop = columns 30..69, rows 5..44; white from column 50 -> 20
    assert out.shape == (40, 40)
    assert out[:, :19].max() < 10 and out[:, 21:].min() > 245


def test_visa_masks_0_1_are_binarised(tmp_path):
    root = make_visa(tmp_path)
    task = list_visa_task(root, "candle")
    anomalous = [s for s in task.test if s.is_anomalous]
    raw = np.asarray(Image.open(anomalous[0].mask_path))
    assert set(np.unique(raw).tolist()) == {0, 1}  # really stored as 0/1
    masks = load_masks(anomalous, ImageGeometry(60, 60, "square"), workers=1)
    assert set(masks.unique().tolist()) == {0, 1}
    assert masks.dtype == torch.uint8
    # box (5, 5)-(15, 15) of a 60 x 40 mask, squashed to 60 x 60: rows 7.5..22.5, columns 5..15
    assert masks[0, 10:20, 6:14].min() == 1 and masks[0, 30:].max() == 0


def test_mask_values_above_zero_in_16_bit_and_label_masks(tmp_path):
    path = tmp_path / "labels.png"
    array = np.zeros((20, 20), np.uint16)
    array[2:6, 2:6] = 1
    array[10:14, 10:14] = 300  # region ids above 255
    Image.fromarray(array).save(path)  # 16-bit grayscale PNG
    mask = load_mask(path, ImageGeometry(20, 20, "square"))
    assert mask.sum() == 32 and set(np.unique(mask).tolist()) == {0, 1}


def test_mask_resizing_is_nearest(tmp_path):
    # upsampling a 4 x 4 VisA-style (0/1) mask with one defect pixel: nearest gives exactly a 2 x 2 block,
    # bilinear would smear it into a larger region once binarised
    small = np.zeros((4, 4), np.uint8)
    small[1, 2] = 1
    up_path = tmp_path / "up.png"
    Image.fromarray(small).save(up_path)
    up = load_mask(up_path, ImageGeometry(8, 8, "square"))
    expected = np.zeros((8, 8), np.uint8)
    expected[2:4, 4:6] = 1
    assert np.array_equal(up, expected)

    # downsampling: an isolated pixel that nearest sampling skips (8 -> 4 samples pixels 1, 3, 5, 7)
    big = np.zeros((8, 8), np.uint8)
    big[0, 0] = 255
    big[5, 3] = 255
    down_path = tmp_path / "down.png"
    Image.fromarray(big).save(down_path)
    down = load_mask(down_path, ImageGeometry(4, 4, "square"))
    reference = (np.asarray(Image.fromarray(big).resize((4, 4), Image.NEAREST)) > 0).astype(np.uint8)
    assert np.array_equal(down, reference)
    assert down.sum() == 1 and down[2, 1] == 1


def test_no_mask_gives_zeros():
    mask = load_mask(None, ImageGeometry(10, 12, "crop"))
    assert mask.shape == (12, 12) and mask.sum() == 0


# ----------------------------------------------------------------------------- the real data
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"{REAL_DATA} not present")
def test_real_magnetic_tile_listing():
    tasks = list_tasks("mvtec", REAL_DATA.parent, ["magnetic_tile"])
    assert len(tasks) == 1
    task = tasks[0]
    assert len(task.train) == 400
    assert len(task.test) == 488
    with_mask = [s for s in task.test if s.mask_path is not None]
    assert len(with_mask) == 388
    assert all(s.is_anomalous and s.mask_path.is_file() for s in with_mask)
    assert sum(not s.is_anomalous for s in task.test) == 100
    assert {s.defect_type for s in with_mask} == {"blowhole", "break", "crack", "fray", "uneven"}
    # the root itself as the category gives the same listing
    same = list_tasks("mvtec", REAL_DATA, [])[0]
    assert same.category == "magnetic_tile" and len(same.train) == 400 and len(same.test) == 488
    # a few real (grayscale, non-square) images and masks decode with the square geometry
    sample = with_mask[:3]
    images = load_images(sample, ImageGeometry(64, 64, "square"), workers=1, show=False)
    masks = load_masks(sample, ImageGeometry(64, 64, "square"), workers=1)
    assert images.shape == (3, 3, 64, 64)
    assert torch.equal(images[:, 0], images[:, 1])
    assert set(masks.unique().tolist()) <= {0, 1} and masks.sum() > 0


# ----------------------------------------------------------------------------- wide, damaged and odd files
def test_16_bit_images_are_scaled_by_their_bit_depth_not_clipped(tmp_path):
    """convert("RGB") clips 16-bit values at 255 (every picture white, image AUROC 0.5): scale 65535 -> 255."""
    geometry = ImageGeometry(16, 16, "square")
    ramp = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    out = load_image(tmp_path / "ramp.png", geometry)
    assert np.array_equal(out[0], np.arange(256).reshape(16, 16)) and np.array_equal(out[0], out[2])
    # a dark 16-bit image stays dark: the bit depth decides, not the image's own maximum
    dark = np.full((16, 16), 4095, np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark.png")
    assert load_image(tmp_path / "dark.png", geometry).max() == round(4095 * 255 / 65535)
    # two different 16-bit images stay different (clipping would make both all 255)
    Image.fromarray(np.full((16, 16), 30000, np.uint16)).save(tmp_path / "mid.png")
    assert load_image(tmp_path / "mid.png", geometry).mean() == pytest.approx(30000 * 255 / 65535, abs=0.5)


def test_bit_depth_declared_by_a_tiff_is_used(tmp_path):
    from ucad.data.decode import bit_depth, to_8_bit

    Image.fromarray(np.full((4, 4), 4095, np.uint16)).save(tmp_path / "twelve.tif")
    image = Image.open(tmp_path / "twelve.tif")
    assert bit_depth(image) == 16
    image.tag_v2[258] = (12,)  # a 12-bit camera's TIFF says BitsPerSample 12
    assert bit_depth(image) == 12 and np.asarray(to_8_bit(image)).min() == 255
    wide = Image.open(tmp_path / "twelve.tif").convert("I")  # older Pillow opens 16-bit PNGs as mode I
    assert bit_depth(wide) == 16 and np.asarray(to_8_bit(wide)).max() == 16


def test_16_bit_masks_keep_every_value_above_zero(tmp_path):
    array = np.zeros((8, 8), np.uint16)
    array[0:4, 0:4] = 65535
    array[6, 6] = 1  # would be 0 if the mask were scaled to 8 bits first
    Image.fromarray(array).save(tmp_path / "mask16.png")
    mask = load_mask(tmp_path / "mask16.png", ImageGeometry(8, 8, "square"))
    assert mask.sum() == 17


def rewrite_visa_csv(root: Path, change) -> Path:
    path = root / "split_csv" / "1cls.csv"
    rows = list(csv.reader(open(path, newline="")))
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([rows[0]] + [change(list(r)) for r in rows[1:]])
    return path


def test_visa_split_and_label_are_read_case_and_space_insensitively(tmp_path):
    from segment_anything_prep.label_maps import find_images

    root = make_visa(tmp_path / "visa")
    before = list_visa_task(root, "pcb1")
    rewrite_visa_csv(root, lambda r: [r[0], f" {r[1].title()} ", f"{r[2].upper()} ", r[3], r[4]])
    after = list_visa_task(root, "pcb1")
    assert [s.image_path for s in after.train] == [s.image_path for s in before.train]
    assert [(s.image_path, s.is_anomalous, s.mask_path) for s in after.test] == \
        [(s.image_path, s.is_anomalous, s.mask_path) for s in before.test]
    # the structure-map maker reads the same rows as training images
    assert sorted(find_images(root, categories=["pcb1"])) == sorted(s.image_path for s in after.train)


@pytest.mark.parametrize("column, value, message", [(2, "defect", "label 'defect' is neither normal nor anomaly"),
                                                     (1, "validation", "split 'validation' is neither train")])
def test_visa_unknown_label_or_split_names_the_row(tmp_path, column, value, message):
    root = make_visa(tmp_path / "visa")
    rows_seen = []

    def change(row):
        rows_seen.append(row)
        if len(rows_seen) == 4:
            row[column] = value
        return row

    path = rewrite_visa_csv(root, change)
    with pytest.raises(UcadError) as info:
        list_tasks("visa", root, ["candle"])
    assert message in str(info.value) and str(path) in str(info.value) and "line 5" in str(info.value)


def test_binary_and_truncated_visa_csv_are_one_line_errors(tmp_path):
    from segment_anything_prep.label_maps import find_images

    root = make_visa(tmp_path / "visa")
    path = root / "split_csv" / "1cls.csv"
    text = path.read_text()
    path.write_text(text[: len(text) * 2 // 3 + 7].rstrip("\n").rsplit(",", 2)[0] + "\n")  # cut inside a row
    for call in (lambda: list_tasks("visa", root, ["candle"]), lambda: find_images(root)):
        with pytest.raises(UcadError, match="fields instead of 5"):
            call()
    path.write_bytes(bytes(range(256)) * 4)
    for call in (lambda: list_tasks("visa", root, ["candle"]), lambda: find_images(root)):
        with pytest.raises(UcadError, match="cannot be read as CSV"):
            call()


def test_hidden_files_are_skipped_everywhere(tmp_path):
    """macOS '._x.png' files and '.'-folders are no data for training, testing, VisA lists or the map maker."""
    from segment_anything_prep.label_maps import find_images

    root = make_mvtec(tmp_path / "mvtec")
    (root / "bottle" / "train" / "good" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "bottle" / "test" / "good" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    write_image(root / "bottle" / "test" / ".ipynb_checkpoints" / "000.png")  # not a defect type
    (root / ".Trash" / "train").mkdir(parents=True)
    (root / ".Trash" / "test").mkdir()
    task = list_tasks("mvtec", root, [])[0]
    assert [t.category for t in list_tasks("mvtec", root, [])] == ["bottle"]
    assert len(task.train) == 3 and len(task.test) == 5
    assert not any(p.name.startswith(".") or ".ipynb" in str(p) for p in find_images(root, include_test=True))
    assert len(find_images(root, include_test=True)) == 8

    visa = make_visa(tmp_path / "visa")
    hidden = visa / "pcb1" / "Data" / "Images" / "Normal" / "._0000.JPG"
    hidden.write_bytes(b"\x00\x05\x16\x07")
    with open(visa / "split_csv" / "1cls.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(["pcb1", "train", "normal", "pcb1/Data/Images/Normal/._0000.JPG", ""])
    assert len(list_visa_task(visa, "pcb1").train) == 3
    assert hidden not in find_images(visa)
