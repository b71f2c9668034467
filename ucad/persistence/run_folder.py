"""The run folder RESULTS_PATH/LOG_PROJECT/LOG_GROUP_N and how its files are kept consistent."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from ucad.runtime.errors import UcadError

# a run folder is LOG_GROUP_N; this many digits of N are allowed for when checking the name's length
RUN_NUMBER_DIGITS = 6
# the suffix of every temporary file; remove_temporary_files deletes what a killed write left behind
TEMPORARY_SUFFIX = ".tmp"


def check_results_path(results_path: str | Path, log_project: str, log_group: str) -> None:
    """Fail in a second, before the backbone is loaded, if the run folder could not be made: a part of the path
    is a file, the nearest existing folder is not writable, or a name is longer than the file system allows."""
    if not log_group or "/" in log_group or "\\" in log_group or log_group in (".", ".."):
        raise UcadError(f"--log_group '{log_group}' must be a plain folder name (no '/'): the run folder is "
                        "RESULTS_PATH/LOG_PROJECT/LOG_GROUP_N")
    project = Path(results_path) / log_project
    existing = next((folder for folder in (project, *project.parents) if folder.exists()), project.parents[-1])
    if not existing.is_dir():
        raise UcadError(f"results path '{project}' cannot be made: '{existing}' is a file, not a folder; "
                        "choose another RESULTS_PATH")
    name_max = 255
    with contextlib.suppress(OSError, ValueError, AttributeError):
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    for part in project.relative_to(existing).parts:
        if len(part.encode()) > name_max:
            raise UcadError(f"'{part}' in the results path '{project}' is {len(part.encode())} bytes long; this file "
                            f"system allows {name_max}: choose a shorter RESULTS_PATH or --log_project")
    if len(log_group.encode()) + 1 + RUN_NUMBER_DIGITS > name_max:
        raise UcadError(f"--log_group is {len(log_group.encode())} bytes long; with the run number appended a folder "
                        f"name may have at most {name_max} bytes on this file system: choose a shorter --log_group "
                        f"(at most {name_max - RUN_NUMBER_DIGITS - 1})")
    try:  # os.access says yes to root on read-only mounts; making a file is the real test
        tempfile.TemporaryFile(prefix=".ucad-write-test-", dir=existing).close()
    except OSError as error:
        raise UcadError(f"results path '{project}' is not writable: cannot create files in '{existing}' "
                        f"({error.strerror or error}); choose a RESULTS_PATH you can write to") from None


def prepare_output_folder(folder: Path, option: str) -> None:
    """Make the output folder of ucad.predict or ucad.evaluate and write a file there, so that an unusable one is
    one line (naming `option`) before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(prefix=".ucad-write-test-", dir=folder).close()
    except OSError as error:
        raise UcadError(f"{option} '{folder}' cannot be written ({error.strerror or error}); choose a folder you can "
                        "write to") from None


def _run_numbers(project: Path, log_group: str) -> dict[int, Path]:
    return {int(m.group(1)): p for p in (project.iterdir() if project.is_dir() else ())
            if (m := re.fullmatch(re.escape(log_group) + r"_(\d+)", p.name))}


def new_run_dir(results_path: str | Path, log_project: str, log_group: str) -> Path:
    """results_path/log_project/log_group_N with N one more than the largest there: nothing is overwritten. Two
    runs started at once may pick the same N; the one whose mkdir loses takes the next number."""
    project = Path(results_path) / log_project
    project.mkdir(parents=True, exist_ok=True)
    for _ in range(1000):
        run_dir = project / f"{log_group}_{max(_run_numbers(project, log_group), default=-1) + 1}"
        with contextlib.suppress(FileExistsError):
            run_dir.mkdir()
            return run_dir
    raise UcadError(f"could not make a new run folder in '{project}' for --log_group {log_group}: other runs keep "
                    "taking the numbers; start this run again")


def latest_run_dir(results_path: str | Path, log_project: str, log_group: str, containing: str) -> Path | None:
    """The run folder of log_group with the largest N among those that hold the file `containing`."""
    runs = _run_numbers(Path(results_path) / log_project, log_group)
    return next((runs[n] for n in sorted(runs, reverse=True) if (runs[n] / containing).is_file()), None)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to `path` to write to; it replaces `path` only if the block finishes, so a
    reader never sees half a file. The temporary lies in the same folder (a rename within one file system is
    atomic) under a fixed name, so that what a kill -9 leaves is found by remove_temporary_files (and the file
    gets the usual permissions, where mkstemp's would be 0600)."""
    path = Path(path)
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    try:
        yield temporary
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def remove_temporary_files(run_dir: Path) -> int:
    """Deletes the temporary files a killed write left in a run folder; returns how many."""
    stray = [p for p in Path(run_dir).rglob("*" + TEMPORARY_SUFFIX) if p.is_file()]
    for path in stray:
        path.unlink(missing_ok=True)
    return len(stray)


@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C or SIGTERM during the block takes effect right after it, so the result files of a phase are
    written all or not at all (a kill -9 still can't be held: the checkpoint, written last, is the authority)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, lambda number, frame: received.append(number)) for number in held}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(received):
            if callable(handler := previous[number]):
                handler(number, None)  # Python's own Ctrl-C handler raises KeyboardInterrupt right here
            elif handler == signal.SIG_DFL:
                signal.raise_signal(number)  # e.g. SIGTERM: end the process as it would have
