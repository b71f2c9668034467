"""The run folder: checked before the backbone loads, made without races, removed after a failed start, found
again by --resume, written so that a kill or Ctrl-C cannot leave files that disagree."""
from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ucad.continual.experiment
import ucad.results.tables
import ucad.persistence.run_folder
from ucad.cli.run import main
from ucad.continual.hooks import RunHooks
from ucad.runtime.errors import UcadError
from ucad.results.tables import write_heatmap
from ucad.persistence.run_folder import atomic_write, check_results_path, new_run_dir, remove_temporary_files

TINY = ["ucad", "-b", "resnet18", "--weights", "random", "-le", "layer2", "-le", "layer3", "--patchsize", "1",
        "--pretrain_embed_dimension", "32", "--target_embed_dimension", "32"]


def run(args: list[str]):
    result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def command(results: Path, root: Path, *extra: str, epochs: int = 1, group: str = "g",
            model: tuple[str, ...] = ()) -> list[str]:
    return ["--cpu", "--epochs_num", str(epochs), "--memory_size", "8", "--key_size", "8", "--basic_size", "16",
            "--log_group", group, "--log_project", "p", *extra, str(results), *TINY, *model,
            "dataset", "--resize", "64", "--imagesize", "64", "--batch_size", "3", "--num_workers", "1",
            "-d", "weave", "-d", "washer", "mvtec", str(root)]


LEARN_TASK = ucad.continual.experiment.learn_task


def fail_at(monkeypatch, task_index: int, error: BaseException):
    original = LEARN_TASK

    def learn_task(model, index, *args, **kwargs):
        if index == task_index:
            raise error
        return original(model, index, *args, **kwargs)

    monkeypatch.setattr(ucad.continual.experiment, "learn_task", learn_task)
    return original


def phases_in(path: Path) -> set[int]:
    return {int(r["phase"]) for r in csv.DictReader(open(path))}


def checkpoint_tasks(run_dir: Path) -> int:
    return len(torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["task_files"])


# ----------------------------------------------------------------------------- the results path
def test_unusable_results_path_fails_before_the_backbone(tmp_path, demo_root, monkeypatch):
    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the results path was checked")

    monkeypatch.setattr(ucad.continual.experiment, "UcadModel", no_backbone)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, output = run(command(a_file / "results", demo_root))
    assert code == 2 and "is a file, not a folder" in output and str(a_file) in output
    code, output = run(command(tmp_path, demo_root, group="x" * 300))
    assert code == 2 and "--log_group is 300 bytes long" in output
    assert "Traceback" not in output


