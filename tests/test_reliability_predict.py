"""ucad.predict and ucad.evaluate as careful as the run: outputs that never collide, the output folder never read
as input, an unusable output folder or option one line before any work, a missing data part told what to add."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import ucad.evaluate
import ucad.predict
from ucad.cli.run import main as run_main
from ucad.evaluate import main as evaluate
from ucad.predict import main as predict

TINY = ["ucad", "-b", "resnet18", "--weights", "random", "-le", "layer2", "--patchsize", "1",
        "--pretrain_embed_dimension", "16", "--target_embed_dimension", "16", "--no_scl"]


@pytest.fixture(scope="module")
def model_file(demo_root, tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("reliability_predict")
    result = CliRunner().invoke(run_main, ["--cpu", "--epochs_num", "0", "--memory_size", "8", "--key_size", "8",
                                           "--basic_size", "0", "--save_patchcore_model", "--log_group", "g",
                                           "--log_project", "p", str(results), *TINY, "dataset", "--resize", "32",
                                           "--imagesize", "32", "--num_workers", "1", "-d", "weave", "mvtec",
                                           str(demo_root)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return results / "p" / "g_0" / "models" / "ucad_model.pt"


def invoke(command, args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(command, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def images(demo_root: Path, folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted((demo_root / "weave" / "test" / "good").glob("*.png"))[:count]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def rows(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "predictions.csv")))


def test_two_images_with_one_stem_get_their_own_outputs(model_file, demo_root, tmp_path):
    folder = images(demo_root, tmp_path / "in", 1)
    (folder / "000.jpg").write_bytes((folder / "000.png").read_bytes())  # PIL reads the content, not the suffix
    (folder / "sub").mkdir()
    (folder / "sub" / "001.png").write_bytes((folder / "000.png").read_bytes())
    code, output = invoke(predict, [str(model_file), str(folder), str(tmp_path / "out"), "--cpu", "--no_pictures"])
    assert code == 0, output
    names = {row["image"]: row["output_name"] for row in rows(tmp_path / "out")}
    assert names == {"000.jpg": "000.jpg", "000.png": "000.png", str(Path("sub") / "001.png"): "sub__001"}
    assert sorted(p.name for p in (tmp_path / "out" / "maps").iterdir()) == ["000.jpg.npy", "000.png.npy",
                                                                              "sub__001.npy"]


def test_an_output_folder_inside_the_image_folder_is_never_read(model_file, demo_root, tmp_path):
    folder = images(demo_root, tmp_path / "in", 3)
    for _ in range(2):
        code, output = invoke(predict, [str(model_file), str(folder), str(folder / "out"), "--cpu"])
        assert code == 0, output
        assert len(rows(folder / "out")) == 3 and "scored 3 images" in output


def test_an_output_folder_that_cannot_be_made_is_one_line_before_any_work(model_file, demo_root, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(ucad.predict, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    folder = images(demo_root, tmp_path / "in", 1)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    unwritable = [a_file / "out"]
    if os.geteuid() == 0:  # root writes anywhere but on a read-only file system
        unwritable.append(Path("/proc/ucad-out"))
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        unwritable.append(locked / "out")
    for out in unwritable:
        code, output = invoke(predict, [str(model_file), str(folder), str(out), "--cpu"])
        (line,) = output.strip().splitlines()
        assert code == 2 and line.startswith(f"error: OUTPUT_FOLDER '{out}' cannot be written (")
        assert line.endswith("); choose a folder you can write to")


def test_a_dangling_link_among_the_images_is_named(model_file, demo_root, tmp_path):
    folder = images(demo_root, tmp_path / "in", 1)
    os.symlink(tmp_path / "gone.png", folder / "001.png")
    code, output = invoke(predict, [str(model_file), str(folder), str(tmp_path / "out"), "--cpu"])
    assert code == 2 and output.strip().splitlines() == [
        f"error: image '{folder / '001.png'}' is a symbolic link to '{tmp_path / 'gone.png'}', which does not exist: "
        "fix or remove the link"]


def test_a_run_folder_given_as_the_model_is_named_a_folder(model_file, demo_root, tmp_path):
    folder = images(demo_root, tmp_path / "in", 1)
    run_dir = model_file.parent.parent
    code, output = invoke(predict, [str(run_dir), str(folder), str(tmp_path / "out"), "--cpu"])
    assert code == 2 and f"'{run_dir}' is a folder" in output and "does not exist" not in output


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_batch_size_below_one_is_refused_naming_the_option(model_file, demo_root, tmp_path, value):
    folder = images(demo_root, tmp_path / "in", 1)
    for command, args in ((predict, [str(model_file), str(folder), str(tmp_path / "out"), "--cpu"]),
                          (evaluate, ["--cpu", str(model_file)])):
        code, output = invoke(command, [*args, "--batch_size", value])
        assert code == 2 and "--batch_size" in output and f"must be at least 1, got {value}" in output
        assert "Traceback" not in output


def test_evaluate_without_its_data_part_says_what_to_add(model_file):
    code, output = invoke(evaluate, ["--cpu", str(model_file)])
    assert code == 2 and output.strip().splitlines() == [
        f"error: give the labelled data after the model, once: {model_file} dataset NAME DATA_PATH (e.g. ... dataset "
        "mvtec /data/mvtec)"]


def test_evaluate_with_an_unwritable_output_path_stops_before_any_work(model_file, demo_root, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(ucad.evaluate, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, output = invoke(evaluate, ["--cpu", "--output_path", str(a_file / "ev"), str(model_file), "dataset",
                                     "mvtec", str(demo_root)])
    assert code == 2 and f"error: --output_path '{a_file / 'ev'}' cannot be written" in output


def test_ctrl_c_while_predicting_is_one_line_and_status_130(model_file, demo_root, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ucad.predict, "_predict", interrupted)
    folder = images(demo_root, tmp_path / "in", 1)
    code, output = invoke(predict, [str(model_file), str(folder), str(tmp_path / "out"), "--cpu"])
    assert code == 130 and output.strip().splitlines()[-1].startswith("interrupted; predictions.csv is written")


def test_maps_of_same_stem_images_differ_when_the_images_do(model_file, demo_root, tmp_path):
    folder = images(demo_root, tmp_path / "in", 2)
    (folder / "001.png").rename(folder / "000.jpg")
    code, output = invoke(predict, [str(model_file), str(folder), str(tmp_path / "out"), "--cpu", "--no_pictures"])
    assert code == 0, output
    maps = tmp_path / "out" / "maps"
    assert not np.array_equal(np.load(maps / "000.png.npy"), np.load(maps / "000.jpg.npy"))
