"""Result files of a run: log_project/log_group_N/ with per-phase records, accuracy matrices, the
final summary (mean and forgetting), configuration and timings, written after every task."""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np

from ucad.errors import UcadError
from ucad.metrics import final_average, forgetting_measure

METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")
TABLE_METRICS = ("image_auroc", "image_f1_at_threshold", "image_f1max", "pixel_auroc", "pixel_ap", "aupro")
TABLE_HEADINGS = {"image_f1_at_threshold": "img_f1@thr", "image_f1max": "img_f1max"}
MATRIX_METRICS = METRICS + ("routing_accuracy", "routing_margin")
# honest decisions at the thresholds from held-out normal images, and the F1-max upper bound beside them
THRESHOLD_METRICS = ("image_f1_at_threshold", "image_precision_at_threshold", "image_recall_at_threshold",
                     "image_f1max", "pixel_f1_at_threshold", "pixel_precision_at_threshold",
                     "pixel_recall_at_threshold", "pixel_f1max")
SUMMARY_METRICS = MATRIX_METRICS + THRESHOLD_METRICS


# a run folder is LOG_GROUP_N; this many digits of N are allowed for when checking the name's length
RUN_NUMBER_DIGITS = 6


def check_results_path(results_path: str | Path, log_project: str, log_group: str) -> None:
    """Fail in a second, before the backbone is loaded, if the run folder could not be made: a part of the path
    is a file, the nearest existing folder is not writable, or a name is longer than the file system allows."""
    if not log_group or "/" in log_group or "\\" in log_group or log_group in (".", ".."):
        raise UcadError(f"--log_group '{log_group}' must be a plain folder name (no '/'): the run folder is "
                        "RESULTS_PATH/LOG_PROJECT/LOG_GROUP_N")
    project = Path(results_path) / log_project
    existing = project
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UcadError(f"results path '{project}' cannot be made: '{existing}' is a file, not a folder; "
                        "choose another RESULTS_PATH")
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    to_make = list(project.relative_to(existing).parts) if project != existing else []
    for part in to_make:
        if len(part.encode()) > name_max:
            raise UcadError(f"'{part}' in the results path '{project}' is {len(part.encode())} bytes long; this file "
                            f"system allows {name_max}: choose a shorter RESULTS_PATH or --log_project")
    run_name = f"{log_group}_{'9' * RUN_NUMBER_DIGITS}"
    if len(run_name.encode()) > name_max:
        raise UcadError(f"--log_group is {len(log_group.encode())} bytes long; with the run number appended a folder "
                        f"name may have at most {name_max} bytes on this file system: choose a shorter --log_group "
                        f"(at most {name_max - RUN_NUMBER_DIGITS - 1})")
    try:  # os.access says yes to root on read-only mounts; making a file is the real test
        handle, probe = tempfile.mkstemp(prefix=".ucad-write-test-", dir=existing)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise UcadError(f"results path '{project}' is not writable: cannot create files in '{existing}' "
                        f"({error.strerror or error}); choose a RESULTS_PATH you can write to") from None


def _run_numbers(project: Path, log_group: str) -> dict[int, Path]:
    if not project.is_dir():
        return {}
    return {int(m.group(1)): p for p in project.iterdir()
            if (m := re.fullmatch(re.escape(log_group) + r"_(\d+)", p.name))}


def new_run_dir(results_path: str | Path, log_project: str, log_group: str) -> Path:
    """results_path/log_project/log_group_N with N one more than the largest there: nothing is overwritten.

    Two runs started at once may pick the same N; the one whose mkdir loses takes the next number."""
    project = Path(results_path) / log_project
    project.mkdir(parents=True, exist_ok=True)
    for _ in range(1000):
        run_dir = project / f"{log_group}_{max(_run_numbers(project, log_group), default=-1) + 1}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise UcadError(f"could not make a new run folder in '{project}' for --log_group {log_group}: other runs keep "
                    "taking the numbers; start this run again")


def latest_run_dir(results_path: str | Path, log_project: str, log_group: str,
                   containing: str | None = None) -> Path | None:
    """The run folder of log_group with the largest N; with `containing`, the largest that holds that file."""
    runs = _run_numbers(Path(results_path) / log_project, log_group)
    for number in sorted(runs, reverse=True):
        if containing is None or (runs[number] / containing).is_file():
            return runs[number]
    return None


def remove_temporary_files(run_dir: Path) -> int:
    """Deletes the *.tmp files a killed write left in a run folder; returns how many."""
    stray = [p for p in Path(run_dir).rglob("*.tmp") if p.is_file()]
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


