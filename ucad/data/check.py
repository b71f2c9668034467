"""Opening all the data of a run before the first task trains, so that a damaged file of a late task cannot stop
a run after the earlier tasks have trained; every problem is reported at once.

Images and masks are only opened (header and size; PNG chunk checksums verified, a JPEG without its end marker
decoded, to catch truncated downloads), which is fast; images of more than 8 bits are decoded to say how they are
scaled, and structure maps, as counting regions needs pixels."""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ucad.data.layouts import TaskSamples
from ucad.runtime.errors import UcadError
from ucad.data.decode import EIGHT_BIT_MODES, parallel_map, scaling
from ucad.results.metrics import one_class_note
from ucad.data.structure_maps import MAKE_MAPS_HINT, load_structure_map, looks_like_a_photograph, structure_map_path

MAX_LISTED_PROBLEMS = 20
MIN_REGIONS = 2  # SCL contrasts regions: a map with fewer has nothing to teach


@dataclass(frozen=True)
class _File:
    """A file to open and, once opened, what was found."""
    task: int
    kind: str  # "image", "mask" or "structure map"
    path: Path
    image: Path | None = None  # the image a mask or structure map belongs to
    size: tuple[int, int] | None = None  # (width, height)
    problem: str | None = None
    regions: int | None = None
    missing: bool = False
    scaling: str | None = None  # how an image of more than 8 bits is brought to 8 bits
    photograph: bool = False  # a structure map that looks like a grey picture, not region ids


def relation_of_sizes(image_size: tuple[int, int], other_size: tuple[int, int]) -> str:
    """"same", "scaled" (the same picture at another resolution, up to a pixel of rounding) or "different"."""
    if tuple(image_size) == tuple(other_size):
        return "same"
    (image_w, image_h), (other_w, other_h) = image_size, other_size
    if min(image_w, image_h, other_w, other_h) <= 0:
        return "different"
    by_width = abs(image_h * other_w / image_w - other_h) < 1.0
    by_height = abs(image_w * other_h / image_h - other_w) < 1.0
    return "scaled" if by_width or by_height else "different"


def _ends_like_a_jpeg(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - 64))
        return b"\xff\xd9" in handle.read()


def _probe(file: _File) -> _File:
    if file.kind == "structure map":
        if not file.path.is_file():
            return replace(file, missing=True)
        try:
            labels = load_structure_map(file.path)
        except UcadError as error:
            return replace(file, problem=str(error))
        counts = np.bincount(labels.ravel().clip(min=0))
        return replace(file, size=(labels.shape[1], labels.shape[0]), regions=int(np.count_nonzero(counts[1:])),
                       photograph=looks_like_a_photograph(labels))
    try:
        if file.path.is_symlink() and not file.path.exists():
            return replace(file, problem=f"is a symbolic link to '{os.readlink(file.path)}', which does not exist: "
                                         "fix or remove the link")
        if file.path.stat().st_size == 0:
            return replace(file, problem="is empty (0 bytes)")
        with Image.open(file.path) as image:
            opened = replace(file, size=image.size)
            if file.kind == "image" and image.mode not in EIGHT_BIT_MODES:
                image.load()  # such images are rare: decoded to say how they are scaled
                return replace(opened, scaling=scaling(image).rule)
            if image.format == "PNG":
                image.verify()  # chunk checksums: finds a truncated or damaged PNG without decoding it
            elif image.format == "JPEG" and not _ends_like_a_jpeg(file.path):
                image.load()  # no end marker: decode to tell a truncated file from one with trailing bytes
            return opened
    except FileNotFoundError:
        return replace(file, problem="does not exist")
    except UcadError as error:  # a mode that cannot be shown as RGB
        return replace(file, problem=str(error))
    except Exception as error:  # PIL raises many types for damaged files
        return replace(file, problem=f"cannot be read ({type(error).__name__}: {error})")


def _files(tasks: list[TaskSamples], structure_root: Path | None, skip_training_of: int) -> list[_File]:
    files = []
    for index, task in enumerate(tasks):
        if index >= skip_training_of:
            # held-out normal images are read too, for thresholds and the epoch choice
            files += [_File(index, "image", sample.image_path) for sample in task.validation]
            for sample in task.train:
                files.append(_File(index, "image", sample.image_path))
                if structure_root is not None:
                    map_path = structure_map_path(sample.image_path, task.root, structure_root)
                    files.append(_File(index, "structure map", map_path, sample.image_path))
        for sample in task.test:
            files.append(_File(index, "image", sample.image_path))
            if sample.mask_path is not None:
                files.append(_File(index, "mask", sample.mask_path, sample.image_path))
    return files