def test_read_only_results_path(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere but on a read-only file system such as /proc
        target = Path("/proc/ucad-results")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "results"
    with pytest.raises(UcadError, match="is not writable"):
        check_results_path(target, "p", "g")
    with pytest.raises(UcadError, match="plain folder name"):
        check_results_path(tmp_path, "p", "a/b")
    check_results_path(tmp_path / "new" / "deeper", "p", "g")  # folders still to be made are fine
    assert not (tmp_path / "new").exists()  # and the check makes none


def test_new_run_dir_takes_the_next_number_when_another_run_took_it(tmp_path, monkeypatch):
    (tmp_path / "p" / "g_0").mkdir(parents=True)
    listings = iter([{}])  # the first listing was taken before the other process made g_0
    real = ucad.persistence.run_folder._run_numbers
    monkeypatch.setattr(ucad.persistence.run_folder, "_run_numbers", lambda *a: next(listings, None) or real(*a))
    assert new_run_dir(tmp_path, "p", "g") == tmp_path / "p" / "g_1"


# ----------------------------------------------------------------------------- atomic writes
def test_heatmap_is_written_atomically_and_stray_temporary_files_go(tmp_path, monkeypatch):
    records = [{"phase": 0, "task_index": 0, "variant": "task_agnostic", "image_auroc": 0.9}]
    picture = tmp_path / "image_auroc_matrix.png"
    write_heatmap(picture, records, ["a"])
    good = picture.read_bytes()
    import matplotlib.figure

    def killed_while_saving(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half a picture")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", killed_while_saving)
    with pytest.raises(OSError):
        write_heatmap(picture, records, ["a"])
    assert picture.read_bytes() == good and list(tmp_path.iterdir()) == [picture]
    (tmp_path / "matrices").mkdir()
    (tmp_path / "matrices" / "x.csv.tmp").write_text("half")
    (tmp_path / "results_mean.csv.tmp").write_text("half")
    assert remove_temporary_files(tmp_path) == 2 and list(tmp_path.rglob("*.tmp")) == []


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "summary.json"
    with atomic_write(target) as temporary:
        assert temporary.parent == tmp_path and temporary.name.endswith(".tmp") and not target.exists()
        temporary.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(OSError):
        with atomic_write(target) as temporary:
            temporary.write_text("half")
            raise OSError("disk full")
    assert target.read_text() == "first" and list(tmp_path.iterdir()) == [target]


# ----------------------------------------------------------------------------- failed starts and --resume
def test_failed_start_leaves_nothing_and_resume_finds_the_run_with_a_checkpoint(tmp_path, demo_root, monkeypatch):
    original = fail_at(monkeypatch, 1, RuntimeError("crash in task 2"))
    with pytest.raises(RuntimeError):
        run(command(tmp_path, demo_root))
    run_dir = tmp_path / "p" / "g_0"
    assert checkpoint_tasks(run_dir) == 1
    fail_at(monkeypatch, 0, RuntimeError("crash in task 1"))  # a second, failed start ...
    with pytest.raises(RuntimeError):
        run(command(tmp_path, demo_root))
    assert not (tmp_path / "p" / "g_1").exists()  # ... removes its folder
    (tmp_path / "p" / "g_1").mkdir()  # what a kill -9 at the start leaves: a newer folder without checkpoint
    monkeypatch.setattr(ucad.continual.experiment, "learn_task", original)

    code, output = run(command(tmp_path, demo_root, "--resume", epochs=2))
    assert code == 2 and "--epochs_num 1 there, 2 now" in output and "(learning" not in output
    code, output = run(command(tmp_path, demo_root, "--resume"))
    assert code == 0, output
    assert f"UCAD run folder: {run_dir}" in output and "resuming after task 1" in output
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["g_0", "g_1"]
    assert phases_in(run_dir / "results_all_phases.csv") == {0, 1} and checkpoint_tasks(run_dir) == 2
    # how a run is computed, not what it computes, may change on resume (after running out of memory)
    code, output = run(command(tmp_path, demo_root, "--resume", model=("--feature_batch_size", "2")))
    assert code == 0, output


def test_kill_between_result_files_is_healed_by_resume(tmp_path, demo_root, monkeypatch):
    """The checkpoint is written last and --resume rewrites every other file from it."""
    original_heatmap = ucad.results.tables.write_heatmap

    def killed_in_phase_1(path, records, names, *args, **kwargs):
        if max(r["phase"] for r in records) == 1:
            raise RuntimeError("killed between two result files")
        return original_heatmap(path, records, names, *args, **kwargs)

    monkeypatch.setattr(ucad.results.tables, "write_heatmap", killed_in_phase_1)
    with pytest.raises(RuntimeError):
        run(command(tmp_path, demo_root))
    run_dir = tmp_path / "p" / "g_0"
    assert phases_in(run_dir / "results_all_phases.csv") == {0, 1}  # written before the kill ...
    assert checkpoint_tasks(run_dir) == 1  # ... the checkpoint not: it is the authority
    assert json.loads((run_dir / "summary.json").read_text())["tasks_finished"] == 1  # disagreeing files
    (run_dir / "results_mean.csv.tmp").write_text("half")
    monkeypatch.setattr(ucad.results.tables, "write_heatmap", original_heatmap)
    fail_at(monkeypatch, 1, RuntimeError("stop right after the files were rewritten"))
    with pytest.raises(RuntimeError):
        run(command(tmp_path, demo_root, "--resume"))
    assert phases_in(run_dir / "results_all_phases.csv") == {0} == phases_in(run_dir / "results_per_task.csv")
    assert json.loads((run_dir / "summary.json").read_text())["tasks_finished"] == 1
    assert {r["tasks_finished"] for r in csv.DictReader(open(run_dir / "results_mean.csv"))} == {"1"}
    assert not list(run_dir.rglob("*.tmp"))


# ----------------------------------------------------------------------------- observers
def test_observers_are_told_every_point_of_the_run_in_order(tmp_path, demo_root, monkeypatch):
    told = []

    class Recorder(RunHooks):
        def run_started(self, run):
            told.append(("run_started", run.finished))

        def task_started(self, run, index):
            told.append(("task_started", index))

        def task_learned(self, run, index, seconds):
            told.append(("task_learned", index, run.model.tasks[index].name, sorted(run.model.tasks[index].thresholds)))

        def phase_evaluated(self, run, index, seconds):
            kept = checkpoint_tasks(run.run_dir) if (run.run_dir / "checkpoint.pt").is_file() else 0
            told.append(("phase_evaluated", index, max(r["phase"] for r in run.records), kept))

        def phase_finished(self, run, index):
            told.append(("phase_finished", index, run.finished))

        def phase_kept(self, run, index, seconds):
            told.append(("phase_kept", index, run.finished, checkpoint_tasks(run.run_dir)))

        def run_finished(self, run):
            told.append(("run_finished", len(run.model.tasks)))

    run_experiment = ucad.continual.experiment.run_experiment
    monkeypatch.setattr(ucad.continual.experiment, "run_experiment", lambda configs: run_experiment(configs, Recorder()))
    args = command(tmp_path, demo_root)
    args[args.index("dataset") + 1:args.index("dataset") + 1] = ["--train_val_split", "0.75"]
    code, output = run(args)
    assert code == 0, output
    banks = ["knowledge", "knowledge_unlimited"]  # thresholds are set before the task is reported learned
    assert told == [("run_started", 0),
                    ("task_started", 0), ("task_learned", 0, "weave", banks), ("phase_evaluated", 0, 0, 0),
                    ("phase_finished", 0, 0), ("phase_kept", 0, 1, 1),
                    ("task_started", 1), ("task_learned", 1, "washer", banks), ("phase_evaluated", 1, 1, 1),
                    ("phase_finished", 1, 1), ("phase_kept", 1, 2, 2), ("run_finished", 2)]


# ----------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_exits_130_with_one_line_saying_how_to_resume(tmp_path, demo_root, monkeypatch):
    fail_at(monkeypatch, 0, KeyboardInterrupt())
    code, output = run(command(tmp_path / "first", demo_root))
    assert code == 130 and "Traceback" not in output
    assert output.strip().splitlines()[-1] == ("interrupted before the first task finished, nothing was kept: rerun "
                                               "the same command to start again")
    assert not (tmp_path / "first" / "p" / "g_0").exists()

    fail_at(monkeypatch, 1, KeyboardInterrupt())
    code, output = run(command(tmp_path / "second", demo_root))
    run_dir = tmp_path / "second" / "p" / "g_0"
    assert code == 130
    assert output.strip().splitlines()[-1] == (f"interrupted after 1 of 2 task(s), kept in '{run_dir}': rerun the same "
                                               "command with --resume to continue with task 2")


@pytest.fixture
def ctrl_c_raises():
    """Python's own Ctrl-C handler for the test, whatever the test process inherited: started in the background
    by a script (`pytest &`), a process begins with SIGINT ignored, and a run then rightly ignores Ctrl-C too."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_ctrl_c_while_a_phase_is_written_waits_for_its_last_file(tmp_path, demo_root, monkeypatch, ctrl_c_raises):
    original_heatmap = ucad.results.tables.write_heatmap

    def ctrl_c_while_writing(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # the user presses Ctrl-C halfway through the phase's files
        return original_heatmap(*args, **kwargs)

    monkeypatch.setattr(ucad.results.tables, "write_heatmap", ctrl_c_while_writing)
    code, output = run(command(tmp_path, demo_root))
    run_dir = tmp_path / "p" / "g_0"
    assert code == 130 and "interrupted after 1 of 2 task(s)" in output
    assert checkpoint_tasks(run_dir) == 1 and phases_in(run_dir / "results_all_phases.csv") == {0}
    assert json.loads((run_dir / "summary.json").read_text())["tasks_finished"] == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are restored
