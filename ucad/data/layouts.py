"""Data sets as lists of samples, one task per product category: MVTec AD layout and VisA.

Listing is separate from decoding (`ucad.data.decode`), so a bad path or a misspelt category fails in a second, before
any model is built. The training run and the structure-map maker both list through here, so they agree on which
files are data."""
from __future__ import annotations

import csv
import difflib
import os
import random
import unicodedata
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ucad.runtime.errors import UcadError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
VISA_SPLIT_FILE = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
# one checked row of VisA's split file; split and label lower-cased, line numbered for messages
VisaRow = namedtuple("VisaRow", ("line",) + VISA_COLUMNS)


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
    """macOS '._x.png' resource forks, '.DS_Store' and '.ipynb_checkpoints' are not data, anywhere."""
    return Path(path).name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    """The images in `folder` and its sub-folders (batches), sorted by path. A symbolic link is listed even when
    its target is missing, so that the data check names it instead of the image silently missing."""
    found, seen = [], set()
    for current, subfolders, files in os.walk(folder, followlinks=True):
        if os.path.realpath(current) in seen:  # a link back up the tree
            subfolders.clear()
            continue
        seen.add(os.path.realpath(current))
        subfolders[:] = [name for name in subfolders if not is_hidden(Path(name))]
        found += [Path(current) / name for name in files
                  if not is_hidden(Path(name)) and Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def _refuse_loose_entries(folder: Path, meant: str) -> None:
    """An image lying in train/ or test/ itself belongs to no class, and a dangling link may be a whole defect
    folder: each is an error naming it, never dropped."""
    for entry in sorted(p for p in folder.iterdir() if not is_hidden(p)):
        if entry.is_symlink() and not entry.exists():
            raise UcadError(f"'{entry}' is a symbolic link to '{os.readlink(entry)}', which does not exist: fix or "
                            "remove the link")
        if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            raise UcadError(f"image '{entry}' lies in {folder.name}/ itself, where no image is read: move it into "
                            f"{meant}")


def nfc(name: str) -> str:
    """A name as typed and as a file system stores it (macOS writes é as e + accent) compare equal after this."""
    return unicodedata.normalize("NFC", name)


def output_name(image_path: Path) -> str:
    """The name a test image's picture and anomaly map are saved under, unique within its task's test set."""
    return f"{image_path.parent.name}_{image_path.stem}"


def _check_names(task: TaskSamples) -> None:
    """Two images of a task sharing a name without suffix ('000.png', '000.tif') would share one structure map,
    and two test images sharing an output name one picture: each is an error naming both files."""
    seen: dict[Path, Path] = {}
    for sample in task.train + task.validation + task.test:
        if (other := seen.setdefault(sample.image_path.with_suffix(""), sample.image_path)) != sample.image_path:
            raise UcadError(f"images '{other}' and '{sample.image_path}' have the same name without suffix, so "
                            "they would share one structure map and one output file: rename or remove one of them")
    names: dict[str, Path] = {}
    for sample in task.test:
        if (other := names.setdefault(output_name(sample.image_path), sample.image_path)) != sample.image_path:
            raise UcadError(f"test images '{other}' and '{sample.image_path}' would both be saved as "
                            f"'{output_name(sample.image_path)}' (folder and file name) among the run's pictures and "
                            "anomaly maps: rename one of them")


def check_root(root: Path, option: str) -> None:
    if root.is_dir():
        return
    problem = "is not a folder" if root.exists() else "does not exist"
    siblings = [] if root.exists() or not root.parent.is_dir() else root.parent.iterdir()
    twin = next((p for p in siblings if p.name != root.name and nfc(p.name) == nfc(root.name)), None)
    if twin is not None:
        problem += (f"; '{twin}' differs from it only in how accented letters are encoded (Unicode "
                    "normalisation): type the path as stored there, e.g. by completing it with the Tab key")
    raise UcadError(f"data path '{root}' {problem}: pass the folder holding the categories as {option}")


def _category_as_stored(category: str, found: list[str]) -> str:
    """The category whose name as stored equals `category` after Unicode normalisation; the name as typed if none
    does. Two stored names equal after normalisation are an error: which one is meant cannot be told."""
    if category in found or category == ".":
        return category
    same = [name for name in found if nfc(name) == nfc(category)]
    if len(same) > 1:
        raise UcadError(f"categories {', '.join(repr(s) for s in same)} differ only in how accented letters are "
                        "encoded (Unicode normalisation), so -d cannot tell them apart: rename one of the folders")
    return same[0] if same else category


def _unknown_category(category: str, found: list[str], root: Path, layout: str) -> UcadError:
    close = difflib.get_close_matches(category, found, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UcadError(f"category '{category}' not found in '{root}' ({layout} layout).{hint} Categories found: "
                     f"{', '.join(found) or 'none'}. Fix the -d option of the dataset sub-command.")


def mvtec_categories(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()
                  if not is_hidden(p) and (p / "train").is_dir() and (p / "test").is_dir())


def list_mvtec_task(root: Path, category: str, need_masks: bool = True) -> TaskSamples:
    """One category in the MVTec AD layout; `category` "." means root itself is the category."""
    found = mvtec_categories(root) if root.is_dir() else []
    category = _category_as_stored(category, found)
    folder = root if category == "." else root / category
    if category != "." and not (folder / "train").is_dir():
        raise _unknown_category(category, found, root, "MVTec AD")
    train_dir, test_dir = folder / "train" / "good", folder / "test"
    _refuse_loose_entries(folder / "train", "train/good/")
    if not train_dir.is_dir():
        raise UcadError(f"training folder '{train_dir}' is missing: a category needs train/good/ with normal images")
    train = [Sample(p, None, False, "good") for p in _images_in(train_dir)]
    if not train:
        raise UcadError(f"training folder '{train_dir}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if not test_dir.is_dir():
        raise UcadError(f"test folder '{test_dir}' is missing: a category needs test/good/ and test/<defect>/")
    _refuse_loose_entries(test_dir, "test/good/ (normal) or test/<defect type>/")
    test = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir() and not is_hidden(p)):
        defect = defect_dir.name
        for image in _images_in(defect_dir):
            mask = None
            if defect != "good":
                # a mask lies in the same sub-folder (batch) of ground_truth/<defect>/ as its image in test/<defect>/;
                # VisA converted by its official script (spot-diff prepare_data.py) names masks <name>.png
                mask_folder = folder / "ground_truth" / defect / image.parent.relative_to(defect_dir)
                names = (mask_folder / f"{image.stem}_mask.png", mask_folder / f"{image.stem}.png")
                mask = next((name for name in names if name.is_file()), None)
                if mask is None and need_masks:
                    raise UcadError(f"defect image '{image}' has no mask: expected '{names[0]}' (or '{names[1]}'). "
                                    f"Every image in test/{defect}/ needs ground_truth/{defect}/<name>_mask.png, "
                                    "in the same sub-folder as the image")
            test.append(Sample(image, mask, defect != "good", defect))
    if not test:
        raise UcadError(f"test folder '{test_dir}' holds no images")
    return TaskSamples(category, root, train, test)


def read_visa_split(split_file: Path, required=VISA_COLUMNS) -> list[VisaRow]:
    """The rows of split_csv/1cls.csv; every problem is a UcadError naming the file and the line. split and label
    ignore case and spaces ('Train', ' anomaly '); any other value is an error, not a silent test or normal image."""
    try:
        with open(split_file, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            reader.fieldnames = header = [name.strip().lower() for name in (reader.fieldnames or [])]
            raw = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UcadError(f"split file '{split_file}' cannot be read as CSV text ({type(error).__name__}: {error}); "
                        "restore it from the VisA download (split_csv/1cls.csv)") from None
    if missing := [c for c in required if c not in header]:
        raise UcadError(f"split file '{split_file}' lacks the columns {missing} (has {header}); "
                        f"expected the columns {', '.join(VISA_COLUMNS)}")
    rows, first_line = [], {}
    for line, row in raw:
        extra = [v for v in row.pop(None, []) if v.strip()]  # a trailing comma is harmless, more values are not
        if (fields := sum(v is not None for v in row.values()) + len(extra)) != len(header):
            raise UcadError(f"split file '{split_file}' line {line} has {fields} fields instead of {len(header)} "
                            "(a truncated or damaged file?): restore it from the VisA download")
        values = {c: (row.get(c) or "").strip() for c in VISA_COLUMNS}
        for column, allowed in (("split", ("train", "test")), ("label", ("normal", "anomaly"))):
            values[column] = values[column].lower()
            if column in required and values[column] not in allowed:
                raise UcadError(f"split file '{split_file}' line {line}: {column} '{row[column]}' is neither "
                                f"{allowed[0]} nor {allowed[1]} ({values['image']}); fix that row")
        if (earlier := first_line.setdefault(nfc(values["image"]), line)) != line:
            raise UcadError(f"split file '{split_file}' line {line} repeats the image {values['image']} of line "
                            f"{earlier}, so it would be counted twice: remove one of the two rows")
        if not is_hidden(Path(values["image"])):
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
    return UcadError(f"'{root}' is neither VisA as distributed (no split file '{root / VISA_SPLIT_FILE}': restore "
                     "split_csv/1cls.csv from the VisA download, it says which images are for training) nor VisA "
                     "converted to the MVTec layout (no <category>/train and <category>/test folders)")


def is_visa_layout(root: Path) -> bool:
    """VisA as distributed: the split file, or its <category>/Data/Images folders (whose split file is missing)."""
    return (root / VISA_SPLIT_FILE).is_file() or any(
        (p / "Data" / "Images").is_dir() for p in root.iterdir() if p.is_dir() and not is_hidden(p))


def list_visa_task(root: Path, category: str, need_masks: bool = True) -> TaskSamples:
    """VisA as distributed (split_csv/1cls.csv) or converted to the MVTec layout. Without `need_masks` the label
    and mask columns may be absent."""
    split_file = root / VISA_SPLIT_FILE
    if not split_file.is_file():
        if mvtec_categories(root):
            return list_mvtec_task(root, category, need_masks)
        raise _no_visa_split_file(root)
    all_rows = read_visa_split(split_file, VISA_COLUMNS if need_masks else ("object", "split", "image"))
    found = sorted({row.object for row in all_rows})
    category = _category_as_stored(category, found)
    rows = [row for row in all_rows if row.object == category]
    if not rows:
        raise _unknown_category(category, found, root, "VisA")
    train, test = [], []
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
    lambda root: bool(mvtec_categories(root)) or (root / "train").is_dir(), mvtec_categories, list_mvtec_task))
register_layout(DataLayout(
    "visa", "VisA as distributed (ROOT/<category>/Data/Images/{Normal,Anomaly}/*.JPG with ROOT/split_csv/1cls.csv) "
            "or converted to the MVTec layout",
    is_visa_layout, visa_categories, list_visa_task))


def list_tasks(name: str, root: str | Path, categories: list[str], train_val_split: float = 1.0,
               seed: int = 0, need_masks: bool = True) -> list[TaskSamples]:
    """All tasks of a run, in the order given, every category checked before anything trains. Without `need_masks`
    (the structure-map maker) a defect image's missing mask is no error: its mask_path is None."""
    root = Path(root)
    if (layout := LAYOUTS.get(name)) is None:
        raise UcadError(f"dataset NAME '{name}' is not one of {', '.join(LAYOUTS)}")
    check_root(root, f"DATA_PATH of 'dataset {name}'")
    single_category = (root / "train").is_dir()  # "." lists the root itself as the one category
    if single_category and list(categories) == [root.name]:
        categories = ["."]
    categories = categories or layout.categories(root) or (["."] if single_category else [])
    if not categories:
        raise UcadError(f"no categories found in '{root}'; name them with -d or check the path")
    if len({nfc(c) for c in categories}) != len(categories):
        raise UcadError(f"a category is given twice in -d: {categories}")
    tasks = [layout.list_task(root, category, need_masks) for category in categories]
    for task in tasks:
        _check_names(task)
        # a seeded subset, not the first files, so the split does not depend on file naming
        order = list(range(len(task.train)))
        random.Random(seed).shuffle(order)
        keep = max(1, round(len(order) * train_val_split))
        task.validation = [task.train[i] for i in sorted(order[keep:])]
        task.train = [task.train[i] for i in sorted(order[:keep])]
        if task.category == ".":
            task.category = root.name
    return tasks
