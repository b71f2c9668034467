"""Structure maps for structure-based contrastive learning (SCL): where they live and how they are stored.

SCL needs, for every training image, a map labelling each pixel with the id of its region (a Segment Anything
automatic mask or an offline superpixel segmentation). ``segment_anything_prep/make_structure_maps.py`` writes the
maps and training reads them by this convention:

* Location: a tree parallel to the data set, by default ``DATA_PATH + "-sam-b"`` (the released code's convention);
  each map has its image's path relative to that root, with the suffix ``.png``.
* Resolution: the image's full original size as PIL opens it (no EXIF rotation), so that maps do not depend on
  ``--resize`` / ``--imagesize``: training resizes and crops a map as it does the image, with nearest sampling.
* Encoding: 16-bit grayscale PNG; 0 = pixel in no region, 1..K = regions numbered by decreasing area (1 = largest),
  K <= 65535.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from ucad.datasets import detect_layout, layouts_hint, list_tasks
from ucad.errors import UcadError
from ucad.run_folder import atomic_write

MAX_LABEL = 65535
STRUCTURE_SUFFIX = "-sam-b"
# a map with at least this many distinct values, most of whose neighbouring pixels that differ do so by at most
# SMALL_STEP, is a grey picture: region ids are numbered by area, so neighbouring regions rarely have close ids
PHOTOGRAPH_VALUES = 100
SMALL_STEP = 8

MAKE_MAPS_HINT = ("make them with `python segment_anything_prep/make_structure_maps.py --data_path DATA --method "
                  "felzenszwalb` (or `--sam_checkpoint sam_vit_b_01ec64.pth` for Segment Anything masks), or train "
                  "without them with the option `--no_scl` of the `ucad` sub-command (the prompt is then not trained)")


def default_structure_root(data_root) -> Path:
    return Path(str(data_root).rstrip("/").rstrip(os.sep) + STRUCTURE_SUFFIX)


def structure_map_path(image_path, data_root, structure_root) -> Path:
    image_path, data_root = Path(image_path), Path(data_root)
    # the paths as given first, so that an image reached through a symbolic link keeps its place in the tree
    for image, root in ((Path(os.path.abspath(image_path)), Path(os.path.abspath(data_root))),
                        (image_path.resolve(), data_root.resolve())):
        if image.is_relative_to(root):
            return Path(structure_root) / image.relative_to(root).with_suffix(".png")
    raise UcadError(f"image {image_path} is not inside the data path {data_root}; cannot place its structure map")


def load_structure_map(path) -> np.ndarray:
    """int32 (H, W), 0 = no region."""
    path = Path(path)
    if not path.is_file():
        raise UcadError(f"structure map {path} does not exist; {MAKE_MAPS_HINT}")
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.array(img)
    except Exception as exc:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError ...)
        raise UcadError(f"structure map {path} cannot be read ({type(exc).__name__}: {exc}); delete it and make it "
                        "again with segment_anything_prep/make_structure_maps.py") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise UcadError(f"structure map {path} is not a single-channel integer label map (shape {arr.shape}, dtype "
                        f"{arr.dtype}, a colour picture?): if dataset --structure_path names a folder of images, give "
                        "it the tree of maps that segment_anything_prep/make_structure_maps.py makes; else delete this "
                        "map and make it again")
    return arr.astype(np.int32, copy=False)


def looks_like_a_photograph(labels: np.ndarray) -> bool:
    """Whether a label map holds the grey levels of a picture rather than region ids: hundreds of distinct values
    changing in small steps between neighbouring pixels."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 2 or labels.size == 0:
        return False
    low, high = int(labels.min()), int(labels.max())
    # counting is linear where the values span a 16-bit range (every map this program writes); a sort elsewhere
    distinct = (np.count_nonzero(np.bincount((labels - low).ravel())) if high - low <= MAX_LABEL
                else len(np.unique(labels)))
    if distinct < PHOTOGRAPH_VALUES:
        return False
    steps = np.concatenate((np.abs(np.diff(labels, axis=0)).ravel(), np.abs(np.diff(labels, axis=1)).ravel()))
    steps = steps[steps > 0]
    return steps.size > 0 and np.count_nonzero(steps <= SMALL_STEP) > steps.size / 2


