#!/usr/bin/env python3
"""Several finished runs in one table, seeds summarised: mean ± sample std (n) per configuration, task and metric.

    python3 scripts/summarize.py results_s*/MVTecAD_Results/*_0      # the three seeds of run_mvtec.sh's example
    python3 scripts/summarize.py --csv table.csv --markdown table.md RUN_DIR...

Runs whose configurations are equal but for --seed and the options that only say how or where a run executes
(--gpu, --cpu, --log_group, the save flags, --num_workers, --feature_batch_size ...) form one configuration; each is
named by the options in which it differs from the others, as typed (`--knowledge_storage pq --memory_size 2176`), or
by its --log_group where its runs share one that no other configuration has; alone, it is "all". Per configuration,
task and metric of the final phase (image and pixel AUROC and AP, AUPRO, routing accuracy and margin, the F1 at the
held-out threshold where thresholds were set; from summary.json the bytes kept, the feature drift and the chosen
epoch) the table gives the mean over the runs, their sample standard deviation (ddof 1; none for one run) and their
number; the row "mean" holds the same over each run's mean over its tasks, and the run's timed seconds (the sum of
the phases in timings.json).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ucad.config import CONFIG_CLASSES, cli_parameter  # noqa: E402

# (quantity, table header, cell format); the first eight are columns of results_per_task.csv
QUANTITIES = (("image_auroc", "img_auroc", ".3f"), ("image_ap", "img_ap", ".3f"), ("pixel_auroc", "pix_auroc", ".3f"),
              ("pixel_ap", "pix_ap", ".3f"), ("aupro", "aupro", ".3f"), ("routing_accuracy", "routing", ".3f"),
              ("routing_margin", "margin", ".3f"), ("image_f1_at_threshold", "img_f1@thr", ".3f"),
              ("memory_bytes", "bytes", ",.0f"), ("feature_drift", "drift", ".4f"), ("chosen_epoch", "epoch", ".1f"),
              ("seconds", "seconds", ".1f"))
RESULT_COLUMNS = tuple(name for name, _, _ in QUANTITIES[:8])
MEAN_ROW = "mean"
# The run section says how and where a run executes; of it, only these change the numbers it computes.
RUN_FIELDS_THAT_CHANGE_RESULTS = ("precision", "fpr_limit")


class SummaryError(Exception):
    """A run that cannot be summarised, or runs that cannot be summarised together: one line for the user."""


@dataclass
class Run:
    path: Path
    config: dict
    rows: list[dict]  # results_per_task.csv: the final phase, one row per task and variant
    summary: dict
    seconds: float | None

    @property
    def seed(self) -> int:
        return self.config.get("learning", {}).get("seed", 0)

    @property
    def log_group(self) -> str | None:
        return self.config.get("run", {}).get("log_group")

    @property
    def tasks(self) -> list[str]:
        return self.config.get("task_order") or list(dict.fromkeys(row["task"] for row in self.rows))


@dataclass(frozen=True)
class Statistic:
    mean: float
    std: float | None  # None for a single run
    n: int


def load_run(path: Path) -> Run:
    if not (path / "results_per_task.csv").is_file():
        raise SummaryError(f"'{path}' holds no results_per_task.csv: pass the folders of finished runs")
    if not (path / "config.json").is_file():
        raise SummaryError(f"'{path}' holds no config.json: pass the folders of runs made by run_ucad.py")
    with open(path / "results_per_task.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    config = json.loads((path / "config.json").read_text())
    summary_file, timings_file = path / "summary.json", path / "timings.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    run = Run(path, config, rows, summary, sum(t["seconds"] for t in timings.values()) if timings else None)
    finished = {row["task"] for row in rows}
    if len(finished) < len(run.tasks):
        raise SummaryError(f"'{path}' finished {len(finished)} of its {len(run.tasks)} tasks: continue it with "
                           "--resume, or leave it out")
    return run


def defining_options(config: dict) -> dict[str, object]:
    """What a run computes, as {option as typed: value}: every configuration field but --seed and those that only
    say how or where the run executes (marked resume_may_differ, and the run section but for its exceptions)."""
    options = {}
    for section, config_class in CONFIG_CLASSES.items():
        recorded = config.get(section, {})
        for config_field in fields(config_class):
            parameter = cli_parameter(config_field)
            if (section, config_field.name) == ("learning", "seed") or (parameter and parameter.resume_may_differ):
                continue
            if section == "run" and config_field.name not in RUN_FIELDS_THAT_CHANGE_RESULTS:
                continue
            # a field that the run's version did not have yet ran at its default
            default = json.loads(json.dumps(config_field.default)) if config_field.default is not MISSING else None
            value = recorded.get(config_field.name, default)
            if parameter is None:
                options[f"{section}.{config_field.name}"] = value
            elif parameter.click.get("is_flag"):
                options[parameter.typed] = "on" if value == parameter.click.get("flag_value", True) else "off"
            else:
                options[parameter.typed] = value
    options["task_order"] = config.get("task_order")
    return options


def _shown(option: str, value) -> str:
    if isinstance(value, list):
        value = " ".join(map(str, value)) if value else "none"
    return f"{option} {value}"


def group_configurations(runs: list[Run]) -> dict[str, list[Run]]:
    """{name: its runs in seed order}, in the order the configurations first appear; refuses a seed given twice."""
    groups: dict[str, list[Run]] = {}
    options_of: dict[str, dict] = {}
    for run in runs:
        options = defining_options(run.config)
        key = json.dumps(options, sort_keys=True)
        groups.setdefault(key, []).append(run)
        options_of[key] = options
    for members in groups.values():
        members.sort(key=lambda r: r.seed)
        for first, second in zip(members, members[1:]):
            if first.seed == second.seed:
                raise SummaryError(f"'{first.path}' and '{second.path}' ran the same configuration with the same "
                                   f"--seed {first.seed}: keep one of them")
    return dict(zip(_names(list(options_of.values()), list(groups.values())), groups.values()))


def _names(options: list[dict], groups: list[list[Run]]) -> list[str]:
    if len(options) == 1:
        return ["all"]
    log_groups = [{run.log_group for run in members} for members in groups]
    if all(len(shared) == 1 for shared in log_groups) and len({g for (g,) in log_groups}) == len(groups):
        return [next(iter(shared)) for shared in log_groups]
    differing = [name for name in options[0] if len({json.dumps(o.get(name)) for o in options}) > 1]
    if "--subdatasets" in differing:  # the task order then says the same again
        differing.remove("task_order")
    return [" ".join(_shown(name, o.get(name)) for name in differing) for o in options]


def describe(name: str, runs: list[Run]) -> str:
    seeds = " ".join(str(run.seed) for run in runs)
    return f"{name}: {len(runs)} run(s), --seed {seeds}: " + ", ".join(str(run.path) for run in runs)


def _mean_of_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return statistics.fmean(defined) if defined else None


def _number(text: str | None) -> float | None:
    """A CSV cell as a number; empty and nan (a metric that could not be computed) are None."""
    if text is None or text == "":
        return None
    value = float(text)
    return None if math.isnan(value) else value


def run_values(run: Run, variant: str) -> dict[str, dict[str, float | None]]:
    """{task or "mean": {quantity: value}} for one run and one variant of its results (task_agnostic, oracle...)."""
    rows = {row["task"]: row for row in run.rows if row["variant"] == variant}
    if not rows:
        present = sorted({row["variant"] for row in run.rows})
        raise SummaryError(f"'{run.path}' has no {variant} results; its results_per_task.csv holds "
                           f"{', '.join(present)}")
    memory, drift = run.summary.get("memory_bytes_per_task", {}), run.summary.get("feature_drift", {})
    chosen = run.summary.get("chosen_epochs", {})
    values = {}
    for task in run.tasks:
        row = rows[task]
        values[task] = {name: _number(row.get(name)) for name in RESULT_COLUMNS}
        values[task]["memory_bytes"] = float(sum(memory[task].values())) if task in memory else None
        values[task]["feature_drift"] = drift.get(task)  # None where no prompt was kept
        values[task]["chosen_epoch"] = chosen.get(task)
    values[MEAN_ROW] = {name: _mean_of_defined([values[task][name] for task in run.tasks])
                        for name, _, _ in QUANTITIES if name != "seconds"}
    values[MEAN_ROW]["seconds"] = run.seconds
    return values


def statistic(values: list[float | None]) -> Statistic | None:
    defined = [float(v) for v in values if v is not None]
    if not defined:
        return None
    return Statistic(statistics.fmean(defined), statistics.stdev(defined) if len(defined) > 1 else None,
                     len(defined))


def summarize(configurations: dict[str, list[Run]], variants: list[str]) -> list[tuple[str, str, str, dict]]:
    """(configuration, variant, task, {quantity: Statistic}) per task in the runs' order, then the row "mean"."""
    table = []
    for name, runs in configurations.items():
        for variant in variants:
            per_run = [run_values(run, variant) for run in runs]
            tasks = list(dict.fromkeys(task for values in per_run for task in values if task != MEAN_ROW))
            for task in tasks + [MEAN_ROW]:
                cells = {quantity: statistic([values.get(task, {}).get(quantity) for values in per_run])
                         for quantity, _, _ in QUANTITIES}
                table.append((name, variant, task, {q: s for q, s in cells.items() if s is not None}))
    return table


