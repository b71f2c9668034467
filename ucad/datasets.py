"""Data sets as lists of samples: MVTec AD layout and VisA (as distributed or converted).

A task is one product category. Listing is separate from decoding (see `ucad.images`), so a
bad path or a misspelt category fails in a second, before any model is built.

This is the one listing of a data set's files: the training run (`list_tasks`) and the structure-map maker
(`ucad.structure_maps.find_images`) both go through it, so they agree on which files are data. A layout is one
`DataLayout` registration (`register_layout`): the choices of `dataset NAME` and the detection of a folder's
layout come from the registry.
"""
from __future__ import annotations

import csv
import difflib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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


def is_hidden(path: Path) -> bool:
    """Names starting with '.' (macOS '._x.png' resource forks, '.DS_Store', '.ipynb_checkpoints') are not data.

    The one rule for training, testing, VisA split files and the structure-map maker, so they agree on the files."""
    return Path(path).name.startswith(".")


def is_image_file(path: Path) -> bool:
    return path.is_file() and not is_hidden(path) and path.suffix.lower() in IMAGE_SUFFIXES


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p))


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
    return sorted(p.name for p in root.iterdir()
                  if not is_hidden(p) and (p / "train").is_dir() and (p / "test").is_dir())


def is_mvtec_layout(root: Path) -> bool:
    return bool(mvtec_categories(root)) or (root / "train").is_dir()


def list_mvtec_task(root: Path, category: str, need_masks: bool = True) -> TaskSamples:
    """One category in the MVTec AD layout; `category` "." means root itself is the category. Without
    `need_masks` (the structure-map maker) a defect image's missing mask is no error (its mask_path is None)."""
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
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir() and not is_hidden(p)):
        defect = defect_dir.name
        for image in _images_in(defect_dir):
            if defect == "good":
                test.append(Sample(image, None, False, "good"))
                continue
            mask = folder / "ground_truth" / defect / f"{image.stem}_mask.png"
            if not mask.is_file():
                # VisA converted by its official script (spot-diff prepare_data.py) names masks <name>.png
                same_name = mask.with_name(f"{image.stem}.png")
                if not same_name.is_file() and not need_masks:
                    same_name = None
                elif not same_name.is_file():
                    raise UcadError(
                        f"defect image '{image}' has no mask: expected '{mask}' (or '{same_name}'). Every image "
                        f"in test/{defect}/ needs ground_truth/{defect}/<name>_mask.png"
                    )
                mask = same_name
            test.append(Sample(image, mask, True, defect))
    if not test:
        raise UcadError(f"test folder '{test_dir}' holds no images")
    return TaskSamples(category, root, train, test)


VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_SPLITS = ("train", "test")
VISA_LABELS = ("normal", "anomaly")


@dataclass(frozen=True)
class VisaRow:
    """One row of VisA's split file, values stripped; split and label lower-cased."""

    line: int  # line number in the file, for messages
    object: str
    split: str
    label: str
    image: str
    mask: str


def read_visa_split(split_file: Path, required=VISA_COLUMNS) -> list[VisaRow]:
    """The rows of split_csv/1cls.csv, checked: every problem is a UcadError naming the file and the line.

    split and label are read case- and space-insensitively ('Train', ' anomaly '); a split other than
    train/test or a label other than normal/anomaly is an error, not a silent test or normal image. Rows whose
    image name starts with '.' are skipped, as hidden files are everywhere else."""
    try:
        with open(split_file, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip().lower() for name in (reader.fieldnames or [])]
            reader.fieldnames = header
            raw = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UcadError(f"split file '{split_file}' cannot be read as CSV text ({type(error).__name__}: {error}); "
                        "restore it from the VisA download (split_csv/1cls.csv)") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise UcadError(f"split file '{split_file}' lacks the columns {missing} (has {header}); "
                        f"expected the columns {', '.join(VISA_COLUMNS)}")
    rows = []
    for line, row in raw:
        extra = [v for v in row.pop(None, []) if v.strip()]  # a trailing comma is harmless, more values are not
        fields = sum(v is not None for v in row.values()) + len(extra)
        if fields != len(header):
            raise UcadError(f"split file '{split_file}' line {line} has {fields} fields instead of {len(header)} "
                            "(a truncated or damaged file?): restore it from the VisA download")
        values = {c: (row.get(c) or "").strip() for c in VISA_COLUMNS}
        values["split"], values["label"] = values["split"].lower(), values["label"].lower()
        if values["split"] not in VISA_SPLITS:
            raise UcadError(f"split file '{split_file}' line {line}: split '{row['split']}' is neither train nor "
                            f"test ({values['image']}); fix that row")
        if "label" in required and values["label"] not in VISA_LABELS:
            raise UcadError(f"split file '{split_file}' line {line}: label '{row['label']}' is neither normal nor "
                            f"anomaly ({values['image']}); fix that row")
        if is_hidden(Path(values["image"])):
            continue
        rows.append(VisaRow(line, **values))
    return rows


def visa_categories(root: Path) -> list[str]:
    split_file = root / VISA_SPLIT_FILE
    if split_file.is_file():
        return sorted({row.object for row in read_visa_split(split_file)})
    found = mvtec_categories(root)
    if not found and is_visa_layout(root):
        raise _no_visa_split_file(root)
    return found


