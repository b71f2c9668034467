"""The command line end to end on tiny data: the published command, bad input, resume, saved model."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import ucad.continual.experiment
from ucad.cli.run import main

TINY = ["ucad", "-b", "resnet18", "--weights", "random", "-le", "layer2", "-le", "layer3", "--patchsize", "3",
        "--pretrain_embed_dimension", "64", "--target_embed_dimension", "64"]


def run(args: list[str]):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, result.output


def global_options(results: Path, group: str = "g", epochs: int = 1) -> list[str]:
    return ["--cpu", "--seed", "0", "--epochs_num", str(epochs), "--memory_size", "16", "--key_size", "16",
            "--basic_size", "32", "--log_group", group, "--log_project", "p", str(results)]


def dataset(root: Path, *categories: str) -> list[str]:
    flags = [x for c in categories for x in ("-d", c)]
    return ["dataset", "--resize", "64", "--imagesize", "64", "--batch_size", "4", "--num_workers", "1", *flags,
            "mvtec", str(root)]


def test_published_command_line_reaches_the_data(tmp_path):
    code, output = run(["--gpu", "0", "--seed", "0", "--memory_size", "196", "--log_group",
                        "IM224_UCAD_L5_P01_D1024_M196", "--save_segmentation_images", "--log_project",
                        "MVTecAD_Results", str(tmp_path / "results"),
                        "ucad", "-b", "wideresnet50", "-le", "layer2", "-le", "layer3", "--faiss_on_gpu",
                        "--pretrain_embed_dimension", "1024", "--target_embed_dimension", "1024",
                        "--anomaly_scorer_num_nn", "1", "--patchsize", "1",
                        "sampler", "-p", "0.1", "approx_greedy_coreset",
                        "dataset", "--resize", "224", "--imagesize", "224", "-d", "bottle", "-d", "cable",
                        "mvtec", str(tmp_path / "no_such_mvtec")])
    assert code == 2
    assert "no_such_mvtec" in output and "does not exist" in output
    assert "Traceback" not in output


def test_published_command_shape_completes_on_demo_data(demo_root, tmp_path):
    """The spec's command line with only -b changed to a backbone that has weights here (random, tiny)."""
    code, output = run(["--gpu", "0", "--seed", "0", "--memory_size", "16", "--key_size", "16", "--basic_size", "32",
                        "--epochs_num", "1", "--log_group", "IM224_UCAD_L5_P01_D1024_M196", "--save_segmentation_images",
                        "--log_project", "MVTecAD_Results", str(tmp_path),
                        "ucad", "-b", "resnet18", "--weights", "random", "-le", "layer2", "-le", "layer3",
                        "--faiss_on_gpu", "--pretrain_embed_dimension", "64", "--target_embed_dimension", "64",
                        "--anomaly_scorer_num_nn", "1", "--patchsize", "1",
                        "sampler", "-p", "0.1", "approx_greedy_coreset",
                        *dataset(demo_root, "weave", "washer")])
    assert code == 0, output
    run_dir = tmp_path / "MVTecAD_Results" / "IM224_UCAD_L5_P01_D1024_M196_0"
    rows = list(csv.DictReader(open(run_dir / "results_per_task.csv")))
    assert {r["task"] for r in rows} == {"weave", "washer"}
    assert {r["variant"] for r in rows} == {"task_agnostic", "task_agnostic_unlimited", "oracle"}
    # this seeded run's final numbers (random tiny backbone): image AUROC is a ratio of image pairs, AUPRO a float sum
    measured = {(r["task"], r["variant"]): (float(r["image_auroc"]), float(r["aupro"])) for r in rows}
    assert {key: auroc for key, (auroc, _) in measured.items()} == {
        ("weave", "task_agnostic"): 0.78125, ("weave", "task_agnostic_unlimited"): 0.9375, ("weave", "oracle"): 0.78125,
        ("washer", "task_agnostic"): 0.875, ("washer", "task_agnostic_unlimited"): 0.9375, ("washer", "oracle"): 0.875}
    assert {key: aupro for key, (_, aupro) in measured.items()} == pytest.approx({
        ("weave", "task_agnostic"): 0.555519, ("weave", "task_agnostic_unlimited"): 0.537242,
        ("weave", "oracle"): 0.555519, ("washer", "task_agnostic"): 0.366624,
        ("washer", "task_agnostic_unlimited"): 0.734546, ("washer", "oracle"): 0.366624}, abs=1e-6)
    assert "mean" in output and "FM" in output and "routing" in output
    assert (run_dir / "matrices" / "task_agnostic_image_auroc.csv").is_file()
    assert (run_dir / "image_auroc_matrix.png").is_file()
    assert len(list((run_dir / "segmentation_images" / "washer").glob("*.png"))) == 12
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["backbone"] == "resnet18" and config["task_order"] == ["weave", "washer"]
    # a second run never overwrites the first
    code, _ = run(global_options(tmp_path, "IM224_UCAD_L5_P01_D1024_M196") + TINY + dataset(demo_root, "weave"))
    assert code == 0 and (tmp_path / "p" / "IM224_UCAD_L5_P01_D1024_M196_0").is_dir()


