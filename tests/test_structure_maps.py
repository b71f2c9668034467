"""Structure maps: the storage convention (ucad/data/structure_maps.py) and the tool that makes them
(segment_anything_prep/make_structure_maps.py), on tiny data sets built here."""

from __future__ import annotations

import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # plain `pytest` without installation or a pythonpath setting
    sys.path.insert(0, str(REPO))

from segment_anything_prep.label_maps import find_images, masks_to_label_map, relabel_by_area, save_structure_map
from segment_anything_prep.make_structure_maps import main as cli_main
from segment_anything_prep.make_structure_maps import FelzenszwalbSegmenter, make_structure_maps
from ucad.data.decode import read_rgb
from ucad.runtime.errors import UcadError
from ucad.data.structure_maps import default_structure_root, load_structure_map, structure_map_path

W, H = 64, 48  # non-square
RECT = (8, 6, 30, 30)  # x0, y0, x1, y1 of the drawn rectangle


def _draw(seed: int, gray: bool = False) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (W, H), (30, 40, 50))
    d = ImageDraw.Draw(img)
    d.rectangle(RECT, fill=(230, 60, 40))
    cx, cy = 46 + int(rng.integers(-2, 3)), 30 + int(rng.integers(-2, 3))
    d.ellipse((cx - 9, cy - 9, cx + 9, cy + 9), fill=(40, 200, 90))
    d.rectangle((40, 4, 60, 10), fill=(240, 240, 60))
    return img.convert("L") if gray else img


def make_mvtec(root: Path, categories=("alpha", "beta"), n_train: int = 3) -> Path:
    for c, cat in enumerate(categories):
        for i in range(n_train):
            p = root / cat / "train" / "good" / f"{i:03d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            _draw(10 * c + i, gray=(c == 0 and i == 2)).save(p)
        t = root / cat / "test" / "crack" / "000.png"
        t.parent.mkdir(parents=True, exist_ok=True)
        _draw(99).save(t)
        g = root / cat / "ground_truth" / "crack" / "000_mask.png"
        g.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (W, H), 0).save(g)
    return root


@pytest.fixture
def mvtec(tmp_path) -> Path:
    return make_mvtec(tmp_path / "mvtec")


# ------------------------------------------------------------------------------------------------ convention


def test_paths_and_roundtrip(tmp_path):
    assert default_structure_root("/data/mvtec/") == Path("/data/mvtec-sam-b")
    assert default_structure_root(Path("/data/mvtec")) == Path("/data/mvtec-sam-b")
    p = structure_map_path("/d/mvtec/bottle/train/good/000.JPG", "/d/mvtec", "/d/mvtec-sam-b")
    assert p == Path("/d/mvtec-sam-b/bottle/train/good/000.png")
    with pytest.raises(UcadError, match="not inside"):
        structure_map_path("/elsewhere/x.png", "/d/mvtec", "/d/mvtec-sam-b")

    labels = np.zeros((5, 7), dtype=np.int64)
    labels[1:3, 2:6] = 300
    labels[4, 6] = 65535
    dst = save_structure_map(tmp_path / "a" / "b.png", labels)
    with Image.open(dst) as im:
        assert im.mode == "I;16" and im.size == (7, 5)
        assert np.array(im).dtype == np.uint16
    back = load_structure_map(dst)
    assert back.dtype == np.int32 and np.array_equal(back, labels)
    with pytest.raises(ValueError):
        save_structure_map(tmp_path / "c.png", np.full((2, 2), 65536))


def test_load_missing_and_broken(tmp_path):
    missing = tmp_path / "nope" / "000.png"
    with pytest.raises(UcadError) as e:
        load_structure_map(missing)
    msg = str(e.value)
    assert str(missing) in msg and "--no_scl" in msg and "make_structure_maps.py" in msg and "felzenszwalb" in msg
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(UcadError, match="broken.png"):
        load_structure_map(broken)