def _cell(value: Statistic | None, number_format: str, with_n: bool) -> str:
    if value is None:
        return "-"
    text = format(value.mean, number_format)
    if value.std is not None:
        text += " ± " + format(value.std, number_format)
    return f"{text} ({value.n})" if with_n else text


def _columns(table: list[tuple], variants: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The leading headers, and the quantities that any row has."""
    present = [q for q in QUANTITIES if any(q[0] in cells for *_, cells in table)]
    return ["configuration"] + (["variant"] if len(variants) > 1 else []) + ["task"], present


def markdown(table: list[tuple], variants: list[str]) -> str:
    leading, present = _columns(table, variants)
    lines = ["| " + " | ".join(leading + [header for _, header, _ in present]) + " |",
             "|" + "---|" * (len(leading) + len(present))]
    for name, variant, task, cells in table:
        keys = [name] + ([variant] if len(variants) > 1 else []) + [task]
        lines.append("| " + " | ".join(keys + [_cell(cells.get(q), f, True) for q, _, f in present]) + " |")
    return "\n".join(lines) + "\n"


def text_table(table: list[tuple], variants: list[str], configurations: dict[str, list[Run]]) -> str:
    """Aligned columns; n is said once per configuration, and beside a cell only where it differs from that."""
    leading, present = _columns(table, variants)
    rows = []
    for name, variant, task, cells in table:
        runs = len(configurations[name])
        rows.append([name] + ([variant] if len(variants) > 1 else []) + [task]
                    + [_cell(cells.get(q), f, q in cells and cells[q].n != runs) for q, _, f in present])
    headers = leading + [header for _, header, _ in present]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda values: " | ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
    legend = [describe(name, runs) for name, runs in configurations.items()]
    return "\n".join(legend + ["", line(headers), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])


def write_csv(table: list[tuple], path: Path) -> None:
    """One line per configuration, variant, task and quantity: mean, std (empty for one run), n."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["configuration", "variant", "task", "quantity", "mean", "std", "n"])
        for name, variant, task, cells in table:
            for quantity, _, _ in QUANTITIES:
                if quantity in cells:
                    value = cells[quantity]
                    writer.writerow([name, variant, task, quantity, repr(value.mean),
                                     "" if value.std is None else repr(value.std), value.n])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="folders of finished runs (each holds config.json and results_per_task.csv)")
    parser.add_argument("--variant", action="append", metavar="NAME",
                        help="rows of results_per_task.csv to summarise, by its variant column: task_agnostic "
                             "(default), oracle, task_agnostic_unlimited; repeat for several")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write the table as CSV, one line per "
                                                                 "configuration, variant, task and quantity")
    parser.add_argument("--markdown", type=Path, metavar="FILE",
                        help='also write the table as Markdown, cells "mean ± std (n)"')
    args = parser.parse_args(argv)
    variants = list(dict.fromkeys(args.variant or ["task_agnostic"]))
    try:
        configurations = group_configurations([load_run(Path(path)) for path in args.runs])
        table = summarize(configurations, variants)
    except SummaryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text_table(table, variants, configurations))
    if args.csv:
        write_csv(table, args.csv)
    if args.markdown:
        legend = "".join(f"- {describe(name, runs)}\n" for name, runs in configurations.items())
        args.markdown.write_text(legend + "\n" + markdown(table, variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
