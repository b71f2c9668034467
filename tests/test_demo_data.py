"""The synthetic demo data set: MVTec layout, exact masks, determinism, distinguishable categories."""
from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ucad.demo.data import (
    ALL_CATEGORIES,
    DEMO_CATEGORIES,
    DEMO_DEFECT_TYPES,
    GRAYSCALE_CATEGORIES,
    LOOKALIKE_CATEGORIES,
    MANIFEST_NAME,
    VISIBLE_THRESHOLD,
    generate_demo_dataset,
    main,
    render_sample,
)
from ucad.runtime.errors import UcadError

SMALL = dict(image_size=64, n_train=3, n_test_good=2, n_test_defect=3)


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_small")
    assert generate_demo_dataset(root, seed=0, **SMALL) == DEMO_CATEGORIES
    return root


def test_categories_are_distinct_and_have_two_defect_types():
    assert len(DEMO_CATEGORIES) >= 4 and len(set(DEMO_CATEGORIES)) == len(DEMO_CATEGORIES)
    assert set(DEMO_DEFECT_TYPES) == set(ALL_CATEGORIES) == set(DEMO_CATEGORIES) | set(LOOKALIKE_CATEGORIES)
    for defects in DEMO_DEFECT_TYPES.values():
        assert len(defects) == 2 and "good" not in defects


def test_lookalike_variants_differ_slightly_from_their_product():
    """weave_b and pcb_chip_b are a routing stress test: close to weave / pcb_chip, but not the same product."""
    for base, variant in (("weave", "weave_b"), ("pcb_chip", "pcb_chip_b")):
        a = render_sample(base, 0, "train", 0, image_size=64)[0].astype(float)
        b = render_sample(variant, 0, "train", 0, image_size=64)[0].astype(float)
        other = render_sample("washer", 0, "train", 0, image_size=64)[0].astype(float)
        assert a.shape == b.shape
        assert 0 < abs(a.mean() - b.mean()) < abs(a.mean() - other.mean())
        assert np.abs(a - b).mean() > 2.0  # not the same images with another name


def test_layout_is_mvtec(small_set):
    root = small_set
    assert _names(root) == set(DEMO_CATEGORIES) | {MANIFEST_NAME}
    for category in DEMO_CATEGORIES:
        folder = root / category
        defects = set(DEMO_DEFECT_TYPES[category])
        assert _names(folder) == {"train", "test", "ground_truth"}
        assert _names(folder / "train") == {"good"}
        assert _names(folder / "train" / "good") == {f"{i:03d}.png" for i in range(SMALL["n_train"])}
        assert _names(folder / "test") == {"good"} | defects
        assert _names(folder / "test" / "good") == {f"{i:03d}.png" for i in range(SMALL["n_test_good"])}
        assert _names(folder / "ground_truth") == defects  # good test images have no mask
        for defect in defects:
            images = _names(folder / "test" / defect)
            assert images == {f"{i:03d}.png" for i in range(SMALL["n_test_defect"])}
            assert _names(folder / "ground_truth" / defect) == {f"{Path(n).stem}_mask.png" for n in images}


def test_image_modes_and_sizes(small_set):
    size = SMALL["image_size"]
    for category in DEMO_CATEGORIES:
        mode = "L" if category in GRAYSCALE_CATEGORIES else "RGB"
        for path in (small_set / category).glob("t*/*/*.png"):  # train/ and test/
            with Image.open(path) as image:
                assert image.mode == mode, path
                assert image.size == (size, size), path
    assert any(c in GRAYSCALE_CATEGORIES for c in DEMO_CATEGORIES)
    assert any(c not in GRAYSCALE_CATEGORIES for c in DEMO_CATEGORIES)


