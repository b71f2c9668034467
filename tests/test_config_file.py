"""--config: every option from a JSON file in the layout of config.json; typed options win; a run replays from its
own config.json; a key that names no option is one clear error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_cli import TINY, dataset, global_options, run

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def first_run(demo_root, tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("config_file")
    code, output = run(global_options(results) + TINY + dataset(demo_root, "weave", "washer"))
    assert code == 0, output
    return results / "p" / "g_0"


def test_a_run_replays_from_its_own_config_json(first_run, tmp_path):
    code, output = run(["--config", str(first_run / "config.json"), str(tmp_path)])
    assert code == 0, output
    replay = tmp_path / "p" / "g_0"
    assert (replay / "results_per_task.csv").read_text() == (first_run / "results_per_task.csv").read_text()
    assert (replay / "scores_per_image.csv").read_text() == (first_run / "scores_per_image.csv").read_text()


def test_options_typed_on_the_command_line_win_over_the_file(first_run, demo_root, tmp_path):
    code, output = run(["--config", str(first_run / "config.json"), "--epochs_num", "0", "--log_group", "typed",
                        str(tmp_path), "dataset", "--resize", "64", "--imagesize", "64", "-d", "weave", "mvtec",
                        str(demo_root)])
    assert code == 0, output
    config = json.loads((tmp_path / "p" / "typed_0" / "config.json").read_text())
    assert config["learning"]["epochs_num"] == 0  # typed
    assert config["data"]["categories"] == ["weave"]  # typed in the dataset sub-command
    assert config["model"]["backbone"] == "resnet18" and config["learning"]["memory_size"] == 16  # from the file
    assert config["learning"]["batch_size"] == 4  # the file's, although the typed sub-command has its own default


def test_an_unknown_key_is_one_clear_error(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"learning": {"epochs_num": 1, "memory_sise": 16}}))
    code, output = run(["--config", str(recipe), str(tmp_path / "out")])
    assert code == 2 and "learning.memory_sise" in output and "Traceback" not in output
    recipe.write_text("{not json")
    code, output = run(["--config", str(recipe), str(tmp_path / "out")])
    assert code == 2 and "not JSON" in output


def test_a_file_from_another_version_says_what_it_could_not_use(first_run, tmp_path):
    config = json.loads((first_run / "config.json").read_text())
    config["version"] = "0.0.1"
    config["model"]["retired_option"] = 3
    recipe = tmp_path / "old.json"
    recipe.write_text(json.dumps(config))
    code, output = run(["--config", str(recipe), "--epochs_num", "0", str(tmp_path / "out")])
    assert code == 0, output
    assert "written by ucad 0.0.1" in output and "model.retired_option" in output


@pytest.mark.parametrize("recipe", sorted((REPOSITORY / "configs").glob("*.json")), ids=lambda p: p.stem)
def test_the_recipes_name_only_options(recipe):
    from ucad.cli.options import read_recipe

    sections = read_recipe(str(recipe))
    assert set(sections) <= {"model", "learning", "data", "run"}
