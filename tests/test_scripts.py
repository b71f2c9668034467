"""scripts/*.sh: run from any folder, relative paths are the caller's, extra global options reach run_ucad.py in a
place the chained command line accepts. A stand-in interpreter (PYTHON) records what
the scripts would run, so nothing is trained here; the recorded command line is then parsed by the real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import ucad.continual.experiment
from ucad.cli.run import main

REPOSITORY = Path(__file__).resolve().parents[1]
TASKS = {"mvtec": ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
                   "tile", "toothbrush", "transistor", "wood", "zipper"],
         "visa": ["candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
                  "pcb3", "pcb4", "pipe_fryum"]}


@pytest.fixture
def recorder(tmp_path) -> tuple[Path, Path]:
    """An executable that appends {cwd, argv, PYTHONPATH} as one JSON line to a log instead of running Python."""
    log = tmp_path / "calls.jsonl"
    stub = tmp_path / "python-stub"
    stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps({{'cwd': os.getcwd(), 'argv': sys.argv[1:], "
                    "'pythonpath': os.environ.get('PYTHONPATH', '')}) + '\\n')\n")
    stub.chmod(0o755)
    return stub, log


def run_script(name: str, args: list[str], cwd: Path, stub: Path, log: Path) -> list[dict]:
    completed = subprocess.run(["bash", str(REPOSITORY / "scripts" / name), *args], cwd=cwd,
                               env={**os.environ, "PYTHON": str(stub)}, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def parsed_config(argv: list[str], monkeypatch) -> dict:
    """What run_ucad.py would run with this command line (the experiment itself replaced), as config.json records
    it: {"model": ..., "learning": ..., "data": ..., "run": ...}."""
    seen = {}
    monkeypatch.setattr(ucad.continual.experiment, "run_experiment", lambda configs: seen.update(configs.as_dict()))
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    return seen


@pytest.mark.parametrize("script, name", [("run_mvtec.sh", "mvtec"), ("run_visa.sh", "visa")])
def test_experiment_scripts_work_from_any_folder_and_pass_global_options(tmp_path, recorder, monkeypatch,
                                                                         script, name):
    stub, log = recorder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (call,) = run_script(script, [f"data/{name}", "results_s1", "--seed", "1", "--resume", "--save_patchcore_model",
                                  "--gpu", "1"], elsewhere, stub, log)
    assert call["cwd"] == str(elsewhere)  # no cd: the caller's folder stays the working folder
    assert call["argv"][0] == str(REPOSITORY / "run_ucad.py")
    config = parsed_config(call["argv"][1:], monkeypatch)
    assert config["run"]["results_path"] == str(elsewhere / "results_s1")  # not inside the checkout
    assert config["data"]["data_path"] == str(elsewhere / "data" / name)
    assert config["learning"]["seed"] == 1  # the caller's value wins over the script's 0
    assert config["run"]["resume"] and config["run"]["save_patchcore_model"] and config["run"]["gpu"] == [1]
    assert config["data"]["categories"] == TASKS[name] and config["model"]["backbone"] == "vit_base_patch16_224"
    assert config["run"]["log_project"] == {"mvtec": "MVTecAD_Results", "visa": "VisA_Results"}[name]


def print_config(script: str, args: list[str], cwd: Path) -> dict:
    """The configuration a sequence script would run, shown by run_ucad.py's --print_config (nothing is loaded)."""
    completed = subprocess.run(["bash", str(REPOSITORY / "scripts" / script), "data", "out", *args, "--print_config"],
                               cwd=cwd, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def holds(printed: dict, recipe: dict) -> bool:
    return all(printed[part][key] == value for part, values in recipe.items() for key, value in values.items())


@pytest.mark.parametrize("recipe", sorted((REPOSITORY / "configs").glob("*.json")), ids=lambda p: p.stem)
@pytest.mark.parametrize("script", ["run_mvtec.sh", "run_visa.sh"])
def test_a_recipe_given_to_a_sequence_script_reaches_the_run(tmp_path, script, recipe):
    values = json.loads(recipe.read_text())
    printed = print_config(script, ["--config", str(recipe)], tmp_path)
    assert holds(printed, values)
    assert (printed["data"]["name"], printed["data"]["data_path"]) == (script[4:-3], str(tmp_path / "data"))
    assert printed["run"]["results_path"] == str(tmp_path / "out")


@pytest.mark.parametrize("script, name", [("run_mvtec.sh", "mvtec"), ("run_visa.sh", "visa")])
def test_sequence_scripts_run_the_released_recipe_and_only_what_the_user_names_changes(tmp_path, script, name):
    benchmark = json.loads((REPOSITORY / "configs" / f"{name}.json").read_text())
    released = json.loads((REPOSITORY / "configs" / "ucad_released.json").read_text())
    printed = print_config(script, [], tmp_path)
    assert holds(printed, released) and holds(printed, benchmark) and printed["data"]["categories"] == TASKS[name]
    assert (printed["learning"]["memory_size"], printed["model"]["patchsize"]) == (196, 3)
    recipe = json.loads((REPOSITORY / "configs" / "ucad_plus.json").read_text())
    plus = print_config(script, ["--config", str(REPOSITORY / "configs" / "ucad_plus.json"), "--epochs_num", "5"],
                        tmp_path)
    assert holds(plus, recipe) and plus["model"]["patchsize"] == 3 and plus["learning"]["epochs_num"] == 5
    changed = {key for part in recipe.values() for key in part} | {"epochs_num"}
    assert {key for part in recipe for key in recipe[part] if recipe[part][key] != printed[part][key]}
    for part in printed:  # nothing else moved
        for key, value in printed[part].items():
            if key not in changed:
                assert plus[part][key] == value, (part, key)


def test_results_path_may_be_left_out_before_options(tmp_path, recorder, monkeypatch):
    stub, log = recorder
    (call,) = run_script("run_mvtec.sh", ["/data/mvtec", "--epochs_num", "3"], tmp_path, stub, log)
    config = parsed_config(call["argv"][1:], monkeypatch)
    assert config["run"]["results_path"] == str(tmp_path / "results") and config["data"]["data_path"] == "/data/mvtec"
    assert config["learning"]["epochs_num"] == 3


def test_sequence_scripts_answer_help_and_name_themselves_in_their_usage(tmp_path, recorder):
    stub, log = recorder
    for script in ("run_mvtec.sh", "run_visa.sh", "run_sequence.sh"):
        shown = subprocess.run(["bash", str(REPOSITORY / "scripts" / script), *(["mvtec"] if script == "run_sequence.sh"
                                                                                 else []), "--help"],
                               cwd=tmp_path, env={**os.environ, "PYTHON": str(stub)}, capture_output=True, text=True)
        assert shown.returncode == 0 and "GLOBAL OPTIONS" in shown.stdout, shown.stderr
    missing = subprocess.run(["bash", str(REPOSITORY / "scripts" / "run_visa.sh")], cwd=tmp_path,
                             env={**os.environ, "PYTHON": str(stub)}, capture_output=True, text=True)
    assert missing.returncode == 2 and "usage: run_visa.sh DATA_PATH" in missing.stderr
    assert not log.exists()  # nothing was run


def test_demo_and_structure_map_scripts_from_another_folder(tmp_path, recorder, monkeypatch):
    stub, log = recorder
    calls = run_script("demo.sh", ["out", "--epochs_num", "2"], tmp_path, stub, log)
    assert [c["argv"][:2] for c in calls[:2]] == [
        ["-m", "ucad.demo"], [str(REPOSITORY / "segment_anything_prep" / "make_structure_maps.py"), "--data_path"]]
    assert all(c["cwd"] == str(tmp_path) for c in calls)
    assert calls[0]["pythonpath"].split(os.pathsep)[0] == str(REPOSITORY)  # `-m ucad...` finds the package
    config = parsed_config(calls[2]["argv"][1:], monkeypatch)
    assert config["run"]["results_path"] == "out" and config["learning"]["epochs_num"] == 2
    log.unlink()
    (call,) = run_script("structure_maps_mvtec.sh", ["data", "sam.pth", "--device", "cpu"], tmp_path, stub, log)
    assert call["argv"][1:] == ["--data_path", "data", "--sam_type", "vit_b", "--sam_checkpoint", "sam.pth",
                                "--device", "cpu"]