def test_every_defect_image_has_a_partial_binary_mask(small_set):
    for category in DEMO_CATEGORIES:
        for defect in DEMO_DEFECT_TYPES[category]:
            for image_path in sorted((small_set / category / "test" / defect).glob("*.png")):
                mask_path = small_set / category / "ground_truth" / defect / f"{image_path.stem}_mask.png"
                with Image.open(image_path) as image, Image.open(mask_path) as mask:
                    assert mask.size == image.size
                    assert mask.mode == "L"
                    values = np.asarray(mask)
                assert values.dtype == np.uint8
                assert set(np.unique(values)) == {0, 255}, mask_path  # some but not all pixels set


def test_mask_is_exactly_the_visibly_changed_pixels():
    for category in DEMO_CATEGORIES:
        for defect in DEMO_DEFECT_TYPES[category]:
            for index in range(2):
                image, mask, clean = render_sample(category, 3, defect, index, 64, defect)
                diff = np.abs(image.astype(int) - clean.astype(int))
                if diff.ndim == 3:
                    diff = diff.max(axis=2)
                assert np.array_equal(mask, diff >= VISIBLE_THRESHOLD)
                assert mask.any() and not mask.all()
                assert diff[~mask].max(initial=0) < VISIBLE_THRESHOLD


def test_written_masks_match_rendering(small_set):
    category, defect = "washer", DEMO_DEFECT_TYPES["washer"][1]
    image, mask, _ = render_sample(category, 0, defect, 1, SMALL["image_size"], defect)
    assert np.array_equal(np.asarray(Image.open(small_set / category / "test" / defect / "001.png")), image)
    written = np.asarray(Image.open(small_set / category / "ground_truth" / defect / "001_mask.png"))
    assert np.array_equal(written > 0, mask)


def test_defect_sizes_vary(tmp_path):
    generate_demo_dataset(tmp_path, image_size=64, n_train=1, n_test_good=1, n_test_defect=8)
    for category in DEMO_CATEGORIES:
        for defect in DEMO_DEFECT_TYPES[category]:
            areas = [int((np.asarray(Image.open(p)) > 0).sum())
                     for p in (tmp_path / category / "ground_truth" / defect).glob("*.png")]
            assert max(areas) >= 2 * min(areas), (category, defect, areas)


def test_same_seed_gives_identical_bytes(small_set, tmp_path):
    generate_demo_dataset(tmp_path, seed=0, **SMALL)
    assert _all_files(tmp_path) == _all_files(small_set)


def test_subset_gives_the_same_images_as_the_full_set(small_set, tmp_path):
    assert generate_demo_dataset(tmp_path, categories=["pcb_chip", "granite"], seed=0, **SMALL) == [
        "pcb_chip", "granite"]
    assert _names(tmp_path) == {"pcb_chip", "granite", MANIFEST_NAME}
    for category in ("pcb_chip", "granite"):
        for rel, data in _all_files(tmp_path / category).items():
            assert (small_set / category / rel).read_bytes() == data


def test_other_seed_gives_other_images(small_set, tmp_path):
    generate_demo_dataset(tmp_path, seed=1, **SMALL)
    for category in DEMO_CATEGORIES:
        for rel in ("train/good/000.png", "test/good/000.png"):
            a = np.asarray(Image.open(small_set / category / rel), dtype=float)
            b = np.asarray(Image.open(tmp_path / category / rel), dtype=float)
            assert np.abs(a - b).mean() > 2.0, (category, rel)


def test_normal_images_vary(small_set):
    for category in DEMO_CATEGORIES:
        images = [np.asarray(Image.open(p), dtype=float) for p in sorted((small_set / category / "train" / "good").glob("*.png"))]
        for a, b in combinations(images, 2):
            assert np.abs(a - b).mean() > 2.0, category


def _features(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=float) / 255.0
    gray = rgb.mean(axis=2)
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    gradient = np.abs(np.diff(gray, axis=0)).mean() + np.abs(np.diff(gray, axis=1)).mean()
    return np.array([*rgb.mean(axis=(0, 1)), gray.std(), saturation.mean(), gradient])