def save_structure_map(path, labels) -> Path:
    path = Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"structure map must be 2-D (H, W), got shape {labels.shape}")
    if labels.size:
        if not np.issubdtype(labels.dtype, np.integer) and np.any(np.mod(labels, 1)):
            raise ValueError("structure map must hold integer labels")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > MAX_LABEL:
            raise ValueError(f"structure map labels must be in 0..{MAX_LABEL}, got {lo}..{hi}")
    img = Image.fromarray(np.ascontiguousarray(labels.astype(np.uint16)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary:  # an interrupted maker never leaves a broken map where training reads
        img.save(temporary, format="PNG")
    return path


def _number_in_order(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``labels`` with ``ids[i]`` -> i + 1 and every other value -> 0, as int32."""
    if len(ids) > MAX_LABEL:
        raise ValueError(f"{len(ids)} regions do not fit a 16-bit structure map (at most {MAX_LABEL})")
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels]


def masks_to_label_map(masks, shape) -> np.ndarray:
    """One int32 label map of ``shape`` (H, W) from boolean masks or Segment Anything annotations (dicts with
    ``"segmentation"``): larger regions are painted first, so a smaller one shows where they overlap, and ids are
    1..K in that order over the regions left visible."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise ValueError(f"shape must be (H, W), got {shape}")
    segments = [np.asarray(m["segmentation"] if isinstance(m, dict) else m, dtype=bool) for m in masks]
    for segment in segments:
        if segment.shape != shape:
            raise ValueError(f"mask of shape {segment.shape} does not match the map shape {shape}")
    painted = np.zeros(shape, dtype=np.int32)
    for rank, segment in enumerate(sorted(segments, key=lambda segment: -int(segment.sum())), start=1):
        painted[segment] = rank
    return _number_in_order(painted, np.unique(painted[painted > 0]))


def relabel_by_area(segments, background=None) -> np.ndarray:
    """Renumber a segmentation (any non-negative integer ids) to 1..K by decreasing area (ties: smaller old id
    first). Pixels whose id equals ``background`` (if given) become 0. Returns int32."""
    seg = np.asarray(segments)
    if seg.ndim != 2:
        raise ValueError(f"segmentation must be 2-D, got shape {seg.shape}")
    seg = seg.astype(np.int64, copy=False)
    if seg.size and seg.min() < 0:
        raise ValueError("segmentation ids must be non-negative")
    counts = np.bincount(seg.ravel())
    if background is not None and background < len(counts):
        counts[background] = 0
    ids = np.flatnonzero(counts)
    return _number_in_order(seg, ids[np.argsort(-counts[ids], kind="stable")])


def resize_labels_nearest(labels, shape) -> np.ndarray:
    """Nearest-neighbour resampling of a label map to ``shape`` (H, W) (pixel centres aligned)."""
    labels = np.asarray(labels)
    h, w = labels.shape
    out_h, out_w = (int(s) for s in shape)
    if (h, w) == (out_h, out_w):
        return labels.copy()
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def find_images(data_root, include_test: bool = False, categories: Iterable[str] | None = None) -> list[Path]:
    """The training images (with ``include_test`` the test ones too) that need structure maps, sorted: listed as a
    run lists them, every image a later ``--train_val_split`` holds out included, so that the maker writes a map for
    exactly the images a run trains on."""
    root = Path(data_root)
    categories = [c for c in (categories or []) if c]
    tasks = list_tasks(detect_layout(root), root, categories, need_masks=False)
    images = [sample.image_path for task in tasks for sample in task.train + (task.test if include_test else [])]
    if not images:
        which = f" (categories {', '.join(categories)})" if categories else ""
        raise UcadError(f"no {'' if include_test else 'training '}images found in {root}{which}; {layouts_hint()}")
    return sorted(set(images), key=str)