def _no_visa_split_file(root: Path) -> UcadError:
    return UcadError(
        f"'{root}' is neither VisA as distributed (no split file '{root / VISA_SPLIT_FILE}': restore "
        "split_csv/1cls.csv from the VisA download, it says which images are for training) nor VisA converted to "
        "the MVTec layout (no <category>/train and <category>/test folders)")


def is_visa_layout(root: Path) -> bool:
    """VisA as distributed: the split file, or its <category>/Data/Images folders (whose split file is missing)."""
    return (root / VISA_SPLIT_FILE).is_file() or any(
        (p / "Data" / "Images").is_dir() for p in root.iterdir() if p.is_dir() and not is_hidden(p))


def list_visa_task(root: Path, category: str, need_masks: bool = True) -> TaskSamples:
    """VisA as distributed (split_csv/1cls.csv) or already converted to the MVTec layout. Without `need_masks`
    (the structure-map maker) the label and mask columns may be absent and a missing mask is no error."""
    root = Path(root)
    _check_root(root, "DATA_PATH of the dataset sub-command")
    split_file = root / VISA_SPLIT_FILE
    if not split_file.is_file():
        if mvtec_categories(root):
            return list_mvtec_task(root, category, need_masks)
        raise _no_visa_split_file(root)
    all_rows = read_visa_split(split_file, VISA_COLUMNS if need_masks else ("object", "split", "image"))
    rows = [row for row in all_rows if row.object == category]
    if not rows:
        raise _unknown_category(category, sorted({row.object for row in all_rows}), root, "VisA")
    train: list[Sample] = []
    test: list[Sample] = []
    for row in rows:
        image = root / row.image
        anomalous = row.label == "anomaly"
        mask = root / row.mask if anomalous and row.mask else None
        if anomalous and need_masks and (mask is None or not mask.is_file()):
            raise UcadError(f"defect image '{image}' has no mask: expected '{mask}' (column 'mask' of "
                            f"'{split_file}' line {row.line})")
        sample = Sample(image, mask, anomalous, "anomaly" if anomalous else "good")
        (train if row.split == "train" else test).append(sample)
    if not train:
        raise UcadError(f"category '{category}' has no training rows in '{split_file}'")
    return TaskSamples(category, root, train, test)


@dataclass(frozen=True)
class DataLayout:
    """One way a data set is arranged on disk."""

    name: str  # as `dataset NAME` takes it
    description: str  # how its folders look, for messages
    recognises: Callable[[Path], bool]  # does this folder look like this layout
    categories: Callable[[Path], list[str]]  # the categories (tasks) found in a root
    list_task: Callable[[Path, str, bool], TaskSamples]  # (root, category, need_masks) -> the category's samples


LAYOUTS: dict[str, DataLayout] = {}


def register_layout(layout: DataLayout) -> None:
    """A new data layout: it becomes a choice of `dataset NAME` and is recognised by the structure-map maker."""
    LAYOUTS[layout.name] = layout


register_layout(DataLayout(
    "mvtec", "the MVTec layout (ROOT/<category>/train/good/*.png, ROOT/<category>/test/<type>/*.png) or a single "
             "category folder (ROOT/train/good/*, ROOT/test/<type>/*)",
    is_mvtec_layout, mvtec_categories, list_mvtec_task))
register_layout(DataLayout(
    "visa", "VisA as distributed (ROOT/<category>/Data/Images/{Normal,Anomaly}/*.JPG with ROOT/split_csv/1cls.csv) "
            "or converted to the MVTec layout",
    is_visa_layout, visa_categories, list_visa_task))


def layouts_hint() -> str:
    return "expected " + ", or ".join(layout.description for layout in LAYOUTS.values())


def detect_layout(root: str | Path) -> str:
    """The name of the first registered layout that recognises the folder (for tools that are given no NAME)."""
    root = Path(root)
    _check_root(root, "the data path")
    for layout in LAYOUTS.values():
        if layout.recognises(root):
            return layout.name
    raise UcadError(f"no data set found in '{root}': {layouts_hint()}")


def list_tasks(name: str, root: str | Path, categories: list[str], train_val_split: float = 1.0,
               seed: int = 0, need_masks: bool = True) -> list[TaskSamples]:
    """All tasks of a run, in the order given; checks every category before anything is trained.

    `need_masks` False lists images only (the structure-map maker): a missing mask of a test image is no error."""
    root = Path(root)
    if name not in LAYOUTS:
        raise UcadError(f"unknown data layout '{name}': choose one of {', '.join(LAYOUTS)}")
    layout = LAYOUTS[name]
    _check_root(root, f"DATA_PATH of 'dataset {name}'")
    if (root / "train").is_dir() and list(categories) == [root.name]:
        categories = ["."]  # the root is itself the one category, named
    if not categories:
        found = layout.categories(root)
        if not found:
            if (root / "train").is_dir():
                categories = ["."]
            else:
                raise UcadError(f"no categories found in '{root}'; name them with -d or check the path")
        else:
            categories = found
    if len(set(categories)) != len(categories):
        raise UcadError(f"a category is given twice in -d: {categories}")
    tasks = [layout.list_task(root, category, need_masks) for category in categories]
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
