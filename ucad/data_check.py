"""Checking all the data of a run before the first task trains.

A zero-byte image in the test set of task 7 used to stop an MVTec run after six tasks had trained (hours lost).
Here every training and test image, mask and structure map of every task is opened up front, in parallel, and
every problem is reported at once. Images and masks are only opened (header and size) and, for PNG, their chunk
checksums verified, which reads the file but decodes nothing (a JPEG is decoded only when it lacks its end
marker, to catch truncated downloads); structure maps are decoded, because counting their
regions needs the pixels (and they are small 16-bit PNGs).

The listing itself is `ucad.datasets`'; this module only looks at the files it lists.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ucad.datasets import TaskSamples
from ucad.errors import UcadError
from ucad.structure_maps import MAKE_MAPS_HINT, load_structure_map, structure_map_path

MAX_LISTED_PROBLEMS = 20
MIN_REGIONS = 2  # SCL contrasts regions: a map with fewer has nothing to teach


@dataclass(frozen=True)
class _Job:
    task: int
    kind: str  # "image", "mask" or "structure map"
    path: Path
    image: Path | None = None  # the image a mask or structure map belongs to


@dataclass
class _Finding:
    job: _Job
    size: tuple[int, int] | None = None  # (width, height)
    problem: str | None = None
    regions: int | None = None
    missing: bool = False


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


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _open_header(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) as the file declares it, or the reason it is unusable."""
    try:
        if path.stat().st_size == 0:
            return None, "is empty (0 bytes)"
        with Image.open(path) as image:
            size = image.size
            if image.format == "PNG":
                image.verify()  # chunk checksums: finds a truncated or damaged PNG without decoding it
            elif image.format == "JPEG" and not _ends_like_a_jpeg(path):
                image.load()  # no end marker: decode to tell a truncated file from one with trailing bytes
        return size, None
    except FileNotFoundError:
        return None, "does not exist"
    except Exception as error:  # PIL raises many types for damaged files
        return None, f"cannot be read ({type(error).__name__}: {error})"


def _ends_like_a_jpeg(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - 64))
        return b"\xff\xd9" in handle.read()


def _probe(job: _Job) -> _Finding:
    if job.kind != "structure map":
        size, problem = _open_header(job.path)
        return _Finding(job, size, problem)
    if not job.path.is_file():
        return _Finding(job, missing=True)
    try:
        labels = load_structure_map(job.path)
    except UcadError as error:
        return _Finding(job, problem=str(error))
    counts = np.bincount(labels.ravel().clip(min=0))
    return _Finding(job, (labels.shape[1], labels.shape[0]), regions=int(np.count_nonzero(counts[1:])))


def _jobs(tasks: list[TaskSamples], structure_root: Path | None, skip_training_of: int) -> list[_Job]:
    jobs = []
    for index, task in enumerate(tasks):
        if index >= skip_training_of:
            for sample in task.validation:  # held-out normal images: read for thresholds and epoch choice
                jobs.append(_Job(index, "image", sample.image_path))
            for sample in task.train:
                jobs.append(_Job(index, "image", sample.image_path))
                if structure_root is not None:
                    jobs.append(_Job(index, "structure map",
                                     structure_map_path(sample.image_path, task.root, structure_root),
                                     sample.image_path))
        for sample in task.test:
            jobs.append(_Job(index, "image", sample.image_path))
            if sample.mask_path is not None:
                jobs.append(_Job(index, "mask", sample.mask_path, sample.image_path))
    return jobs


def _run_parallel(jobs: list[_Job], workers: int, show: bool) -> list[_Finding]:
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        return list(tqdm(pool.map(_probe, jobs), total=len(jobs), desc="checking data", unit="file",
                         disable=not show, leave=False))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C must not wait for thousands of queued files


def check_data(tasks: list[TaskSamples], structure_root: Path | None = None, workers: int = 8, show: bool = True,
               skip_training_of: int = 0) -> list[str]:
    """Open every image, mask and structure map of every task; raise one UcadError listing every problem.

    Returns the notes and warnings to print (at most one of each kind per task). `skip_training_of` tasks at the
    start have finished already (--resume): their training images are not needed again.
    A mask or structure map must have its image's size; a scaled copy is resized (and said so once per task);
    any other size is an error naming both files and both sizes. Structure maps with fewer than 2 regions
    (label 0 = no region) do not take part in SCL; a task in which every map is like that is an error."""
    findings = _run_parallel(_jobs(tasks, structure_root, skip_training_of), workers, show)
    image_sizes = {f.job.path: f.size for f in findings if f.job.kind == "image" and f.size is not None}
    problems: list[str] = []
    missing_maps: list[Path] = []
    scaled: dict[tuple[int, str], list[_Finding]] = {}
    few_regions: dict[int, list[_Finding]] = {}
    maps_per_task: dict[int, int] = {}
    for finding in findings:
        job = finding.job
        if finding.missing:
            missing_maps.append(job.path)
            continue
        if finding.problem is not None:
            problems.append(finding.problem if job.kind == "structure map" else
                            f"{job.kind} '{job.path}' {finding.problem}")
            continue
        if job.image is None:
            continue
        image_size = image_sizes.get(job.image)
        if image_size is not None:
            relation = relation_of_sizes(image_size, finding.size)
            if relation == "scaled":
                scaled.setdefault((job.task, job.kind), []).append(finding)
            elif relation == "different":
                fix = ("remake it with segment_anything_prep/make_structure_maps.py --overwrite"
                       if job.kind == "structure map" else "replace it with a mask of the image's size")
                problems.append(f"{job.kind} '{job.path}' is {_size_text(finding.size)} but its image '{job.image}' "
                                f"is {_size_text(image_size)} (another aspect ratio, so it cannot be resized to "
                                f"fit): {fix}")
        if job.kind == "structure map":
            maps_per_task[job.task] = maps_per_task.get(job.task, 0) + 1
            if finding.regions < MIN_REGIONS:
                few_regions.setdefault(job.task, []).append(finding)

    if missing_maps:
        problems.append(f"{len(missing_maps)} structure map(s) missing under '{structure_root}', e.g. "
                        f"'{missing_maps[0]}'; {MAKE_MAPS_HINT}")
    messages = []
    for (index, kind), found in scaled.items():
        example = found[0]
        messages.append(f"note: task '{tasks[index].category}': {len(found)} {kind}(s) are a scaled copy of their "
                        f"image's size, e.g. '{example.job.path}' {_size_text(example.size)} for "
                        f"{_size_text(image_sizes[example.job.image])}; they are resized to the image")
    for index, found in few_regions.items():
        category, total = tasks[index].category, maps_per_task[index]
        if len(found) == total:
            problems.append(f"task '{category}': every structure map ({total}) has fewer than {MIN_REGIONS} regions "
                            f"(label 0 = no region), e.g. '{found[0].job.path}', so SCL has nothing to learn from: "
                            "remake the maps (e.g. with --method felzenszwalb) or train with the option --no_scl of "
                            "the ucad sub-command")
        else:
            messages.append(f"warning: task '{category}': {len(found)} of {total} structure maps have fewer than "
                            f"{MIN_REGIONS} regions (label 0 = no region), e.g. '{found[0].job.path}'; those images "
                            "take no part in prompt training (SCL)")
    if problems:
        listed = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        raise UcadError(f"{len(problems)} problem(s) in the data, found before training (nothing was trained); "
                        "fix them and rerun:\n" + "\n".join(f"  {line}" for line in listed)
                        + (f"\n  ... and {more} more" if more else ""))
    return messages