def check_data(tasks: list[TaskSamples], structure_root: Path | None, workers: int, show: bool = True,
               skip_training_of: int = 0) -> list[str]:
    """Open every image, mask and structure map of every task; raise one UcadError listing every problem, or
    return the notes and warnings to print (at most one of each kind per task). The first `skip_training_of` tasks
    have finished already (--resume): their training images are not read."""
    # the data folder given as the tree of maps would use every grey image as a map of region ids
    if structure_root is not None and any(Path(structure_root).resolve() == Path(t.root).resolve() for t in tasks):
        raise UcadError(f"dataset --structure_path '{structure_root}' is the data folder itself: structure maps are a "
                        f"separate tree of region maps (default DATA_PATH-sam-b); give that tree, or {MAKE_MAPS_HINT}")
    files = parallel_map(_probe, _files(tasks, structure_root, skip_training_of), workers, show,
                         desc="checking data", unit="file")
    image_sizes = {f.path: f.size for f in files if f.kind == "image" and f.size is not None}
    problems: list[str] = []
    # (task, kind) -> scaled files, (task, rule) -> images of more than 8 bits, task -> the structure maps read
    scaled, wide, maps = defaultdict(list), defaultdict(list), defaultdict(list)
    for file in files:
        if file.problem is not None:
            problems.append(file.problem if file.kind == "structure map" else
                            f"{file.kind} '{file.path}' {file.problem}")
        if file.problem is not None or file.missing:
            continue
        image_size = image_sizes.get(file.image)  # None for an image itself, or one that cannot be read
        relation = "same" if image_size is None else relation_of_sizes(image_size, file.size)
        if relation == "scaled":
            scaled[file.task, file.kind].append(file)
        elif relation == "different":
            fix = ("remake it with segment_anything_prep/make_structure_maps.py --overwrite"
                   if file.kind == "structure map" else "replace it with a mask of the image's size")
            problems.append(f"{file.kind} '{file.path}' is {'%dx%d' % file.size} but its image '{file.image}' "
                            f"is {'%dx%d' % image_size} (another aspect ratio, so it cannot be resized to fit): {fix}")
        if file.scaling is not None:
            wide[file.task, file.scaling].append(file)
        if file.kind == "structure map":
            maps[file.task].append(file)

    if missing_maps := [f.path for f in files if f.missing]:
        problems.append(f"{len(missing_maps)} structure map(s) missing under '{structure_root}', e.g. "
                        f"'{missing_maps[0]}'; {MAKE_MAPS_HINT}")
    for index, found in maps.items():
        if photographs := [f for f in found if f.photograph]:
            problems.append(f"task '{tasks[index].category}': {len(photographs)} of {len(found)} structure maps look "
                            "like grey pictures, not region maps (hundreds of values changing in small steps), e.g. "
                            f"'{photographs[0].path}': --structure_path must name the tree of maps that "
                            "segment_anything_prep/make_structure_maps.py makes, not a folder of images")
    messages = [f"note: task '{tasks[index].category}': {len(found)} image(s) are {rule}, e.g. '{found[0].path}'"
                for (index, rule), found in wide.items()]
    for task in tasks:
        anomalous = sum(sample.is_anomalous for sample in task.test)
        if note := one_class_note(len(task.test) - anomalous, anomalous):
            messages.append(f"warning: task '{task.category}': {note}; they are left empty in the results")
    for (index, kind), found in scaled.items():
        messages.append(f"note: task '{tasks[index].category}': {len(found)} {kind}(s) are a scaled copy of their "
                        f"image's size, e.g. '{found[0].path}' {'%dx%d' % found[0].size} for "
                        f"{'%dx%d' % image_sizes[found[0].image]}; they are resized to the image")
    for index, found in maps.items():
        few = [f for f in found if not f.photograph and f.regions < MIN_REGIONS]
        if few and len(few) == len(found):
            problems.append(f"task '{tasks[index].category}': every structure map ({len(found)}) has fewer than "
                            f"{MIN_REGIONS} regions (label 0 = no region), e.g. '{few[0].path}', so SCL has nothing to "
                            "learn from: remake the maps (e.g. with --method felzenszwalb) or train with the option "
                            "--no_scl of the ucad sub-command")
        elif few:
            messages.append(f"warning: task '{tasks[index].category}': {len(few)} of {len(found)} structure maps have "
                            f"fewer than {MIN_REGIONS} regions (label 0 = no region), e.g. '{few[0].path}'; those "
                            "images take no part in prompt training (SCL)")
    if problems:
        listed = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        raise UcadError(f"{len(problems)} problem(s) in the data, found before training (nothing was trained); "
                        "fix them and rerun:\n" + "\n".join(f"  {line}" for line in listed)
                        + (f"\n  ... and {more} more" if more else ""))
    return messages
