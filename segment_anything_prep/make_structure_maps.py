"""Make the structure maps that UCAD's structure-based contrastive learning needs.

For every training image of a data set (MVTec layout, a single category folder, or VisA as distributed) this
writes one label map (16-bit PNG, full image resolution, 0 = no region, 1..K = regions by decreasing area) to a
parallel tree, by default ``DATA_PATH-sam-b``. See ``ucad/data/structure_maps.py`` for the convention.

Methods:
  sam           Segment Anything automatic masks (needs a checkpoint, e.g. sam_vit_b_01ec64.pth; GPU recommended)
  felzenszwalb  scikit-image graph-based segmentation (offline, no weights, fast)
  slic          scikit-image SLIC superpixels (offline, no weights, fast)

Usage:
  python segment_anything_prep/make_structure_maps.py --data_path /data/mvtec --method felzenszwalb
  python -m segment_anything_prep.make_structure_maps --data_path /data/mvtec --sam_checkpoint sam_vit_b_01ec64.pth
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `import ucad` work without installation
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

from segment_anything_prep.label_maps import (find_images, masks_to_label_map, relabel_by_area, resize_labels_nearest,
                                              save_structure_map)
from ucad.data.decode import read_rgb
from ucad.runtime.errors import UcadError
from ucad.data.structure_maps import default_structure_root, structure_map_path

METHODS = ("sam", "felzenszwalb", "slic")
SAM_TYPES = ("vit_b", "vit_l", "vit_h")
OFFLINE_MAX_SIDE = 384  # offline methods segment at most at this size, then labels are upsampled (nearest)
SAM_CHECKPOINT_NAMES = "vit_b: sam_vit_b_01ec64.pth, vit_l: sam_vit_l_0b3195.pth, vit_h: sam_vit_h_4b8939.pth"


# --------------------------------------------------------------------------------------------------------------
# image helpers
# --------------------------------------------------------------------------------------------------------------


def downscale(image: np.ndarray, max_side) -> np.ndarray:
    """Shrink ``image`` so its longer side is at most ``max_side`` (no-op when None or already small)."""
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR, reducing_gap=3.0))


# --------------------------------------------------------------------------------------------------------------
# segmenters: each maps an RGB uint8 image (full size) to an int label map of the same size (1..K by area)
# --------------------------------------------------------------------------------------------------------------


class FelzenszwalbSegmenter:
    """``skimage.segmentation.felzenszwalb`` on a downscaled copy; scale and min_size follow the image size."""

    def __init__(self, max_side=None, sigma: float = 0.8):
        self.max_side = max_side or OFFLINE_MAX_SIDE
        self.sigma = sigma

    def params(self, h: int, w: int) -> dict:
        side = np.sqrt(h * w)
        scale = float(np.clip(300.0 * side / 384.0, 100.0, 300.0))
        min_size = max(10, int(round(h * w / 400.0)))  # at most ~400 regions, usually tens
        return {"scale": scale, "sigma": self.sigma, "min_size": min_size}

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from skimage.segmentation import felzenszwalb

        small = downscale(image, self.max_side)
        seg = felzenszwalb(small, channel_axis=-1, **self.params(*small.shape[:2]))
        return relabel_by_area(resize_labels_nearest(seg, image.shape[:2]))


class SlicSegmenter:
    """``skimage.segmentation.slic`` superpixels on a downscaled copy."""

    def __init__(self, max_side=None, n_segments: int = 64, compactness: float = 10.0):
        self.max_side = max_side or OFFLINE_MAX_SIDE
        self.n_segments = n_segments
        self.compactness = compactness

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from skimage.segmentation import slic

        small = downscale(image, self.max_side)
        seg = slic(
            small,
            n_segments=self.n_segments,
            compactness=self.compactness,
            sigma=1.0,
            start_label=1,
            channel_axis=-1,
        )
        return relabel_by_area(resize_labels_nearest(seg, image.shape[:2]))


def resolve_device(device: str) -> str:
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UcadError(f"--device {device} was asked for but CUDA is not available here; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise UcadError(f"--device {device} is not one of cpu, cuda, auto")
    return device


def load_sam(sam_type: str, checkpoint):
    """Build Segment Anything ``sam_type`` and load ``checkpoint``; any failure -> one-line UcadError."""
    import torch
    from segment_anything import sam_model_registry

    if sam_type not in SAM_TYPES:
        raise UcadError(f"--sam_type {sam_type} is not one of {', '.join(SAM_TYPES)}")
    path = Path(checkpoint)
    if not path.is_file():
        raise UcadError(
            f"SAM checkpoint {path} (--sam_checkpoint, --sam_type {sam_type}) does not exist; download it from "
            f"https://github.com/facebookresearch/segment-anything#model-checkpoints ({SAM_CHECKPOINT_NAMES}) "
            f"or use --method felzenszwalb / slic, which need no weights"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            for key in ("model", "state_dict"):
                if key in state and isinstance(state[key], dict):
                    state = state[key]
                    break
        if not isinstance(state, dict):
            raise TypeError(f"holds a {type(state).__name__}, not a state dict")
        sam = sam_model_registry[sam_type](checkpoint=None)
        sam.load_state_dict(state, strict=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if len(first) > 200:
            first = first[:200] + "..."
        raise UcadError(
            f"SAM checkpoint {path} cannot be loaded as --sam_type {sam_type} ({type(exc).__name__}: {first}); "
            f"check that --sam_type matches the checkpoint ({SAM_CHECKPOINT_NAMES})"
        ) from None
    sam.eval()
    return sam


class SamSegmenter:
    """Segment Anything automatic masks -> label map (regions by area, smaller painted over larger)."""

    def __init__(
        self,
        sam_model,
        device: str = "auto",
        points_per_side: int = 32,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        min_mask_region_area: int = 0,
        max_side=None,
        points_per_batch: int = 64,
    ):
        from segment_anything import SamAutomaticMaskGenerator

        if min_mask_region_area > 0:
            try:
                import cv2  # noqa: F401  (SAM's small-region post-processing uses OpenCV)
            except ImportError:
                raise UcadError(
                    f"--min_mask_region_area {min_mask_region_area} needs OpenCV, which is not installed "
                    f"(pip install opencv-python-headless), or use --min_mask_region_area 0"
                ) from None
        self.device = resolve_device(device)
        self.model = sam_model.to(self.device).eval()
        self.max_side = max_side
        self.generator = SamAutomaticMaskGenerator(
            self.model,
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            min_mask_region_area=min_mask_region_area,
            output_mode="binary_mask",
        )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        import torch

        small = downscale(image, self.max_side)
        with torch.inference_mode():
            masks = self.generator.generate(small)
        labels = masks_to_label_map(masks, small.shape[:2])
        return resize_labels_nearest(labels, image.shape[:2])


# --------------------------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------------------------


def check_out_path(data_path: Path, out_path: Path) -> None:
    """Refuse to write into the data set: out_path must be neither data_path nor inside it."""
    data_r, out_r = data_path.resolve(), out_path.resolve()
    if out_r == data_r or data_r in out_r.parents:
        raise UcadError(
            f"--out_path {out_path} is inside the data set {data_path}; structure maps are never written into the "
            f"data set: choose a folder outside it (default: {default_structure_root(data_path)})"
        )


def make_structure_maps(
    data_path,
    out_path=None,
    method: str | None = None,
    sam_type: str = "vit_b",
    sam_checkpoint=None,
    sam_model=None,
    points_per_side: int = 32,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    min_mask_region_area: int = 0,
    include_test: bool = False,
    categories=None,
    device: str = "auto",
    overwrite: bool = False,
    max_side: int | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Write one structure map per image of ``data_path`` under ``out_path`` (default ``data_path + "-sam-b"``).

    ``method``: ``"sam"`` (default when ``sam_checkpoint`` or a prebuilt ``sam_model`` is given),
    ``"felzenszwalb"`` or ``"slic"``. Existing maps are skipped unless ``overwrite``. Returns a summary dict:
    ``made``, ``skipped``, ``total``, ``seconds``, ``mean_regions`` (over the maps made; None if none),
    ``method``, ``out_path``. Problems the user can fix raise :class:`ucad.runtime.errors.UcadError`.
    """
    t0 = time.perf_counter()
    data_path = Path(data_path)
    if not data_path.is_dir():
        raise UcadError(f"--data_path {data_path} is not a folder")
    out_path = Path(out_path) if out_path else default_structure_root(data_path)
    check_out_path(data_path, out_path)

    if method is None:
        if sam_checkpoint is None and sam_model is None:
            raise UcadError(
                "no --sam_checkpoint given: pass a Segment Anything checkpoint (e.g. --sam_checkpoint "
                "sam_vit_b_01ec64.pth) or choose an offline method with --method felzenszwalb or --method slic"
            )
        method = "sam"
    method = method.lower()
    if method not in METHODS:
        raise UcadError(f"--method {method} is not one of {', '.join(METHODS)}")
    if method == "sam" and sam_checkpoint is None and sam_model is None:
        raise UcadError(
            "--method sam needs --sam_checkpoint (e.g. sam_vit_b_01ec64.pth with --sam_type vit_b); "
            "without weights use --method felzenszwalb or --method slic"
        )
    if max_side is not None and max_side < 16:
        raise UcadError(f"--max_side {max_side} is too small (at least 16)")

    images = find_images(data_path, include_test=include_test, categories=categories)
    jobs = [(img, structure_map_path(img, data_path, out_path)) for img in images]
    todo = [(img, dst) for img, dst in jobs if overwrite or not dst.exists()]
    skipped = len(jobs) - len(todo)

    region_counts: list[int] = []
    if todo:
        if method == "sam":
            if sam_model is None:
                sam_model = load_sam(sam_type, sam_checkpoint)
            segmenter = SamSegmenter(
                sam_model,
                device=device,
                points_per_side=points_per_side,
                pred_iou_thresh=pred_iou_thresh,
                stability_score_thresh=stability_score_thresh,
                min_mask_region_area=min_mask_region_area,
                max_side=max_side,
            )
            desc = f"SAM {sam_type} on {segmenter.device}"
        elif method == "felzenszwalb":
            segmenter = FelzenszwalbSegmenter(max_side=max_side)
            desc = "felzenszwalb"
        else:
            segmenter = SlicSegmenter(max_side=max_side)
            desc = "slic"
        if log:
            log(f"structure maps: {len(todo)} to make, {skipped} already there, method {desc}, into {out_path}")
        for img_path, dst in tqdm(todo, desc=desc, unit="img", disable=not progress, dynamic_ncols=True):
            image = read_rgb(img_path)
            labels = segmenter(image)
            if labels.shape != image.shape[:2]:  # defensive: the convention is full resolution
                raise RuntimeError(f"label map {labels.shape} does not match image {image.shape[:2]} ({img_path})")
            save_structure_map(dst, labels)
            region_counts.append(int(labels.max()))

    seconds = time.perf_counter() - t0
    summary = {
        "made": len(region_counts),
        "skipped": skipped,
        "total": len(jobs),
        "seconds": round(seconds, 3),
        "mean_regions": float(np.mean(region_counts)) if region_counts else None,
        "method": method,
        "out_path": str(out_path),
    }
    if log:
        mean = f"{summary['mean_regions']:.1f}" if region_counts else "-"
        log(
            f"structure maps: made {summary['made']}, skipped {skipped} (already there), {seconds:.1f} s, "
            f"mean regions per map {mean}, in {out_path}"
        )
    return summary


