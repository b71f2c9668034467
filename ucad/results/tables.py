"""The result files of a run, rewritten after every task in its run folder: per-phase records, accuracy matrices, the
final summary (mean and forgetting), configuration and timings; and the tables printed at the end of a run."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from ucad.results.metrics import final_average, forgetting_measure
from ucad.persistence.run_folder import atomic_write

TABLE_METRICS = ("image_auroc", "image_f1_at_threshold", "image_f1max", "pixel_auroc", "pixel_ap", "aupro")
TABLE_HEADINGS = {"image_f1_at_threshold": "img_f1@thr", "image_f1max": "img_f1max"}
MATRIX_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro", "routing_accuracy", "routing_margin")
# and honest decisions at the thresholds from held-out normal images, with the F1-max upper bound beside them
SUMMARY_METRICS = MATRIX_METRICS + ("image_f1_at_threshold", "image_precision_at_threshold",
                                    "image_recall_at_threshold", "image_f1max", "pixel_f1_at_threshold",
                                    "pixel_precision_at_threshold", "pixel_recall_at_threshold", "pixel_f1max")


def _phases(records: list[dict]) -> int:
    return max((r["phase"] for r in records), default=-1) + 1


def _missing(value) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def accuracy_matrix(records: list[dict], variant: str, metric: str, num_tasks: int) -> np.ndarray:
    matrix = np.full((num_tasks, num_tasks), np.nan)
    for r in records:
        if r["variant"] == variant:
            matrix[r["phase"], r["task_index"]] = r[metric]
    return matrix


def summarize(records: list[dict]) -> list[dict]:
    """Final mean and forgetting per (variant, metric), over the phases finished so far; final_<metric>_tasks says
    over how many tasks the mean was taken (a task whose test set lacks a class has no value to average)."""
    phases = _phases(records)
    summary = []
    for variant in sorted({r["variant"] for r in records}):
        row = {"variant": variant, "tasks_finished": phases}
        for metric in SUMMARY_METRICS:
            matrix = accuracy_matrix(records, variant, metric, phases)
            row[f"final_{metric}"] = final_average(matrix)
            row[f"final_{metric}_tasks"] = int(np.isfinite(matrix[-1]).sum()) if phases else 0
            row[f"fm_{metric}"] = forgetting_measure(matrix)
        summary.append(row)
    return summary


def _last_phase(records: list[dict]) -> dict[str, dict]:
    """task -> its task-agnostic record after the last phase."""
    last = _phases(records) - 1
    return {r["task"]: r for r in records if r["phase"] == last and r["variant"] == "task_agnostic"}


def notes_of_last_phase(records: list[dict]) -> dict[str, str]:
    """task -> why some of its metrics are empty, after the last phase."""
    return {task: r["note"] for task, r in _last_phase(records).items() if r.get("note")}


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_write(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: "" if _missing(v) else v for k, v in row.items()} for row in rows)


def write_json(path: Path, data) -> None:
    with atomic_write(path) as temporary:
        temporary.write_text(json.dumps(_jsonable(data), indent=2, default=str))  # default: the paths in it


def _jsonable(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value  # JSON has no NaN


def write_run_results(run_dir: Path, records: list[dict], image_rows: list[dict], task_names: list[str],
                      summary_extra: dict | None = None) -> None:
    """The result files of a run (or of ucad.evaluate on a saved model), each metric per phase, task and variant."""
    phases = _phases(records)
    write_csv(run_dir / "results_all_phases.csv", records)
    write_csv(run_dir / "results_per_task.csv", [r for r in records if r["phase"] == phases - 1])
    summary = summarize(records)
    write_csv(run_dir / "results_mean.csv", summary)
    write_csv(run_dir / "scores_per_image.csv", image_rows)
    (run_dir / "matrices").mkdir(exist_ok=True)
    for variant in sorted({r["variant"] for r in records}):
        for metric in MATRIX_METRICS:
            matrix = accuracy_matrix(records, variant, metric, phases)
            rows = [{"after_task": task_names[t],
                     **{task_names[j]: "" if np.isnan(matrix[t, j]) else f"{matrix[t, j]:.6f}" for j in range(phases)}}
                    for t in range(phases)]
            write_csv(run_dir / "matrices" / f"{variant}_{metric}.csv", rows)
    write_heatmap(run_dir / "image_auroc_matrix.png", records, task_names)
    write_json(run_dir / "summary.json", {"summary": summary, "tasks_finished": phases, "task_order": task_names,
                                          "metrics_left_empty": notes_of_last_phase(records), **(summary_extra or {})})


def write_heatmap(path: Path, records: list[dict], task_names: list[str]) -> None:
    """The task-agnostic image AUROC matrix as a picture."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    phases = _phases(records)
    matrix = accuracy_matrix(records, "task_agnostic", "image_auroc", phases)
    # drawing cost grows with the figure and with one label per cell: both are capped, so a stream of hundreds
    # of tasks redraws the picture after every task in about constant time (the CSV matrices hold the numbers)
    size = min(14.0, max(4.0, 0.55 * phases + 2))
    figure = Figure(figsize=(size, size * 0.85))
    axis = figure.subplots()
    image = axis.imshow(np.ma.masked_invalid(matrix), vmin=0.5, vmax=1.0, cmap="viridis")
    if phases <= 20:  # above this many tasks the picture shows colours only
        names = task_names[:phases]
        axis.set_xticks(range(phases), names, rotation=60, ha="right", fontsize=8)
        axis.set_yticks(range(phases), names, fontsize=8)
        for t in range(phases):
            for j in range(t + 1):
                axis.text(j, t, f"{matrix[t, j]:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if matrix[t, j] < 0.8 else "black")
    axis.set(xlabel="evaluated task", ylabel="after learning task", title="image_auroc (task_agnostic)")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    with atomic_write(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")


def final_table(records: list[dict], task_names: list[str], mode: str) -> str:
    """The readable end-of-run table: per task after the last phase, then mean and forgetting."""
    if not records:
        return "(no results)"
    phases = _phases(records)
    by_key = {(r["task_index"], r["variant"]): r for r in records if r["phase"] == phases - 1}
    columns = [("task_agnostic", m, TABLE_HEADINGS.get(m, m)) for m in TABLE_METRICS]
    columns += [("task_agnostic", "routing_accuracy", "routing"), ("task_agnostic", "routing_margin", "margin"),
                ("oracle", "image_auroc", "oracle_img_auroc")]
    if any(variant == "task_agnostic_unlimited" for _, variant in by_key):
        columns.append(("task_agnostic_unlimited", "image_auroc", "unlim_img_auroc"))
    lines = [[task_names[j]] + [_num(by_key.get((j, variant), {}).get(m)) for variant, m, _ in columns]
             for j in range(phases)]
    summary = {s["variant"]: s for s in summarize(records)}
    lines.append(["mean"] + [_mean(summary.get(variant, {}), m, phases) for variant, m, _ in columns])
    # the margin shrinks as tasks are added whatever the model keeps, so its forgetting is not shown
    lines.append(["FM"] + ["-" if m == "routing_margin" else _num(summary.get(variant, {}).get("fm_" + m))
                           for variant, m, _ in columns])
    title = f"{mode.upper()} after {phases} task(s): task-agnostic results (routing by keys); " \
            "oracle = task given; img_f1@thr = F1 at the threshold from held-out normal images (never saw the " \
            "test set), img_f1max = F1 at the best test threshold (an upper bound)"
    notes = notes_of_last_phase(records)
    footer = "".join(f"\n'-' for task '{task}': {note}" for task, note in notes.items())
    if notes:
        footer += "\na mean marked (n/N) is taken over the n of the N tasks that have a value"
    return title + "\n" + _render(["task"] + [heading for *_, heading in columns], lines, phases) + footer


def _mean(summary_row: dict, metric: str, phases: int) -> str:
    """A mean over tasks, with (n/N) where only n of the N tasks have a value."""
    value, tasks = summary_row.get(f"final_{metric}"), summary_row.get(f"final_{metric}_tasks", phases)
    if _missing(value) or tasks == phases:
        return _num(value)
    return f"{_num(value)} ({tasks}/{phases})"


def _render(header: list[str], lines: list[list[str]], rule_before: int | None = None) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    rule = "-+-".join("-" * w for w in widths)
    rows = [" | ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [header] + lines]
    if rule_before is not None:
        rows.insert(rule_before + 1, rule)
    rows.insert(1, rule)
    return "\n".join(rows)


def final_tables(records: list[dict], task_names: list[str], mode: str, thresholds: dict) -> str:
    """The end-of-run table and, where some task has thresholds (task name -> ucad.learning.thresholds.Threshold or
    None), per task after the last phase: its thresholds and the task-agnostic decisions they give on its test set."""
    table = final_table(records, task_names, mode)
    if not any(thresholds.values()):
        return table
    header = ["task", "image_thr", "pixel_thr", "held_out", "img_f1@thr", "img_prec@thr", "img_rec@thr",
              "img_f1max", "pix_f1@thr", "pix_f1max"]
    shown = ("image_f1_at_threshold", "image_precision_at_threshold", "image_recall_at_threshold", "image_f1max",
             "pixel_f1_at_threshold", "pixel_f1max")
    lines = []
    for task, record in _last_phase(records).items():
        threshold = thresholds.get(task)
        # thresholds are distances, of any magnitude
        given = [f"{threshold.image:.5g}", f"{threshold.pixel:.5g}", str(threshold.images)] if threshold else ["-"] * 3
        lines.append([task, *given] + [_num(record.get(m)) for m in shown])
    quantile = next(t.quantile for t in thresholds.values() if t is not None)
    title = (f"thresholds per task (quantile {quantile:g} of held-out normal training images' scores; decisions on "
             "the task-agnostic test results)")
    return table + "\n\n" + title + "\n" + _render(header, lines)


def _num(value) -> str:
    return "-" if _missing(value) else f"{value:.3f}"


def route_trust_line(image_rows: list[dict], threshold: float | None, quantile: float) -> str | None:
    """How many of the images (rows of scores_per_image.csv) had a route too close to call, and the routing accuracy
    of the rest; None where no route was judged."""
    judged = [r for r in image_rows if r.get("route_trusted") is not None]
    if not judged or threshold is None:
        return None
    trusted = [r for r in judged if r["route_trusted"]]
    accuracy = {name: f"{np.mean([r['routed_task'] == r['true_task'] for r in rows]):.3f}" if rows else "-"
                for name, rows in (("trusted", trusted), ("all", judged))}
    return (f"routes not trusted: {len(judged) - len(trusted)} of {len(judged)} test images (routing margin below "
            f"{threshold:.4g}, quantile {quantile:g} of the held-out normal images' margins): send them to a person. "
            f"Routing accuracy on the trusted routes {accuracy['trusted']} (on all {accuracy['all']})")
