"""--config: every option from a JSON file in the layout of config.json; typed options win; a run replays from its
own config.json; a key that names no option is one clear error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from test_cli import TINY, dataset, global_options, run
from ucad.cli.run import main
from ucad.config import ModelConfig

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


def test_the_released_recipe_is_the_defaults():
    from ucad.config import LearningConfig, ModelConfig, to_dict

    recipe = json.loads((REPOSITORY / "configs" / "ucad_released.json").read_text())
    assert recipe == {"model": to_dict(ModelConfig()), "learning": to_dict(LearningConfig())}


def printed_config(args: list[str]) -> dict:
    """What --print_config shows for this command line (a data path that does not exist: nothing is read)."""
    result = CliRunner().invoke(main, ["--print_config", *args, "results", "dataset", "mvtec", "/no/data"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_config_files_layer_in_order_and_typed_options_win(tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps({"learning": {"memory_size": 10, "key_size": 20}, "model": {"patchsize": 5}}))
    second.write_text(json.dumps({"learning": {"memory_size": 30}, "run": {"log_group": "second"}}))
    layered = printed_config(["--config", str(first), "--config", str(second)])
    assert (layered["learning"]["memory_size"], layered["learning"]["key_size"]) == (30, 20)
    assert (layered["model"]["patchsize"], layered["run"]["log_group"]) == (5, "second")
    assert printed_config(["--config", str(second), "--config", str(first)])["learning"]["memory_size"] == 10
    typed = printed_config(["--config", str(first), "--config", str(second), "--memory_size", "40"])
    assert (typed["learning"]["memory_size"], typed["learning"]["key_size"]) == (40, 20)
    assert printed_config([])["learning"]["memory_size"] == 196 and set(layered) == {"model", "learning", "data", "run"}


@pytest.mark.parametrize("values, message", [
    ({"learning": {"memory_size": "abc"}}, "learning.memory_size must be an integer, got 'abc'"),
    ({"learning": {"memory_size": 19.6}}, "learning.memory_size must be an integer, got 19.6"),
    ({"learning": {"train_prompt": "false"}}, "learning.train_prompt must be true or false, got 'false'"),
    ({"data": {"name": "mvtecc", "data_path": "/d"}}, "dataset NAME 'mvtecc' is not one of mvtec, visa"),
])
def test_a_wrong_value_in_a_file_is_one_line_on_stderr(tmp_path, values, message):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(values))
    completed = subprocess.run([sys.executable, str(REPOSITORY / "run_ucad.py"), "--config", str(recipe), "--cpu",
                                str(tmp_path / "out"), *([] if "data" in values else ["dataset", "mvtec", "/d"])],
                               capture_output=True, text=True, timeout=300)
    expected = f"error: --config '{recipe}': {message}" if "learning" in values else f"error: {message}"
    assert (completed.returncode, completed.stderr.splitlines(), completed.stdout) == (2, [expected], "")
    assert not (tmp_path / "out").exists()


def test_a_config_json_recording_patchcore_options_is_read_without_a_word(first_run):
    recorded = json.loads((first_run / "config.json").read_text())
    recorded["model"].update(preprocessing="mean", aggregation="mean", patchscore="max", patchoverlap=0.0,
                             patchsize_aggregate=[])
    old = first_run.parent / "old_config.json"
    old.write_text(json.dumps(recorded))
    result = CliRunner().invoke(main, ["--config", str(old), "--print_config", str(first_run.parent)])
    assert result.exit_code == 0 and result.stderr == "", result.output
    model = {key: value for key, value in recorded["model"].items() if key in ModelConfig().__dict__}
    assert json.loads(result.stdout)["model"] == model


def test_print_config_loads_neither_torch_nor_data(tmp_path):
    program = ("import sys; from ucad.cli.run import main; main(['--print_config', 'out', 'dataset', 'visa', "
               "'/no/data'], standalone_mode=False); print('torch' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(REPOSITORY)}, timeout=120)
    assert shown.returncode == 0 and shown.stdout.splitlines()[-1] == "False", shown.stderr
    assert json.loads("".join(shown.stdout.splitlines(keepends=True)[:-1]))["data"]["data_path"] == "/no/data"