def test_masks_to_label_map_order_and_overlap():
    shape = (10, 10)
    big = np.zeros(shape, bool)
    big[:, :6] = True  # area 60
    small = np.zeros(shape, bool)
    small[2:4, 2:4] = True  # area 4, inside big
    mid = np.zeros(shape, bool)
    mid[:, 6:9] = True  # area 30
    empty = np.zeros(shape, bool)
    out = masks_to_label_map([small, {"segmentation": big, "area": 60}, empty, mid], shape)
    assert out.dtype == np.int32
    assert out[0, 0] == 1 and out[0, 7] == 2 and out[2, 2] == 3  # by area, small painted over big
    assert out[0, 9] == 0 and set(np.unique(out)) == {0, 1, 2, 3}
    assert masks_to_label_map([], shape).max() == 0

    seg = np.array([[5, 5, 5], [7, 9, 9]])
    assert np.array_equal(relabel_by_area(seg), [[1, 1, 1], [3, 2, 2]])


# ------------------------------------------------------------------------------------------------ finding images


def test_find_images_layouts(mvtec, tmp_path):
    train = find_images(mvtec)
    assert len(train) == 6 and train == sorted(train) and all("train" in p.parts for p in train)
    assert len(find_images(mvtec, include_test=True)) == 8
    assert len(find_images(mvtec, categories=["beta"])) == 3
    with pytest.raises(UcadError, match="gamma"):
        find_images(mvtec, categories=["gamma"])
    # a single category folder; upper-case extension counts
    single = mvtec / "beta"
    (single / "train" / "good" / "003.PNG").write_bytes((single / "train" / "good" / "000.png").read_bytes())
    (single / "train" / "good" / "notes.txt").write_text("x")
    assert [p.name for p in find_images(single)] == ["000.png", "001.png", "002.png", "003.PNG"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UcadError, match="empty.*MVTec layout"):
        find_images(empty)


def test_find_images_visa(tmp_path):
    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for cat in ("candle", "pcb1"):
        for i in range(3):
            rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            _draw(i).save(root / rel, format="JPEG")
            rows.append(f"{cat},{'train' if i < 2 else 'test'},normal,{rel},")
        rel = f"{cat}/Data/Images/Anomaly/0000.JPG"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        _draw(7).save(root / rel, format="JPEG")
        rows.append(f"{cat},test,anomaly,{rel},{cat}/Data/Masks/Anomaly/0000.png")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    train = find_images(root)
    assert [str(p.relative_to(root)) for p in train] == [
        "candle/Data/Images/Normal/0000.JPG", "candle/Data/Images/Normal/0001.JPG",
        "pcb1/Data/Images/Normal/0000.JPG", "pcb1/Data/Images/Normal/0001.JPG",
    ]
    assert len(find_images(root, include_test=True)) == 8
    assert len(find_images(root, categories=["pcb1"])) == 2
    s = make_structure_maps(root, tmp_path / "visa-maps", method="slic", progress=False, log=None)
    assert s["made"] == 4
    assert (tmp_path / "visa-maps" / "pcb1" / "Data" / "Images" / "Normal" / "0001.png").is_file()


# ------------------------------------------------------------------------------------------------ offline methods


