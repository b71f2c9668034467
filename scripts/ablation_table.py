#!/usr/bin/env python3
"""One table from several finished runs (an ablation): per run and task, the final task-agnostic image AUROC,
pixel AP, AUPRO, routing accuracy and mean routing margin, then the mean over tasks; with each task's feature drift
(how far the kept prompt moved the task's normal patches) and, where epochs were chosen, the chosen epoch.

    python3 scripts/ablation_table.py results/ablation/defaults_0 results/ablation/no_scl_0 ...
    python3 scripts/ablation_table.py --markdown RUN_DIR ...      # for a report

The run's name in the table is its folder name without the trailing _N.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

METRICS = ("image_auroc", "pixel_ap", "aupro", "routing_accuracy", "routing_margin")
HEADER = ("run", "task", "img_auroc", "pix_ap", "aupro", "routing", "margin", "drift", "epoch")


def run_rows(run_dir: Path) -> list[tuple]:
    """The final phase's task-agnostic rows of one run, then their mean."""
    with open(run_dir / "results_all_phases.csv", newline="") as handle:
        records = [r for r in csv.DictReader(handle) if r["variant"] == "task_agnostic"]
    if not records:
        raise SystemExit(f"error: '{run_dir}' has no task-agnostic results (is it a finished UCAD run?)")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    drift, chosen = summary.get("feature_drift", {}), summary.get("chosen_epochs", {})
    last = max(int(r["phase"]) for r in records)
    final = sorted((r for r in records if int(r["phase"]) == last), key=lambda r: int(r["task_index"]))
    name = run_dir.name.rsplit("_", 1)[0] if run_dir.name.rsplit("_", 1)[-1].isdigit() else run_dir.name
    value = lambda r, m: float(r[m]) if r.get(m, "") != "" else float("nan")
    rows = []
    for r in final:
        epoch = chosen.get(r["task"], "")
        task_drift = drift.get(r["task"])  # absent or null where no prompt was kept
        rows.append((name, r["task"], *(value(r, m) for m in METRICS),
                     float("nan") if task_drift is None else task_drift, "none" if epoch is None else str(epoch)))
    means = [_mean([row[2 + i] for row in rows]) for i in range(len(METRICS) + 1)]
    rows.append((name, "mean", *means, ""))
    return rows


def _mean(values: list[float]) -> float:
    """Mean of the defined values (nan where none is)."""
    defined = [v for v in values if v == v]
    return sum(defined) / len(defined) if defined else float("nan")


def format_rows(rows: list[tuple], markdown: bool) -> str:
    cells = [[str(c) if isinstance(c, str) else ("-" if c != c else f"{c:.3f}") for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADER)]
    line = lambda values: " | ".join(v.ljust(w) for v, w in zip(values, widths))
    return "\n".join([line(HEADER), "-+-".join("-" * w for w in widths)] + [line(c) for c in cells])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (each holds results_all_phases.csv)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        if not (Path(run) / "results_all_phases.csv").is_file():
            print(f"error: '{run}' holds no results_all_phases.csv: pass the folders of finished runs", file=sys.stderr)
            return 2
        rows += run_rows(Path(run))
    print(format_rows(rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