@pytest.mark.parametrize("bad, expected", [
    (["-d", "wasch"], ["wasch", "washer", "Categories found"]),
])
def test_unknown_category_lists_the_categories(demo_root, tmp_path, bad, expected):
    code, output = run(global_options(tmp_path) + TINY + ["dataset", *bad, "mvtec", str(demo_root)])
    assert code == 2
    for text in expected:
        assert text in output


def test_missing_structure_maps_say_how_to_make_them(demo_root, tmp_path):
    code, output = run(global_options(tmp_path) + TINY + ["dataset", "--structure_path", str(tmp_path / "none"),
                                                          "-d", "weave", "mvtec", str(demo_root)])
    assert code == 2
    assert "make_structure_maps" in output and "--no_scl" in output and str(tmp_path / "none") in output


def test_no_scl_runs_without_structure_maps(demo_root, tmp_path):
    code, output = run(global_options(tmp_path) + TINY + ["--no_scl", "dataset", "--structure_path",
                                                          str(tmp_path / "none"), "--imagesize", "64", "--resize",
                                                          "64", "-d", "weave", "mvtec", str(demo_root)])
    assert code == 0, output
    assert "OFF (--no_scl)" in output


def test_gpu_request_without_gpu_falls_back_with_one_warning(demo_root, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    options = [o for o in global_options(tmp_path) if o != "--cpu"]
    code, output = run(["--gpu", "0"] + options + TINY + dataset(demo_root, "weave"))
    assert code == 0, output
    assert output.count("--gpu 0 asked for a GPU") == 1


def test_patchcore_mode_runs(demo_root, tmp_path):
    code, output = run(global_options(tmp_path) + TINY[:-4] + ["--pretrain_embed_dimension", "64",
                                                                "--target_embed_dimension", "64", "--mode", "patchcore",
                                                                "sampler", "-p", "0.2", "greedy_coreset"]
                       + dataset(demo_root, "weave", "washer"))
    assert code == 0, output
    rows = list(csv.DictReader(open(tmp_path / "p" / "g_0" / "results_per_task.csv")))
    assert {r["variant"] for r in rows} == {"task_agnostic", "oracle"}


def test_crash_then_resume_gives_the_uninterrupted_results(demo_root, tmp_path, monkeypatch):
    args = TINY + dataset(demo_root, "weave", "washer", "pcb_chip")
    code, _ = run(global_options(tmp_path / "straight") + args)
    assert code == 0
    straight = list(csv.DictReader(open(tmp_path / "straight" / "p" / "g_0" / "results_all_phases.csv")))

    original = ucad.continual.experiment.learn_task

    def crash_on_third(model, task_index, *rest, **kwargs):
        if task_index == 2:
            raise RuntimeError("simulated crash in task 3")
        return original(model, task_index, *rest, **kwargs)

    monkeypatch.setattr(ucad.continual.experiment, "learn_task", crash_on_third)
    with pytest.raises(RuntimeError):
        CliRunner().invoke(main, global_options(tmp_path / "crash") + args, catch_exceptions=False)
    run_dir = tmp_path / "crash" / "p" / "g_0"
    assert {r["phase"] for r in csv.DictReader(open(run_dir / "results_all_phases.csv"))} == {"0", "1"}
    monkeypatch.setattr(ucad.continual.experiment, "learn_task", original)
    code, output = run(["--resume"] + global_options(tmp_path / "crash") + args)
    assert code == 0, output
    assert "resuming after task 2" in output
    assert not (tmp_path / "crash" / "p" / "g_1").exists()
    resumed = list(csv.DictReader(open(run_dir / "results_all_phases.csv")))
    key = lambda r: (r["phase"], r["task"], r["variant"])  # noqa: E731
    assert sorted(map(key, resumed)) == sorted(map(key, straight))
    by_key = {key(r): r for r in straight}
    for r in resumed:
        assert float(r["image_auroc"]) == pytest.approx(float(by_key[key(r)]["image_auroc"]), abs=1e-6)
        assert float(r["pixel_auroc"]) == pytest.approx(float(by_key[key(r)]["pixel_auroc"]), abs=1e-6)


def test_saved_model_scores_new_images_without_task(demo_root, tmp_path):
    code, output = run(["--save_patchcore_model"] + global_options(tmp_path) + TINY + dataset(demo_root, "weave",
                                                                                                "washer"))
    assert code == 0, output
    model = tmp_path / "p" / "g_0" / "models" / "ucad_model.pt"
    from ucad.predict import main as predict

    result = CliRunner().invoke(predict, [str(model), str(demo_root / "washer" / "test"), str(tmp_path / "pred"),
                                          "--cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert len(rows) == 12
    assert sum(r["task"] == "washer" for r in rows) >= 9  # routed by keys, no task given
    assert len(list((tmp_path / "pred" / "maps").glob("*.npy"))) == 12
    bad = CliRunner().invoke(predict, [str(tmp_path / "nope.pt"), str(demo_root), str(tmp_path / "o"), "--cpu"])
    assert bad.exit_code == 2 and "nope.pt" in bad.output


def test_fast_path_agrees_with_the_reference_path(demo_root, tmp_path):
    """Cached evaluation with batched features vs recomputing everything every phase, one image at a time."""
    args = dataset(demo_root, "weave", "washer", "pcb_chip")
    code, _ = run(global_options(tmp_path / "fast") + TINY + ["--feature_batch_size", "32"] + args)
    assert code == 0
    code, _ = run(["--reference_evaluation"] + global_options(tmp_path / "slow") + TINY
                  + ["--feature_batch_size", "1"] + args)
    assert code == 0
    fast = list(csv.DictReader(open(tmp_path / "fast" / "p" / "g_0" / "results_all_phases.csv")))
    slow = {(r["phase"], r["task"], r["variant"]): r
            for r in csv.DictReader(open(tmp_path / "slow" / "p" / "g_0" / "results_all_phases.csv"))}
    assert len(fast) == len(slow) == 6 * 3
    for r in fast:
        other = slow[(r["phase"], r["task"], r["variant"])]
        for metric in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro", "routing_accuracy"):
            assert abs(float(r[metric]) - float(other[metric])) < 0.005, (metric, r, other)


def test_visa_as_distributed_runs_end_to_end(demo_root, tmp_path):
    """VisA layout (JPG images, 0/1 masks, split_csv/1cls.csv) built from demo images, with its structure maps."""
    import numpy as np
    from PIL import Image

    from segment_anything_prep.make_structure_maps import make_structure_maps

    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for category in ("weave", "washer"):
        images = root / category / "Data" / "Images"
        masks = root / category / "Data" / "Masks" / "Anomaly"
        for folder in (images / "Normal", images / "Anomaly", masks):
            folder.mkdir(parents=True, exist_ok=True)
        source = demo_root / category
        for i, path in enumerate(sorted((source / "train" / "good").glob("*.png"))):
            Image.open(path).convert("RGB").save(images / "Normal" / f"{i:03d}.JPG")
            rows.append(f"{category},train,normal,{category}/Data/Images/Normal/{i:03d}.JPG,")
        for i, path in enumerate(sorted((source / "test" / "good").glob("*.png"))):
            Image.open(path).convert("RGB").save(images / "Normal" / f"t{i:03d}.JPG")
            rows.append(f"{category},test,normal,{category}/Data/Images/Normal/t{i:03d}.JPG,")
        defects = sorted(p for p in (source / "test").glob("*/*.png") if p.parent.name != "good")
        for i, path in enumerate(defects):
            Image.open(path).convert("RGB").save(images / "Anomaly" / f"{i:03d}.JPG")
            mask = np.asarray(Image.open(source / "ground_truth" / path.parent.name / f"{path.stem}_mask.png")) > 0
            Image.fromarray(mask.astype(np.uint8)).save(masks / f"{i:03d}.png")  # VisA masks are 0/1
            rows.append(f"{category},test,anomaly,{category}/Data/Images/Anomaly/{i:03d}.JPG,"
                        f"{category}/Data/Masks/Anomaly/{i:03d}.png")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    make_structure_maps(root, method="felzenszwalb", progress=False, log=lambda *a, **k: None)
    code, output = run(global_options(tmp_path) + TINY + ["dataset", "--resize", "64", "--imagesize", "64",
                                                          "--num_workers", "1", "-d", "weave", "-d", "washer",
                                                          "visa", str(root)])
    assert code == 0, output
    rows = list(csv.DictReader(open(tmp_path / "p" / "g_0" / "results_per_task.csv")))
    assert {r["task"] for r in rows} == {"weave", "washer"}
    assert all(float(r["pixel_auroc"]) > 0.5 for r in rows)
