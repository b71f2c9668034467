"""Structure maps for structure-based contrastive learning (SCL): where they live and how they are stored.

SCL needs, for every training image, a map labelling each pixel with the id of its region (a Segment Anything
automatic mask or an offline superpixel segmentation). ``segment_anything_prep/make_structure_maps.py`` writes the
maps and training reads them by this convention:

* Location: a tree parallel to the data set, by default ``DATA_PATH + "-sam-b"`` (the released code's convention);
  each map has its image's path relative to that root, with the suffix ``.png``.
* Resolution: the image's full original size as PIL opens it (no EXIF rotation), so that maps do not depend on
  ``--resize`` / ``--imagesize``: training resizes and crops a map as it does the image, with nearest sampling.
* Encoding: 16-bit grayscale PNG; 0 = pixel in no region, 1..K = regions numbered by decreasing area (1 = largest),
  K <= 65535."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ucad.runtime.errors import UcadError

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