# --------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data_path", required=True, type=click.Path(file_okay=False), help="Data set root (or one category).")
@click.option("--out_path", default=None, type=click.Path(file_okay=False),
              help="Where the maps go (default: DATA_PATH-sam-b). Never inside the data set.")
@click.option("--method", type=click.Choice(METHODS), default=None,
              help="sam (default when --sam_checkpoint is given), felzenszwalb or slic (offline, no weights).")
@click.option("--sam_type", type=click.Choice(SAM_TYPES), default="vit_b", show_default=True)
@click.option("--sam_checkpoint", default=None, type=click.Path(dir_okay=False), help="SAM weights (.pth).")
@click.option("--points_per_side", default=32, show_default=True, type=int)
@click.option("--pred_iou_thresh", default=0.88, show_default=True, type=float)
@click.option("--stability_score_thresh", default=0.95, show_default=True, type=float)
@click.option("--min_mask_region_area", default=0, show_default=True, type=int, help="> 0 needs OpenCV.")
@click.option("--include_test", is_flag=True, help="Also make maps for the test images.")
@click.option("-d", "--category", "categories", multiple=True, help="Only these categories (repeatable).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda (cuda:N) or auto (SAM only).")
@click.option("--overwrite", is_flag=True, help="Remake maps that already exist (default: skip them).")
@click.option("--max_side", default=None, type=int,
              help=f"Segment a copy shrunk to this longer side, upsample labels (nearest). "
                   f"SAM default: full size; offline default: {OFFLINE_MAX_SIDE}.")
def main(**kwargs):
    """Write one structure map (16-bit PNG label map, full image size) per training image of DATA_PATH."""
    try:
        make_structure_maps(**kwargs)
    except UcadError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
