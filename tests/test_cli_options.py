"""Every numeric option of the command line with 0 and -1: an invalid value is one line naming the option and
exit status 2, never a traceback; a valid one gets as far as the (missing) data."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ucad.cli.run import dataset_command, main, sampler_command, ucad_command

# (option, value) pairs that are valid: everything else given 0 or -1 must be refused up front
VALID = {("--gpu", "0"), ("--seed", "0"), ("--epochs_num", "0"), ("--basic_size", "0"), ("--num_workers", "0"),
         ("--faiss_num_workers", "0"), ("--smoothing_sigma", "0"), ("--patchoverlap", "0"),
         ("--prompt_anchor", "0")}
PARTS = {None: main, "ucad": ucad_command, "sampler": sampler_command, "dataset": dataset_command}


def numeric_options():
    for part, command in PARTS.items():
        for parameter in command.params:
            if isinstance(parameter, click.Option) and isinstance(parameter.type, (click.types.IntParamType,
                                                                                    click.types.FloatParamType)):
                yield part, max(parameter.opts, key=len)


def arguments(tmp_path: Path, part: str | None, option: str, value: str) -> list[str]:
    parts = {None: [], "ucad": [], "sampler": [], "dataset": []}
    parts[part] += [option, value]
    return (["--cpu", *parts[None], str(tmp_path / "results"), "ucad", *parts["ucad"],
             "sampler", *parts["sampler"], "approx_greedy_coreset",
             "dataset", *parts["dataset"], "mvtec", str(tmp_path / "no_data")])


def test_every_numeric_option_is_covered():
    assert len(list(numeric_options())) >= 23  # the enumeration finds them (more as options are added)


@pytest.mark.parametrize("value", ["0", "-1"])
@pytest.mark.parametrize("part, option", list(numeric_options()))
def test_zero_and_minus_one(tmp_path, part, option, value):
    result = CliRunner().invoke(main, arguments(tmp_path, part, option, value))
    output = result.output
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no exception escaped
    assert "Traceback" not in output
    first = output.strip().splitlines()[0]
    if (option, value) in VALID:
        assert "no_data" in first and "does not exist" in first, output  # got as far as the data
    else:
        assert first.startswith("error: ") and option in first, output


def test_a_bad_value_in_a_real_process_prints_one_line(tmp_path):
    """Through run_ucad.py as users run it: stderr is the one error line."""
    repository = Path(__file__).resolve().parents[1]
    completed = subprocess.run([sys.executable, str(repository / "run_ucad.py"),
                                *arguments(tmp_path, "ucad", "--patchsize", "0")],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert completed.stderr.strip() == "error: --patchsize must be at least 1, got 0"