@pytest.mark.parametrize("method", ["felzenszwalb", "slic"])
def test_offline_maps(mvtec, method):
    summary = make_structure_maps(mvtec, method=method, progress=False, log=None)
    out = default_structure_root(mvtec)
    assert summary["made"] == 6 and summary["skipped"] == 0 and summary["out_path"] == str(out)
    assert summary["mean_regions"] >= 3
    for img_path in find_images(mvtec):
        dst = structure_map_path(img_path, mvtec, out)
        with Image.open(dst) as im:
            assert im.mode == "I;16" and im.size == (W, H)
        labels = load_structure_map(dst)
        assert labels.shape == (H, W) and labels.min() >= 1  # every pixel in some region
        k = labels.max()
        assert k >= 3 and set(np.unique(labels)) == set(range(1, k + 1))
        counts = np.bincount(labels.ravel())[1:]
        assert np.all(np.diff(counts) <= 0)  # ids by decreasing area
        # aligned with the image: the rectangle's interior is mostly one id, different from the background's
        x0, y0, x1, y1 = RECT
        inner = labels[y0 + 3 : y1 - 2, x0 + 3 : x1 - 2]
        ids, n = np.unique(inner, return_counts=True)
        rect_id = ids[np.argmax(n)]
        if method == "felzenszwalb":
            assert n.max() / inner.size > 0.9
        # superpixels may split the rectangle, but the regions inside it stay (mostly) inside it
        in_rect = np.zeros_like(labels, dtype=bool)
        in_rect[y0 : y1 + 1, x0 : x1 + 1] = True
        for i in ids:
            assert in_rect[labels == i].mean() > 0.8
        background = labels[H - 3 : H, 0:6]
        bg_id = np.bincount(background.ravel()).argmax()
        assert bg_id != rect_id
    # resumable: everything is skipped the second time
    again = make_structure_maps(mvtec, method=method, progress=False, log=None)
    assert again["made"] == 0 and again["skipped"] == 6 and again["mean_regions"] is None
    redo = make_structure_maps(mvtec, method=method, overwrite=True, categories=["alpha"], progress=False, log=None)
    assert redo["made"] == 3


def test_max_side_and_refusals(mvtec, tmp_path):
    s = make_structure_maps(mvtec, tmp_path / "m", method="felzenszwalb", max_side=32, progress=False, log=None)
    assert s["made"] == 6
    labels = load_structure_map(tmp_path / "m" / "alpha" / "train" / "good" / "000.png")
    assert labels.shape == (H, W)
    for bad in (mvtec, mvtec / "maps", mvtec / "alpha" / "maps"):
        with pytest.raises(UcadError, match="inside the data set"):
            make_structure_maps(mvtec, bad, method="slic", progress=False, log=None)
    assert not (mvtec / "maps").exists()
    with pytest.raises(UcadError, match="--sam_checkpoint.*felzenszwalb"):
        make_structure_maps(mvtec, tmp_path / "x", progress=False, log=None)


def test_the_maker_segments_the_picture_the_run_decodes(tmp_path, monkeypatch):
    """A dark 16-bit picture is scaled by its bit depth and a float picture in [0, 1] from [0, 1] (not each by its
    own range): the segmenter gets exactly what ucad.data.decode gives the run, checked against values by hand."""
    root = make_mvtec(tmp_path / "mvtec", categories=("alpha",), n_train=1)
    good = root / "alpha" / "train" / "good"
    dark = (np.arange(H * W).reshape(H, W) * 7 % 4000).astype(np.uint16)  # at most 3999 of 65535
    Image.fromarray(dark).save(good / "001.png")
    grey = np.linspace(0.1, 0.6, H * W, dtype=np.float32).reshape(H, W)
    Image.fromarray(grey, mode="F").save(good / "002.tif")
    seen = []

    def segment(self, image):
        seen.append(image)
        return np.ones(image.shape[:2], dtype=np.int64)

    monkeypatch.setattr(FelzenszwalbSegmenter, "__call__", segment)
    assert make_structure_maps(root, tmp_path / "maps", method="felzenszwalb", progress=False, log=None)["made"] == 3
    images = find_images(root)
    assert [p.name for p in images] == ["000.png", "001.png", "002.tif"]
    for path, image in zip(images, seen):
        assert image.dtype == np.uint8 and np.array_equal(image, read_rgb(path))
    by_hand = [np.rint(dark / 65535.0 * 255.0), np.rint(grey.astype(np.float64) * 255.0)]
    for image, grey_levels in zip(seen[1:], by_hand):
        assert np.array_equal(image, np.repeat(grey_levels.astype(np.uint8)[:, :, None], 3, axis=2))


