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
from ucad.config import FIELDS, field_kind

# (option, value) pairs that are valid: everything else given 0 or -1 must be refused up front
VALID = {("--gpu", "0"), ("--seed", "0"), ("--epochs_num", "0"), ("--basic_size", "0"), ("--num_workers", "0"),
         ("--faiss_num_workers", "0"), ("--smoothing_sigma", "0"), ("--prompt_anchor", "0"), ("--memory_size", "0"),
         ("--key_size", "0"), ("--route_trust_quantile", "0")}
PARTS = {None: main, "ucad": ucad_command, "sampler": sampler_command, "dataset": dataset_command}


def numeric_options():
    """(part, option) of every option of the command line whose configuration field holds numbers."""
    for part, command in PARTS.items():
        for parameter in command.params:
            if isinstance(parameter, click.Option) and parameter.name in FIELDS and \
                    field_kind(FIELDS[parameter.name][1])[0] in ("int", "float"):
                yield part, max(parameter.opts, key=len)


def arguments(tmp_path: Path, part: str | None, option: str, value: str) -> list[str]:
    parts = {None: [], "ucad": [], "sampler": [], "dataset": []}
    parts[part] += [option, value]
    return (["--cpu", *parts[None], str(tmp_path / "results"), "ucad", *parts["ucad"],
             "sampler", *parts["sampler"], "approx_greedy_coreset",
             "dataset", *parts["dataset"], "mvtec", str(tmp_path / "no_data")])


def test_every_numeric_option_is_covered():
    assert sorted(numeric_options(), key=str) == sorted([
        (None, "--gpu"), (None, "--seed"), (None, "--memory_size"), (None, "--epochs_num"), (None, "--key_size"),
        (None, "--basic_size"), (None, "--threshold_quantile"), ("ucad", "--pretrain_embed_dimension"),
        ("ucad", "--target_embed_dimension"), ("ucad", "--anomaly_scorer_num_nn"), ("ucad", "--patchsize"),
        ("ucad", "--prompt_length"), ("ucad", "--route_trust_quantile"), ("ucad", "--smoothing_sigma"), ("ucad", "--prompt_anchor"), ("ucad", "--lr"),
        ("ucad", "--feature_batch_size"), ("ucad", "--faiss_num_workers"), ("sampler", "--percentage"),
        ("dataset", "--resize"), ("dataset", "--imagesize"), ("dataset", "--batch_size"),
        ("dataset", "--train_val_split"), ("dataset", "--num_workers")], key=str)


@pytest.mark.parametrize("part, option, text", [(None, "--memory_size", "abc"), ("ucad", "--lr", "fast"),
                                                 ("dataset", "--resize", "1.5"), (None, "--gpu", "one")])
def test_text_for_a_number_is_one_line_naming_the_option(tmp_path, part, option, text):
    result = CliRunner().invoke(main, arguments(tmp_path, part, option, text))
    kind = "a number" if option == "--lr" else "an integer"
    assert result.exit_code == 2 and result.output.splitlines() == [f"error: {option} must be {kind}, got '{text}'"]


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
