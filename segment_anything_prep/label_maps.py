"""From a segmentation to a structure map on disk: regions numbered 1..K by area, resampled to the image, written
as a 16-bit PNG (the convention of `ucad/data/structure_maps.py`); and the images that need a map, listed as a run
lists them."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from ucad.data import layouts as datasets
from ucad.data.layouts import check_root, list_tasks
from ucad.runtime.errors import UcadError
from ucad.persistence.run_folder import atomic_write
from ucad.data.structure_maps import MAX_LABEL


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


def layouts_hint() -> str:
    return "expected " + ", or ".join(layout.description for layout in datasets.LAYOUTS.values())


def detect_layout(root: str | Path) -> str:
    """The first registered layout that recognises the folder, for tools that are given no NAME."""
    root = Path(root)
    check_root(root, "the data path")
    for layout in datasets.LAYOUTS.values():  # the registry as it is now: layouts may be registered later
        if layout.recognises(root):
            return layout.name
    raise UcadError(f"no data set found in '{root}': {layouts_hint()}")