def test_categories_look_clearly_different(tmp_path):
    generate_demo_dataset(tmp_path, image_size=64, n_train=8, n_test_good=1, n_test_defect=1)
    feats = {c: np.stack([_features(p) for p in sorted((tmp_path / c / "train" / "good").glob("*.png"))])
             for c in DEMO_CATEGORIES}
    for a, b in combinations(DEMO_CATEGORIES, 2):  # centroids far apart compared with the spread inside a category
        gap = np.linalg.norm(feats[a].mean(0) - feats[b].mean(0))
        spread = max(np.linalg.norm(feats[c] - feats[c].mean(0), axis=1).max() for c in (a, b))
        assert gap > 3 * spread, (a, b, gap, spread)
    # leave-one-out nearest centroid on these simple statistics is already perfect
    for c, rows in feats.items():
        for i, row in enumerate(rows):
            centroids = {d: (np.delete(r, i, axis=0) if d == c else r).mean(0) for d, r in feats.items()}
            assert min(centroids, key=lambda d: np.linalg.norm(row - centroids[d])) == c


def test_unknown_category_raises_naming_the_known_ones(tmp_path):
    with pytest.raises(UcadError) as info:
        generate_demo_dataset(tmp_path / "out", categories=["weave", "bottle"])
    message = str(info.value)
    assert "bottle" in message
    for category in DEMO_CATEGORIES:
        assert category in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value", [("image_size", 8), ("n_train", 0), ("seed", -1), ("n_test_defect", 1.5)])
def test_bad_numbers_raise(tmp_path, option, value):
    with pytest.raises(UcadError, match=option):
        generate_demo_dataset(tmp_path / "out", **{**SMALL, option: value})


def test_same_parameters_are_not_regenerated(tmp_path):
    generate_demo_dataset(tmp_path, seed=0, **SMALL)
    probe = tmp_path / "weave" / "train" / "good" / "000.png"
    probe.write_bytes(probe.read_bytes())  # touch: a rewrite would change the time again
    touched = probe.stat().st_mtime_ns
    assert generate_demo_dataset(tmp_path, seed=0, **SMALL) == DEMO_CATEGORIES
    assert probe.stat().st_mtime_ns == touched
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["parameters"]["seed"] == 0


def test_incomplete_category_is_rewritten(tmp_path):
    generate_demo_dataset(tmp_path, seed=0, **SMALL)
    reference = _all_files(tmp_path)
    (tmp_path / "washer" / "ground_truth" / "broken" / "001_mask.png").unlink()
    generate_demo_dataset(tmp_path, seed=0, **SMALL)
    assert _all_files(tmp_path) == reference


def test_other_parameters_replace_the_set(tmp_path):
    generate_demo_dataset(tmp_path, seed=0, **SMALL)
    generate_demo_dataset(tmp_path, categories=["granite"], seed=2, **{**SMALL, "n_train": 2})
    assert _names(tmp_path) == {"granite", MANIFEST_NAME}
    assert len(list((tmp_path / "granite" / "train" / "good").iterdir())) == 2
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["categories"] == ["granite"] and manifest["parameters"]["seed"] == 2


def test_foreign_folder_needs_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UcadError, match="overwrite"):
        generate_demo_dataset(tmp_path, categories="weave", **SMALL)
    assert generate_demo_dataset(tmp_path, categories="weave", overwrite=True, **SMALL) == ["weave"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "weave" / "train" / "good" / "000.png").is_file()


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main([str(out), "--seed", "0", "--image_size", "48", "--n_train", "2", "--n_test_good", "1",
                 "--n_test_defect", "1", "--categories", "washer,weave"]) == 0
    printed = capsys.readouterr().out
    assert "washer" in printed and "weave" in printed and str(out) in printed
    assert _names(out) == {"washer", "weave", MANIFEST_NAME}
    assert main([str(out), "--categories", "washer,nope"]) == 2
    assert "nope" in capsys.readouterr().err