@contextlib.contextmanager
def _atomic(path: Path):
    """Yields a temporary name next to `path`; renamed onto `path` only if the block finishes."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        yield temporary
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def accuracy_matrix(records: list[dict], variant: str, metric: str, num_tasks: int) -> np.ndarray:
    matrix = np.full((num_tasks, num_tasks), np.nan)
    for r in records:
        if r["variant"] == variant:
            matrix[r["phase"], r["task_index"]] = r[metric]
    return matrix


def summarize(records: list[dict], task_names: list[str]) -> list[dict]:
    """Final mean and forgetting per (variant, metric), over the phases finished so far."""
    phases = max((r["phase"] for r in records), default=-1) + 1
    summary = []
    for variant in sorted({r["variant"] for r in records}):
        row = {"variant": variant, "tasks_finished": phases}
        for metric in SUMMARY_METRICS:
            matrix = accuracy_matrix(records, variant, metric, phases)
            row[f"final_{metric}"] = final_average(matrix)
            row[f"fm_{metric}"] = forgetting_measure(matrix) if phases > 1 else float("nan")
        summary.append(row)
    return summary


def _clean(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (np.floating,)):
        return _clean(float(value))
    return value


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    fields = list(rows[0].keys())
    for row in rows[1:]:
        fields += [k for k in row if k not in fields]
    with _atomic(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if _clean(v) is None else v) for k, v in row.items()})


def write_json(path: Path, data) -> None:
    with _atomic(path) as temporary:
        temporary.write_text(json.dumps(_jsonable(data), indent=2))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_run_results(run_dir: Path, records: list[dict], image_rows: list[dict], task_names: list[str],
                      summary_extra: dict | None = None) -> list[dict]:
    """The result files of a run (or of ucad.evaluate on a saved model): metrics per (phase, task, variant),
    their final mean and forgetting, accuracy matrices, and one row per test image and phase."""
    write_csv(run_dir / "results_all_phases.csv", records)
    last = max(r["phase"] for r in records)
    write_csv(run_dir / "results_per_task.csv", [r for r in records if r["phase"] == last])
    summary = summarize(records, task_names)
    write_csv(run_dir / "results_mean.csv", summary)
    write_csv(run_dir / "scores_per_image.csv", image_rows)
    write_matrices(run_dir, records, task_names)
    write_heatmap(run_dir / "image_auroc_matrix.png", records, task_names)
    write_json(run_dir / "summary.json", {"summary": summary, "tasks_finished": last + 1, "task_order": task_names,
                                          **(summary_extra or {})})
    return summary


def write_matrices(run_dir: Path, records: list[dict], task_names: list[str]) -> None:
    folder = run_dir / "matrices"
    folder.mkdir(exist_ok=True)
    phases = max((r["phase"] for r in records), default=-1) + 1
    for variant in sorted({r["variant"] for r in records}):
        for metric in MATRIX_METRICS:
            matrix = accuracy_matrix(records, variant, metric, phases)
            rows = [{"after_task": task_names[t], **{task_names[j]: _fmt(matrix[t, j]) for j in range(phases)}}
                    for t in range(phases)]
            write_csv(folder / f"{variant}_{metric}.csv", rows)


def _fmt(value: float) -> str:
    return "" if np.isnan(value) else f"{value:.6f}"


HEATMAP_LABELLED_TASKS = 20  # above this many tasks the picture shows colours only


def write_heatmap(path: Path, records: list[dict], task_names: list[str], variant: str = "task_agnostic",
                  metric: str = "image_auroc") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = max((r["phase"] for r in records), default=-1) + 1
    matrix = accuracy_matrix(records, variant, metric, phases)
    # drawing cost grows with the figure and with one label per cell: both are capped, so a stream of hundreds
    # of tasks redraws the picture after every task in about constant time (the CSV matrices hold the numbers)
    size = min(14.0, max(4.0, 0.55 * phases + 2))
    figure, axis = plt.subplots(figsize=(size, size * 0.85))
    image = axis.imshow(np.ma.masked_invalid(matrix), vmin=0.5, vmax=1.0, cmap="viridis")
    if phases <= HEATMAP_LABELLED_TASKS:
        names = task_names[:phases]
        axis.set_xticks(range(phases), names, rotation=60, ha="right", fontsize=8)
        axis.set_yticks(range(phases), names, fontsize=8)
        for t in range(phases):
            for j in range(t + 1):
                axis.text(j, t, f"{matrix[t, j]:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if matrix[t, j] < 0.8 else "black")
    axis.set_xlabel("evaluated task")
    axis.set_ylabel("after learning task")
    axis.set_title(f"{metric} ({variant})")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    try:
        with _atomic(path) as temporary:
            figure.savefig(temporary, dpi=120, format="png")
    finally:
        plt.close(figure)


def final_table(records: list[dict], task_names: list[str], mode: str) -> str:
    """The readable end-of-run table: per task after the last phase, then mean and forgetting."""
    if not records:
        return "(no results)"
    last = max(r["phase"] for r in records)
    by_key = {(r["task_index"], r["variant"]): r for r in records if r["phase"] == last}
    has_unlimited = any(v == "task_agnostic_unlimited" for _, v in by_key)
    header = ["task"] + [TABLE_HEADINGS.get(m, m) for m in TABLE_METRICS] + ["routing", "margin", "oracle_img_auroc"]
    if has_unlimited:
        header.append("unlim_img_auroc")
    lines = []
    for j in range(last + 1):
        agnostic = by_key.get((j, "task_agnostic"), {})
        row = [task_names[j]] + [_num(agnostic.get(m)) for m in TABLE_METRICS]
        row += [_num(agnostic.get("routing_accuracy")), _num(agnostic.get("routing_margin")),
                _num(by_key.get((j, "oracle"), {}).get("image_auroc"))]
        if has_unlimited:
            row.append(_num(by_key.get((j, "task_agnostic_unlimited"), {}).get("image_auroc")))
        lines.append(row)
    summary = {s["variant"]: s for s in summarize(records, task_names)}
    for label, prefix in (("mean", "final_"), ("FM", "fm_")):
        agnostic = summary.get("task_agnostic", {})
        row = [label] + [_num(agnostic.get(prefix + m)) for m in TABLE_METRICS]
        row += [_num(agnostic.get(prefix + "routing_accuracy")),
                _num(agnostic.get(prefix + "routing_margin")) if prefix == "final_" else "-",
                _num(summary.get("oracle", {}).get(prefix + "image_auroc"))]
        if has_unlimited:
            row.append(_num(summary.get("task_agnostic_unlimited", {}).get(prefix + "image_auroc")))
        lines.append(row)
    title = f"{mode.upper()} after {last + 1} task(s): task-agnostic results (routing by keys); " \
            "oracle = task given; img_f1@thr = F1 at the threshold from held-out normal images (never saw the " \
            "test set), img_f1max = F1 at the best test threshold (an upper bound)"
    return title + "\n" + _render(header, lines, last + 1)


def _render(header: list[str], lines: list[list[str]], rule_before: int | None = None) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    render = [" | ".join(str(x).ljust(w) for x, w in zip(header, widths))]
    render.append("-+-".join("-" * w for w in widths))
    for i, row in enumerate(lines):
        if i == rule_before:
            render.append("-+-".join("-" * w for w in widths))
        render.append(" | ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    return "\n".join(render)


def threshold_table(records: list[dict], thresholds: dict) -> str:
    """Per task after the last phase: its thresholds and the task-agnostic decisions they give on its test set.

    thresholds: task name -> ucad.thresholds.Threshold, or None where the task has none."""
    last = max(r["phase"] for r in records)
    rows = {r["task"]: r for r in records if r["phase"] == last and r["variant"] == "task_agnostic"}
    header = ["task", "image_thr", "pixel_thr", "held_out", "img_f1@thr", "img_prec@thr", "img_rec@thr",
              "img_f1max", "pix_f1@thr", "pix_f1max"]
    lines = []
    for task, record in rows.items():
        threshold = thresholds.get(task)
        lines.append([task, _threshold(threshold.image if threshold else None),
                      _threshold(threshold.pixel if threshold else None), str(threshold.images) if threshold else "-"]
                     + [_num(record.get(m)) for m in ("image_f1_at_threshold", "image_precision_at_threshold",
                                                      "image_recall_at_threshold", "image_f1max",
                                                      "pixel_f1_at_threshold", "pixel_f1max")])
    quantile = next((t.quantile for t in thresholds.values() if t is not None), None)
    title = ("thresholds per task (quantile %g of held-out normal training images' scores; decisions on the "
             "task-agnostic test results)" % quantile) if quantile is not None else "thresholds per task"
    return title + "\n" + _render(header, lines)


def _num(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}"


def _threshold(value: float | None) -> str:
    return "-" if value is None else f"{value:.5g}"  # thresholds are distances, of any magnitude
