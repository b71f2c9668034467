"""No traceback anywhere: a crop larger than the resized image is refused, Ctrl-C while torch loads ends with one
line and status 130, and the Ctrl-C test of the run folder does not depend on how its process was started."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import ucad.continual.experiment
from ucad.cli.run import main

REPOSITORY = Path(__file__).resolve().parents[1]


def test_imagesize_above_resize_is_refused_instead_of_padding_black(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(ucad.continual.experiment, "run_experiment", lambda configs: started.append(configs))
    command = ["--cpu", str(tmp_path), "dataset", "--imagesize", "96", "--resize", "64", "mvtec", str(tmp_path)]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2 and not started
    assert result.output.strip().splitlines() == [
        "error: dataset --imagesize 96 is larger than --resize 64: the centre crop would pad every image with a black "
        "border; give --resize at least --imagesize, or --resize_mode square"]
    result = CliRunner().invoke(main, command[:-2] + ["--resize_mode", "square", "mvtec", str(tmp_path)])
    assert result.exit_code == 0 and started  # squashed to 96 x 96: nothing is padded


@pytest.mark.parametrize("module, message", [
    ("click", "interrupted while starting, before anything was read or written"),
    ("torch", "interrupted before the run started; nothing was written")])
def test_ctrl_c_while_starting_is_one_line_and_status_130(tmp_path, module, message):
    """The KeyboardInterrupt arrives inside an import, as when Ctrl-C is pressed in the first seconds: click loads
    with the command line, torch once the command line is valid."""
    program = f"""
import builtins, runpy, sys
sys.path.insert(0, {str(REPOSITORY)!r})
imported = builtins.__import__
def ctrl_c_in_import(name, *args, **kwargs):
    if name.split(".")[0] == {module!r}:
        raise KeyboardInterrupt
    return imported(name, *args, **kwargs)
builtins.__import__ = ctrl_c_in_import
sys.argv = ["run_ucad.py", "--cpu", {str(tmp_path / "out")!r}, "dataset", "mvtec", {str(tmp_path)!r}]
runpy.run_path({str(REPOSITORY / "run_ucad.py")!r}, run_name="__main__")
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=REPOSITORY,
                          timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "out").exists()


def test_the_ctrl_c_test_passes_when_pytest_was_started_with_ctrl_c_ignored(tmp_path):
    """A script that starts the suite in the background (`pytest &`) hands it SIGINT ignored: the Ctrl-C test
    installs Python's own handler, so it cannot depend on that (it failed with exit 0 where 130 was expected)."""
    program = f"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
os.execv(sys.executable, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
         {str(tmp_path / "base")!r},
         "tests/test_run_folder.py::test_ctrl_c_while_a_phase_is_written_waits_for_its_last_file"])
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=REPOSITORY,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
