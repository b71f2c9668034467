"""A number that cannot be computed says why: a test set with one class only is named before training, its empty
metrics carry a note in the result files and under the table, and a mean over tasks says over how many it was
taken."""
from __future__ import annotations

import csv
import json
import math
import shutil

import pytest
from click.testing import CliRunner

from ucad.cli.run import main
from ucad.data.check import check_data
from ucad.data.layouts import list_tasks
from ucad.results.metrics import one_class_note
from ucad.results.tables import SUMMARY_METRICS, final_table, summarize

TINY = ["ucad", "-b", "resnet18", "--weights", "random", "-le", "layer2", "-le", "layer3", "--patchsize", "1",
        "--pretrain_embed_dimension", "32", "--target_embed_dimension", "32", "--no_scl"]
NAN = float("nan")


def record(task_index: int, task: str, image_auroc: float, note: str = "") -> dict:
    metrics = {metric: image_auroc for metric in SUMMARY_METRICS}
    return {"phase": 1, "phase_task": "b", "task_index": task_index, "task": task, "variant": "task_agnostic",
            **metrics, **({"note": note} if note else {}), "routing_accuracy": 1.0, "routing_margin": 0.5}


def test_one_class_note_names_the_metrics_and_why():
    assert one_class_note(4, 4) == "" and one_class_note(4, 4, defect_pixels=10) == ""
    assert "no normal image, so image AUROC, AP and F1-max cannot be computed" in one_class_note(0, 4)
    assert "no anomalous image, so no image or pixel metric can be computed" in one_class_note(4, 0)
    assert "masks hold no defect pixel" in one_class_note(4, 4, defect_pixels=0)


def test_the_table_says_why_a_cell_is_empty_and_over_how_many_tasks_a_mean_is():
    note = one_class_note(0, 4)
    records = [record(0, "a", 0.8), record(1, "b", NAN, note)]
    summary = {row["variant"]: row for row in summarize(records)}["task_agnostic"]
    assert summary["final_image_auroc"] == pytest.approx(0.8) and summary["final_image_auroc_tasks"] == 1
    assert summary["final_routing_accuracy_tasks"] == 2
    table = final_table(records, ["a", "b"], "ucad")
    assert "0.800 (1/2)" in table
    assert f"'-' for task 'b': {note}" in table
    ordinary = final_table([record(0, "a", 0.8), record(1, "b", 0.6)], ["a", "b"], "ucad")
    assert "(2/2)" not in ordinary and "'-' for task" not in ordinary and "0.700 " in ordinary


def test_the_data_check_names_a_test_set_with_one_class(demo_root, tmp_path):
    for category in ("weave", "washer"):
        shutil.copytree(demo_root / category, tmp_path / category)
    shutil.rmtree(tmp_path / "weave" / "test" / "good")
    for defect in [p for p in (tmp_path / "washer" / "test").iterdir() if p.name != "good"]:
        shutil.rmtree(defect)
    messages = check_data(list_tasks("mvtec", tmp_path, []), None, workers=1, show=False)
    assert ("warning: task 'weave': its test set has no normal image, so image AUROC, AP and F1-max cannot be "
            "computed (they need normal and anomalous test images); they are left empty in the results") in messages
    assert any(m.startswith("warning: task 'washer': its test set has no anomalous image, so no image or pixel "
                            "metric can be computed") for m in messages), messages


def test_a_run_without_normal_test_images_says_why_before_training_and_in_its_files(demo_root, tmp_path):
    data = tmp_path / "data"
    for category in ("weave", "washer"):
        shutil.copytree(demo_root / category, data / category)
    shutil.rmtree(data / "weave" / "test" / "good")
    results = tmp_path / "results"
    result = CliRunner().invoke(main, ["--cpu", "--epochs_num", "0", "--memory_size", "8", "--key_size", "8",
                                       "--basic_size", "0", "--log_group", "g", "--log_project", "p", str(results),
                                       *TINY, "dataset", "--resize", "64", "--imagesize", "64", "--num_workers", "1",
                                       "-d", "weave", "-d", "washer", "mvtec", str(data)], catch_exceptions=False)
    output = result.output
    assert result.exit_code == 0, output
    warning = output.index("warning: task 'weave': its test set has no normal image")
    assert warning < output.index("== task 1/2")  # said before training
    assert "mean image AUROC - (over the 0 task(s) whose test set has both classes)" in output
    assert "(over the 1 task(s) whose test set has both classes)" in output
    assert "'-' for task 'weave': its test set has no normal image" in output
    run_dir = results / "p" / "g_0"
    rows = {(r["task"], r["variant"]): r for r in csv.DictReader(open(run_dir / "results_per_task.csv"))}
    weave = rows["weave", "task_agnostic"]
    assert weave["image_auroc"] == "" and "no normal image" in weave["note"]
    assert weave["pixel_auroc"] != ""  # the defect images' normal pixels are there
    assert rows["washer", "task_agnostic"]["note"] == "" and rows["washer", "task_agnostic"]["image_auroc"] != ""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "no normal image" in summary["metrics_left_empty"]["weave"]
    mean = next(r for r in summary["summary"] if r["variant"] == "task_agnostic")
    assert mean["final_image_auroc_tasks"] == 1 and mean["final_pixel_auroc_tasks"] == 2
    assert not math.isnan(mean["final_image_auroc"])
