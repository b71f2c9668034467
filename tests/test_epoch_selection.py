"""Synthetic defects on held-out normal images and the epoch choice made on them, never on the test set."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ucad.cli.run import main
from ucad.learning.synthetic_defects import VISIBLE_CHANGE, cutpaste, make_validation_set, perlin_blend, perlin_noise


def textured(n=4, size=64, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 215, (n, 3, size // 8, size // 8)).repeat(8, axis=2).repeat(8, axis=3)
    return (base + rng.integers(-10, 10, base.shape)).clip(0, 255).astype(np.uint8)


def test_perlin_noise_is_smooth_and_seeded():
    a = perlin_noise(64, 4, np.random.default_rng(1))
    assert a.shape == (64, 64) and np.abs(a).max() <= 1.5
    assert np.abs(np.diff(a, axis=0)).max() < 0.2  # smooth: neighbouring pixels are close
    assert np.array_equal(a, perlin_noise(64, 4, np.random.default_rng(1)))


@pytest.mark.parametrize("kind", ["cutpaste", "perlin"])
def test_masks_are_exactly_the_changed_pixels(kind):
    images = textured()
    rng = np.random.default_rng(3)
    for i in range(8):
        image = images[i % 4]
        bad, mask = cutpaste(image, rng) if kind == "cutpaste" else perlin_blend(image, images[(i + 1) % 4], rng)
        change = np.abs(bad.astype(int) - image.astype(int)).max(axis=0)
        assert mask.any() and mask.mean() < 0.5
        assert np.array_equal(mask, change >= VISIBLE_CHANGE)
        assert (change[~mask] < VISIBLE_CHANGE).all()


def test_cutpaste_changes_only_one_rectangle():
    image = textured(1)[0]
    bad, mask = cutpaste(image, np.random.default_rng(5))
    changed = np.abs(bad.astype(int) - image.astype(int)).max(axis=0) > 0
    rows, cols = np.nonzero(changed)
    box = np.zeros_like(changed)
    box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    assert not (changed & ~box).any() and (mask <= box).all()


def test_validation_set_holds_each_normal_image_and_a_defective_copy():
    normal = torch.from_numpy(textured(5))
    images, masks, labels = make_validation_set(normal, seed=0)
    assert images.shape == (10, 3, 64, 64) and masks.shape == (10, 64, 64) and labels.tolist() == [0] * 5 + [1] * 5
    assert torch.equal(images[:5], normal) and masks[:5].sum() == 0 and (masks[5:].flatten(1).sum(1) > 0).all()
    again = make_validation_set(normal, seed=0)
    assert torch.equal(again[0], images) and torch.equal(again[1], masks)


def _run(data, results, group):
    return CliRunner().invoke(main, [
        "--cpu", "--epochs_num", "2", "--memory_size", "16", "--key_size", "8", "--basic_size", "0",
        "--log_group", group, "--log_project", "p", str(results),
        "ucad", "-b", "vit_tiny_patch16_224", "--weights", "random", "-le", "1", "--patchsize", "1",
        "--pretrain_embed_dimension", "48", "--target_embed_dimension", "48", "--epoch_selection", "validation",
        "dataset", "--resize", "64", "--imagesize", "64", "--batch_size", "4", "--num_workers", "1",
        "--train_val_split", "0.5", "--structure_path", str(data) + "-sam-b", "-d", "weave", "mvtec", str(data)],
        catch_exceptions=False)


def test_epoch_choice_never_reads_test_data(demo_root, tmp_path):
    """Poison the test labels (normal and defective test images swap folders): the choice must not move."""
    poisoned = tmp_path / "poisoned"
    shutil.copytree(demo_root, poisoned)
    shutil.copytree(str(demo_root) + "-sam-b", str(poisoned) + "-sam-b")
    test = poisoned / "weave" / "test"
    defect = sorted(p.name for p in test.iterdir() if p.name != "good")[0]
    goods, bads = sorted((test / "good").iterdir()), sorted((test / defect).iterdir())
    for good, bad in zip(goods, bads):  # swap the files: each keeps its folder's label, and the masks stay
        swap = good.with_suffix(".swap")
        good.rename(swap)
        bad.rename(good)
        swap.rename(bad)
    first, second = _run(demo_root, tmp_path / "r", "clean"), _run(poisoned, tmp_path / "r", "poisoned")
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert "epoch chosen on held-out synthetic defects" in first.output
    read = lambda group: json.loads((tmp_path / "r" / "p" / f"{group}_0" / "summary.json").read_text())
    assert read("clean")["chosen_epochs"] == read("poisoned")["chosen_epochs"]
    scores = [line for line in first.output.splitlines() if "validation score per epoch" in line]
    assert scores == [line for line in second.output.splitlines() if "validation score per epoch" in line]


def test_validation_choice_needs_held_out_images(demo_root, tmp_path):
    result = CliRunner().invoke(main, [
        "--cpu", "--epochs_num", "1", "--memory_size", "8", "--key_size", "8", "--basic_size", "0", str(tmp_path),
        "ucad", "-b", "resnet18", "--weights", "random", "--pretrain_embed_dimension", "32",
        "--target_embed_dimension", "32", "--epoch_selection", "validation",
        "dataset", "--resize", "32", "--imagesize", "32", "--num_workers", "1", "-d", "weave", "mvtec",
        str(demo_root)])
    assert result.exit_code == 2 and "--train_val_split" in result.output and "Traceback" not in result.output
