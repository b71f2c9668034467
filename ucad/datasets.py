"""Data sets as lists of samples: MVTec AD layout and VisA (as distributed or converted).

A task is one product category. Listing is separate from decoding (see `ucad.images`), so a
bad path or a misspelt category fails in a second, before any model is built.
"""
from __future__ import annotations

import csv
import difflib
import random
from dataclasses import dataclass, field
from pathlib import Path

from ucad.errors import UcadError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
VISA_SPLIT_FILE = Path("split_csv") / "1cls.csv"
VISA_CATEGORIES = [
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
]
MVTEC_CATEGORIES = [
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
]


@dataclass(frozen=True)
class Sample:
    image_path: Path
    mask_path: Path | None  # None for normal images
    is_anomalous: bool
    defect_type: str  # "good" for normal images


@dataclass
class TaskSamples:
    """The samples of one task (category): training images are all normal."""

    category: str
    root: Path  # the data set root the relative paths of structure maps are taken from
    train: list[Sample]
    test: list[Sample]
    # normal training images held out by --train_val_split: never learned from, they show how a task's own
    # normal images score (thresholds, --epoch_selection) without looking at test labels
    validation: list[Sample] = field(default_factory=list)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _check_root(root: Path, option: str) -> None:
    if not root.exists():
        raise UcadError(f"data path '{root}' does not exist: pass the folder holding the categories as {option}")
    if not root.is_dir():
        raise UcadError(f"data path '{root}' is not a folder: pass the folder holding the categories as {option}")


def _unknown_category(category: str, found: list[str], root: Path, layout: str) -> UcadError:
    close = difflib.get_close_matches(category, found, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    listing = ", ".join(found) if found else "none"
    return UcadError(
        f"category '{category}' not found in '{root}' ({layout} layout).{hint} Categories found: {listing}. "
        "Fix the -d option of the dataset sub-command."
    )


def mvtec_categories(root: Path) -> list[str]:
    """Sub-folders of root that look like MVTec-layout categories (have train/ and test/)."""
    return sorted(p.name for p in root.iterdir() if (p / "train").is_dir() and (p / "test").is_dir())


def list_mvtec_task(root: Path, category: str) -> TaskSamples:
    """One category in the MVTec AD layout; `category` "." means root itself is the category."""
    root = Path(root)
    _check_root(root, "DATA_PATH of the dataset sub-command")
    folder = root if category == "." else root / category
    if category != "." and not (folder / "train").is_dir():
        raise _unknown_category(category, mvtec_categories(root), root, "MVTec AD")
    train_dir = folder / "train" / "good"
    if not train_dir.is_dir():
        raise UcadError(f"training folder '{train_dir}' is missing: a category needs train/good/ with normal images")
    train = [Sample(p, None, False, "good") for p in _images_in(train_dir)]
    if not train:
        raise UcadError(f"training folder '{train_dir}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    test_dir = folder / "test"
    if not test_dir.is_dir():
        raise UcadError(f"test folder '{test_dir}' is missing: a category needs test/good/ and test/<defect>/")
    test: list[Sample] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for image in _images_in(defect_dir):
            if defect == "good":
                test.append(Sample(image, None, False, "good"))
                continue
            mask = folder / "ground_truth" / defect / f"{image.stem}_mask.png"
            if not mask.is_file():
                # VisA converted by its official script (spot-diff prepare_data.py) names masks <name>.png
                same_name = mask.with_name(f"{image.stem}.png")
                if not same_name.is_file():
                    raise UcadError(
                        f"defect image '{image}' has no mask: expected '{mask}' (or '{same_name}'). Every image "
                        f"in test/{defect}/ needs ground_truth/{defect}/<name>_mask.png"
                    )
                mask = same_name
            test.append(Sample(image, mask, True, defect))
    if not test:
        raise UcadError(f"test folder '{test_dir}' holds no images")
    return TaskSamples(category, root, train, test)


def visa_categories(root: Path) -> list[str]:
    split_file = root / VISA_SPLIT_FILE
    if split_file.is_file():
        with open(split_file, newline="") as handle:
            return sorted({row["object"] for row in csv.DictReader(handle)})
    return mvtec_categories(root)


def list_visa_task(root: Path, category: str) -> TaskSamples:
    """VisA as distributed (split_csv/1cls.csv) or already converted to the MVTec layout."""
    root = Path(root)
    _check_root(root, "DATA_PATH of the dataset sub-command")
    split_file = root / VISA_SPLIT_FILE
    if not split_file.is_file():
        if mvtec_categories(root):
            return list_mvtec_task(root, category)
        raise UcadError(
            f"'{root}' is neither VisA as distributed (no '{split_file}') nor VisA converted to the MVTec layout "
            "(no <category>/train and <category>/test folders)"
        )
    with open(split_file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing_columns = {"object", "split", "label", "image", "mask"} - set(rows[0].keys() if rows else [])
    if missing_columns:
        raise UcadError(f"split file '{split_file}' lacks the columns {sorted(missing_columns)}")
    rows = [row for row in rows if row["object"] == category]
    if not rows:
        raise _unknown_category(category, visa_categories(root), root, "VisA")
    train: list[Sample] = []
    test: list[Sample] = []
    for row in rows:
        image = root / row["image"]
        anomalous = row["label"].strip().lower() == "anomaly"
        mask = root / row["mask"] if anomalous and row["mask"].strip() else None
        if anomalous and (mask is None or not mask.is_file()):
            raise UcadError(f"defect image '{image}' has no mask: expected '{mask}' (column 'mask' of '{split_file}')")
        sample = Sample(image, mask, anomalous, "anomaly" if anomalous else "good")
        (train if row["split"] == "train" else test).append(sample)
    if not train:
        raise UcadError(f"category '{category}' has no training rows in '{split_file}'")
    return TaskSamples(category, root, train, test)


DATASET_LISTERS = {"mvtec": list_mvtec_task, "visa": list_visa_task}


def list_tasks(name: str, root: str | Path, categories: list[str], train_val_split: float = 1.0,
               seed: int = 0) -> list[TaskSamples]:
    """All tasks of a run, in the order given; checks every category before anything is trained."""
    root = Path(root)
    _check_root(root, f"DATA_PATH of 'dataset {name}'")
    if not categories:
        found = mvtec_categories(root) if name == "mvtec" else visa_categories(root)
        if not found:
            if (root / "train").is_dir():
                categories = ["."]
            else:
                raise UcadError(f"no categories found in '{root}'; name them with -d or check the path")
        else:
            categories = found
    if len(set(categories)) != len(categories):
        raise UcadError(f"a category is given twice in -d: {categories}")
    tasks = [DATASET_LISTERS[name](root, category) for category in categories]
    if not 0.0 < train_val_split <= 1.0:
        raise UcadError(f"--train_val_split must be in (0, 1], got {train_val_split}")
    if train_val_split < 1.0:
        for task in tasks:
            # a seeded subset, not the first files, so the split does not depend on file naming
            order = list(range(len(task.train)))
            random.Random(seed).shuffle(order)
            keep = max(1, int(round(len(order) * train_val_split)))
            task.validation = [task.train[i] for i in sorted(order[keep:])]
            task.train = [task.train[i] for i in sorted(order[:keep])]
    for task in tasks:
        if task.category == ".":
            task.category = root.name
    return tasks
