"""benchmarks/: the GPU check's dry run on the CPU (the GPU parts skipped, the comparison and benchmark exercised),
the data assembly and comparison of compare_devices.py, and every instrument's --help."""
from __future__ import annotations

import ast
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from compare_devices import compare, format_table, link_category_subset  # noqa: E402


def test_gpu_check_dry_run_on_cpu_writes_the_difference_table_and_benchmark(tmp_path):
    out = tmp_path / "check"
    # no magnetic_tile: the check must say so and compare on the demo tasks (the device has no ../shared either)
    env = {**os.environ, "UCAD_MAGNETIC_TILE": str(tmp_path / "absent"), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "a1 pytest -m cuda            skipped: no GPU (--cpu)" in output
    assert "magnetic_tile not found at" in output and "GPU runs skipped (--cpu)" in output
    table = (out / "differences.txt").read_text()
    assert "image_auroc" in table and "PASS: cpu_fp32_torch_nn - cpu_fp32" in table and "0/9 differ" in table
    assert json.loads((out / "differences.json").read_text())["passed"] is True
    figures = json.loads((out / "benchmark.json").read_text())
    assert figures["tasks"] == 2 and figures["wall_seconds"] > 0 and "prompt_training" in figures["phases"]
    assert [row["tasks"] for row in figures["growth"]] == [1, 2]
    assert figures["growth"][0]["task_bytes"]["keys_prompt_knowledge"] > 0
    assert (out / "profile" / "prompt_epoch_ops.txt").is_file()
    assert (out / "profile" / "prompt_epoch_trace.json.gz").is_file()
    summary = (out / "summary.txt").read_text()
    assert summary.count("passed") == 3, summary


def test_gpu_check_without_out_dir_or_gpu_says_how_to_call_it(tmp_path):
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "OUT_DIR missing" in done.stderr


def _category(root: Path, train: int, tests: dict) -> Path:
    image = Image.fromarray(np.zeros((8, 8), np.uint8))
    for i in range(train):
        (root / "train" / "good").mkdir(parents=True, exist_ok=True)
        image.save(root / "train" / "good" / f"{i:03d}.png")
    for folder, count in tests.items():
        for i in range(count):
            (root / "test" / folder).mkdir(parents=True, exist_ok=True)
            image.save(root / "test" / folder / f"{i:03d}.png")
            if folder != "good":
                (root / "ground_truth" / folder).mkdir(parents=True, exist_ok=True)
                image.save(root / "ground_truth" / folder / f"{i:03d}_mask.png")
    return root


def test_magnetic_tile_subset_is_links_never_copies(tmp_path):
    source = _category(tmp_path / "source", 10, {"good": 4, "crack": 3})
    counts = link_category_subset(source, tmp_path / "data" / "tile", train_max=3, test_per_type=2)
    assert counts == {"train": 3, "test": 4}
    linked = tmp_path / "data" / "tile"
    assert sorted(p.name for p in (linked / "train" / "good").iterdir()) == ["000.png", "004.png", "008.png"]
    assert all(p.is_symlink() for p in (linked / "test" / "crack").iterdir())
    assert (linked / "ground_truth").is_symlink() and (linked / "ground_truth" / "crack" / "000_mask.png").is_file()
    from ucad.data.layouts import list_mvtec_task

    task = list_mvtec_task(tmp_path / "data", "tile")  # a valid MVTec-layout task
    assert len(task.train) == 3 and len(task.test) == 4
    copied = link_category_subset(source, tmp_path / "carried" / "tile", train_max=None, test_per_type=None, copy=True)
    assert copied == {"train": 10, "test": 7}
    assert not any(p.is_symlink() for p in (tmp_path / "carried").rglob("*"))


def test_comparison_flags_a_metric_beyond_tolerance_and_a_changed_route():
    row = lambda value: {"phase": "0", "task": "a", "variant": "oracle", "image_auroc": value, "aupro": "nan"}
    reference = {("0", "a", "oracle"): row("0.900")}
    close = compare("x", reference, {("0", "a", "oracle"): row("0.904")}, {"a": [0, 0]}, {"a": [0, 0]}, ["a"])
    assert close["passed"] and abs(close["largest_difference"] - 0.004) < 1e-9
    far = compare("y", reference, {("0", "a", "oracle"): row("0.910")}, {"a": [0, 0]}, {"a": [0, 0]}, ["a"])
    rerouted = compare("z", reference, {("0", "a", "oracle"): row("0.900")}, {"a": [0, 0]}, {"a": [0, 1]}, ["a"])
    assert not far["passed"] and not rerouted["passed"]
    table = format_table([close, far, rerouted])
    assert "PASS: x" in table and "FAIL: y" in table and "FAIL: z" in table and "1/2 differ" in table


INSTRUMENTS = sorted(p for p in (REPO / "benchmarks").iterdir() if p.suffix in (".py", ".sh"))
# variables a shell instrument reads that belong to the system, not to the instrument's interface
SYSTEM_VARIABLES = {"TMPDIR", "PYTHONPATH"}


def _help(instrument: Path, tmp_path: Path) -> str:
    command = ["bash"] if instrument.suffix == ".sh" else [sys.executable]
    shown = subprocess.run([*command, str(instrument), "--help"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0 and not shown.stderr.strip(), shown.stderr[-2000:]
    return shown.stdout


def _opening_comment(script: Path) -> list[str]:
    """The comment block under the shebang, without its '#' marks."""
    lines = script.read_text().splitlines()[1:]
    return [re.sub(r"^# ?", "", line) for line in itertools.takewhile(lambda line: line.startswith("#"), lines)]


@pytest.mark.parametrize("instrument", [p for p in INSTRUMENTS if p.suffix == ".sh"], ids=lambda p: p.name)
def test_shell_instrument_help_is_its_whole_opening_comment_and_names_every_option(instrument, tmp_path):
    shown = [re.sub(r"^# ?", "", line) for line in _help(instrument, tmp_path).splitlines()]
    assert shown == _opening_comment(instrument)  # all of it, and no line of code
    source = instrument.read_text()
    options = set(re.findall(r"^\s*((?:-[-\w]+\|?)+)\)", source, flags=re.M))
    options = {option for pattern in options for option in pattern.split("|")} - {"-h", "--help"}
    variables = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):-", source)) - SYSTEM_VARIABLES
    text = "\n".join(shown)
    assert options | variables, "found nothing the instrument takes: the patterns above no longer fit the script"
    assert not [name for name in options | variables if not re.search(rf"(?<![-\w]){re.escape(name)}(?![-\w])", text)]


@pytest.mark.parametrize("instrument", [p for p in INSTRUMENTS if p.suffix == ".py"], ids=lambda p: p.name)
def test_python_instrument_help_says_what_it_and_each_option_do(instrument, tmp_path):
    shown = _help(instrument, tmp_path)
    assert shown.startswith(f"usage: {instrument.name}")
    tree = ast.parse(instrument.read_text())
    summary = ast.get_docstring(tree).split("\n\n")[0]
    assert " ".join(summary.split()) in " ".join(shown.split())  # the module's own description
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "attr", None) == "add_argument"]
    assert calls
    for call in calls:
        names = [argument.value for argument in call.args]
        described = {keyword.arg: keyword.value for keyword in call.keywords}.get("help")
        empty = isinstance(described, ast.Constant) and not str(described.value).strip()
        assert described is not None and not empty, f"{names} has no help string"
        assert any(name in shown for name in names), f"{names} missing from --help"