def test_cli(mvtec, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli_main, ["--data_path", str(mvtec), "--out_path", str(tmp_path / "cli")])
    assert res.exit_code == 2 and "--sam_checkpoint" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli_main, ["--data_path", str(mvtec), "--out_path", str(tmp_path / "cli"),
                                   "--method", "sam", "--sam_checkpoint", str(tmp_path / "missing.pth")])
    assert res.exit_code == 2 and "missing.pth" in res.output and "vit_b" in res.output
    res = runner.invoke(cli_main, ["--data_path", str(mvtec), "--out_path", str(tmp_path / "cli"),
                                   "--method", "slic", "-d", "beta"])
    assert res.exit_code == 0, res.output
    assert "made 3" in res.output
    assert len(list((tmp_path / "cli").rglob("*.png"))) == 3


def test_runs_as_script_and_module(mvtec, tmp_path):
    script = REPO / "segment_anything_prep" / "make_structure_maps.py"
    for i, cmd in enumerate(([sys.executable, str(script)],
                             [sys.executable, "-m", "segment_anything_prep.make_structure_maps"])):
        res = subprocess.run(cmd + ["--data_path", str(mvtec), "--out_path", str(tmp_path / f"s{i}"),
                                    "--method", "slic", "-d", "alpha"],
                             cwd=tmp_path if i == 0 else REPO, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        assert len(list((tmp_path / f"s{i}").rglob("*.png"))) == 3


# ------------------------------------------------------------------------------------------------ SAM


def tiny_sam(checkpoint=None):
    """A Segment Anything model built like segment_anything/build_sam.py but tiny (64 px input, 32-d)."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    dim, size, patch = 32, 64, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=size, patch_size=patch, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=(0,), window_size=0, out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(size // patch, size // patch),
            input_image_size=(size, size), mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu"))
    return sam


SAM_FAST = dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, device="cpu")


def test_sam_prebuilt_model(mvtec, tmp_path):
    import torch

    torch.manual_seed(0)
    s = make_structure_maps(mvtec / "beta", tmp_path / "sam", sam_model=tiny_sam(), categories=["beta"],
                            progress=False, log=None, **SAM_FAST)
    assert s["method"] == "sam" and s["made"] == 3 and s["mean_regions"] >= 1
    labels = load_structure_map(tmp_path / "sam" / "train" / "good" / "000.png")
    assert labels.shape == (H, W) and labels.max() >= 1


def test_sam_checkpoint_path(mvtec, tmp_path, monkeypatch):
    import segment_anything
    import torch

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny_sam.pth"
    torch.save(tiny_sam().state_dict(), ckpt)
    # a state dict of the wrong type for --sam_type (the real vit_b, random init) -> one clear error, no traceback
    with pytest.raises(UcadError) as e:
        make_structure_maps(mvtec, tmp_path / "bad", sam_checkpoint=ckpt, sam_type="vit_b", progress=False, log=None)
    assert str(ckpt) in str(e.value) and "vit_b" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UcadError, match="nothing.pth.*vit_l"):
        make_structure_maps(mvtec, tmp_path / "bad", sam_checkpoint=tmp_path / "nothing.pth", sam_type="vit_l",
                            progress=False, log=None)
    # the checkpoint path end to end, with the registry's vit_b replaced by the tiny builder
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", tiny_sam)
    s = make_structure_maps(mvtec, tmp_path / "good", sam_checkpoint=ckpt, categories=["alpha"],
                            max_side=40, progress=False, log=None, **SAM_FAST)
    assert s["made"] == 3
    for name in ("000.png", "002.png"):  # 002 is grayscale
        dst = tmp_path / "good" / "alpha" / "train" / "good" / name
        with Image.open(dst) as im:
            assert im.mode == "I;16" and im.size == (W, H)
        assert load_structure_map(dst).max() >= 1
