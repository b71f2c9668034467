"""--structure_path checked for what it is: the data folder, colour pictures or grey pictures given as structure
maps are refused before training, with a message naming --structure_path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segment_anything_prep.label_maps import relabel_by_area
from ucad.cli.run import main
from ucad.data.check import check_data
from ucad.data.layouts import list_tasks
from ucad.runtime.errors import UcadError
from ucad.data.structure_maps import looks_like_a_photograph

TINY = ["ucad", "-b", "resnet18", "--weights", "random", "-le", "layer2", "--patchsize", "1",
        "--pretrain_embed_dimension", "16", "--target_embed_dimension", "16"]


def grey_picture(seed: int, size=(48, 40)) -> np.ndarray:
    """A smooth grey photograph-like picture: a gradient with soft blobs, hundreds of levels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    picture = 40 + 3 * x + 2 * y + 30 * np.sin(x / (5 + seed)) * np.cos(y / 7) + rng.normal(0, 1, x.shape)
    return np.clip(picture, 0, 255).astype(np.uint8)


def make_data(root: Path, colour: bool) -> Path:
    for i in range(3):
        picture = grey_picture(i)
        image = Image.fromarray(np.stack([picture] * 3, -1) if colour else picture)
        for folder in ("train/good", "test/good"):
            (root / "part" / folder).mkdir(parents=True, exist_ok=True)
            image.save(root / "part" / folder / f"{i:03d}.png")
    (root / "part" / "test" / "crack").mkdir()
    (root / "part" / "ground_truth" / "crack").mkdir(parents=True)
    Image.fromarray(grey_picture(9)).save(root / "part" / "test" / "crack" / "000.png")
    Image.fromarray(np.full((40, 48), 255, np.uint8)).save(root / "part" / "ground_truth" / "crack" / "000_mask.png")
    return root


def run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.parametrize("colour", [False, True])
def test_the_data_folder_given_as_structure_path_is_refused_before_training(tmp_path, colour):
    data = make_data(tmp_path / "data", colour)
    code, output = run(["--cpu", "--epochs_num", "1", str(tmp_path / "results"), *TINY, "dataset", "--resize", "32",
                        "--imagesize", "32", "--num_workers", "1", "--structure_path", str(data), "mvtec", str(data)])
    assert code == 2
    assert f"error: dataset --structure_path '{data}' is the data folder itself" in output
    assert "delete" not in output and "Traceback" not in output and "== task" not in output


def test_grey_pictures_in_a_tree_of_their_own_are_refused_as_maps(tmp_path):
    data = make_data(tmp_path / "data", colour=False)
    maps = tmp_path / "copies"
    for image in (data / "part" / "train" / "good").iterdir():
        (maps / "part" / "train" / "good").mkdir(parents=True, exist_ok=True)
        (maps / "part" / "train" / "good" / image.name).write_bytes(image.read_bytes())
    with pytest.raises(UcadError, match=r"task 'part': 3 of 3 structure maps look like grey pictures, not region "
                                        r"maps .*--structure_path must name the tree of maps"):
        check_data(list_tasks("mvtec", data, []), maps, workers=1, show=False)


def test_colour_pictures_as_maps_name_structure_path_not_deleting_data(tmp_path):
    data = make_data(tmp_path / "data", colour=True)
    maps = tmp_path / "copies"
    for image in (data / "part" / "train" / "good").iterdir():
        (maps / "part" / "train" / "good").mkdir(parents=True, exist_ok=True)
        (maps / "part" / "train" / "good" / image.name).write_bytes(image.read_bytes())
    with pytest.raises(UcadError, match="a colour picture.*if dataset --structure_path names a folder of images"):
        check_data(list_tasks("mvtec", data, []), maps, workers=1, show=False)


def test_real_region_maps_do_not_look_like_photographs():
    rng = np.random.default_rng(0)
    # hundreds of small regions of a superpixel-like grid, numbered by area as the maker numbers them
    blocks = np.kron(rng.permutation(400).reshape(20, 20), np.ones((4, 4), np.int64))
    assert not looks_like_a_photograph(relabel_by_area(blocks))
    assert not looks_like_a_photograph(np.repeat(np.arange(1, 9), 100).reshape(20, 40))  # few regions
    assert looks_like_a_photograph(grey_picture(0).astype(np.int32))


def test_the_demo_maps_are_region_maps(demo_root):
    from ucad.data.structure_maps import default_structure_root, load_structure_map

    maps = sorted(default_structure_root(demo_root).rglob("*.png"))
    assert maps and not any(looks_like_a_photograph(load_structure_map(path)) for path in maps)
