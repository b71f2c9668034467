"""scripts/summarize.py on runs made here: two seeds of a tiny run give the mean and sample std of a hand computation;
configurations that differ in an option are summarised apart and named by it; a seed given twice and a folder that
is not a finished run are refused."""
from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli import TINY, dataset, global_options, run

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "scripts"))

from summarize import main  # noqa: E402

TASKS = ("weave", "washer")


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory) -> dict[str, Path]:
    """Seeds 0 and 1 of one tiny configuration, and seed 0 of the same without prompt training (--epochs_num 0)."""
    results = tmp_path_factory.mktemp("summarize")
    made = {}
    for label, seed, epochs in (("seed0", 0, 1), ("seed1", 1, 1), ("no_training", 0, 0)):
        options = global_options(results, epochs=epochs)
        options[options.index("--seed") + 1] = str(seed)
        code, output = run(options + TINY + dataset(demo_root, *TASKS))
        assert code == 0, output
        made[label] = Path(output.rsplit("results: ", 1)[1].split()[0])
    return made


def final_rows(run_dir: Path, variant: str = "task_agnostic") -> dict[str, dict]:
    with open(run_dir / "results_per_task.csv", newline="") as handle:
        return {row["task"]: row for row in csv.DictReader(handle) if row["variant"] == variant}


def summarized(tmp_path: Path, *argv: str) -> dict[tuple[str, str, str, str], dict]:
    """main() on these arguments; its CSV as {(configuration, variant, task, quantity): row}."""
    table = tmp_path / "table.csv"
    assert main([*argv, "--csv", str(table)]) == 0
    with open(table, newline="") as handle:
        return {(r["configuration"], r["variant"], r["task"], r["quantity"]): r for r in csv.DictReader(handle)}


def copy_run(source: Path, target: Path, **config_changes: dict) -> Path:
    """The files summarize reads, with config.json's sections updated: {"run": {"gpu": [1]}, ...}."""
    target.mkdir(parents=True)
    for name in ("config.json", "results_per_task.csv", "summary.json", "timings.json"):
        shutil.copy(source / name, target / name)
    config = json.loads((target / "config.json").read_text())
    for section, changes in config_changes.items():
        config[section].update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_two_seeds_give_the_mean_and_sample_std_of_a_hand_computation(runs, tmp_path):
    seeds = [runs["seed0"], runs["seed1"]]
    markdown = tmp_path / "table.md"
    table = summarized(tmp_path, *map(str, seeds), "--markdown", str(markdown))
    per_seed = [final_rows(run_dir) for run_dir in seeds]
    for task in TASKS:
        a, b = (float(rows[task]["image_auroc"]) for rows in per_seed)
        cell = table["all", "task_agnostic", task, "image_auroc"]
        assert float(cell["mean"]) == pytest.approx((a + b) / 2, abs=1e-12)
        assert float(cell["std"]) == pytest.approx(abs(a - b) / math.sqrt(2), abs=1e-12)  # ddof 1
        assert cell["n"] == "2"
    # the row "mean": each run's mean over its tasks, then mean and std over the seeds
    run_means = [statistics.fmean(float(rows[t]["pixel_ap"]) for t in TASKS) for rows in per_seed]
    cell = table["all", "task_agnostic", "mean", "pixel_ap"]
    assert float(cell["mean"]) == pytest.approx(statistics.fmean(run_means), abs=1e-12)
    assert float(cell["std"]) == pytest.approx(abs(run_means[0] - run_means[1]) / math.sqrt(2), abs=1e-12)
    summary = json.loads((runs["seed0"] / "summary.json").read_text())
    assert float(table["all", "task_agnostic", "weave", "memory_bytes"]["mean"]) == sum(
        summary["memory_bytes_per_task"]["weave"].values())
    assert float(table["all", "task_agnostic", "mean", "seconds"]["mean"]) > 0
    mean, std = float(cell["mean"]), float(cell["std"])
    assert "| all | mean | " in markdown.read_text() and f"{mean:.3f} ± {std:.3f} (2)" in markdown.read_text()


def test_configurations_that_differ_in_an_option_are_summarised_apart_and_named_by_it(runs, tmp_path):
    table = summarized(tmp_path, str(runs["seed0"]), str(runs["no_training"]), str(runs["seed1"]),
                       "--variant", "task_agnostic", "--variant", "oracle")
    assert {key[0] for key in table} == {"--epochs_num 1", "--epochs_num 0"}
    trained = table["--epochs_num 1", "oracle", "washer", "aupro"]
    assert trained["n"] == "2"
    frozen = table["--epochs_num 0", "task_agnostic", "weave", "image_auroc"]
    assert frozen["n"] == "1" and frozen["std"] == ""  # one run: no spread
    assert float(frozen["mean"]) == float(final_rows(runs["no_training"])["weave"]["image_auroc"])


def test_execution_options_do_not_split_a_configuration_and_a_shared_log_group_names_it(runs, tmp_path):
    moved = copy_run(runs["seed1"], tmp_path / "elsewhere", run={"gpu": [3], "log_group": "other"},
                     data={"num_workers": 4}, learning={"feature_batch_size": 2})
    assert {key[0] for key in summarized(tmp_path, str(runs["seed0"]), str(moved))} == {"all"}
    baseline = [copy_run(runs[label], tmp_path / f"baseline_{label}", run={"log_group": "baseline"})
                for label in ("seed0", "seed1")]
    frozen = copy_run(runs["no_training"], tmp_path / "frozen", run={"log_group": "frozen"})
    summary = json.loads((frozen / "summary.json").read_text())
    summary["feature_drift"] = {"weave": 0.25, "washer": None}  # washer kept no prompt
    summary["chosen_epochs"] = {"weave": 3, "washer": 0}
    (frozen / "summary.json").write_text(json.dumps(summary))
    table = summarized(tmp_path / "elsewhere", *map(str, baseline), str(frozen))
    assert {key[0] for key in table} == {"baseline", "frozen"}
    assert float(table["frozen", "task_agnostic", "mean", "feature_drift"]["mean"]) == 0.25  # the defined one only
    assert ("frozen", "task_agnostic", "washer", "feature_drift") not in table
    assert float(table["frozen", "task_agnostic", "mean", "chosen_epoch"]["mean"]) == 1.5


def test_a_seed_given_twice_and_an_unfinished_folder_are_refused_naming_the_paths(runs, tmp_path, capsys):
    again = copy_run(runs["seed0"], tmp_path / "again", run={"results_path": str(tmp_path)})
    assert main([str(runs["seed0"]), str(runs["seed1"]), str(again)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and str(again) in error and str(runs["seed0"]) in error and "--seed 0" in error
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(runs["seed0"]), str(empty)]) == 2
    assert f"'{empty}' holds no results_per_task.csv" in capsys.readouterr().err
    half = copy_run(runs["seed1"], tmp_path / "half")
    with open(half / "results_per_task.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["task"] == "weave"]
    with open(half / "results_per_task.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main([str(half)]) == 2
    assert f"'{half}' finished 1 of its 2 tasks" in capsys.readouterr().err


def test_the_script_runs_from_another_folder(runs, tmp_path):
    shown = subprocess.run([sys.executable, str(REPOSITORY / "scripts" / "summarize.py"), str(runs["seed0"])],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "all: 1 run(s), --seed 0" in shown.stdout and "img_auroc" in shown.stdout
