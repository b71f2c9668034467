"""Typed configuration end to end: the command line builds the dataclasses, each default is defined once,
config.json is written from them and --resume names the options that differ."""
from __future__ import annotations

import json
import re
from dataclasses import fields, replace

import pytest
from click.testing import CliRunner

import ucad.continual.experiment
from test_cli import TINY, dataset, global_options, run
from ucad.cli.run import main
from ucad.config import CONFIG_CLASSES, Configs, DataConfig, LearningConfig, ModelConfig, RunConfig, cli_parameter
from ucad.runtime.errors import UcadError


@pytest.fixture
def captured(monkeypatch):
    """The Configs the command line hands to the experiment (which is not run)."""
    seen = []
    monkeypatch.setattr(ucad.continual.experiment, "run_experiment", seen.append)
    return seen


def test_defaults_come_from_the_dataclasses(captured, tmp_path):
    result = CliRunner().invoke(main, [str(tmp_path), "dataset", "mvtec", "/data"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    configs = captured[0]
    assert configs.model == ModelConfig() and configs.learning == LearningConfig()
    assert configs.data == DataConfig("mvtec", "/data") and configs.run == RunConfig(str(tmp_path))
    # defaults the README documents
    assert configs.run.faiss_num_workers == 8 and configs.model.patchsize == 3
    assert configs.learning.sampler == "approx_greedy_coreset" and configs.learning.train_prompt


def test_every_option_maps_onto_one_field(captured, tmp_path):
    """The published command line, option by option, lands in the typed fields."""
    result = CliRunner().invoke(main, [
        "--gpu", "0", "--seed", "3", "--memory_size", "196", "--log_group", "IM224", "--save_segmentation_images",
        "--log_project", "MVTecAD_Results", str(tmp_path),
        "ucad", "-b", "wideresnet50", "-le", "layer2", "-le", "layer3", "--faiss_on_gpu",
        "--pretrain_embed_dimension", "1024", "--target_embed_dimension", "1024", "--anomaly_scorer_num_nn", "1",
        "--patchsize", "1", "--no_scl",
        "sampler", "-p", "0.2", "greedy_coreset",
        "dataset", "--resize", "256", "--imagesize", "224", "--batch_size", "4", "--augment", "-d", "bottle", "-d",
        "cable", "--train_val_split", "0.9", "mvtec", "/data/mvtec"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    configs = captured[0]
    assert configs.model.backbone == "wideresnet50" and configs.model.layers == ("layer2", "layer3")
    assert (configs.model.patchsize, configs.model.resize, configs.model.imagesize) == (1, 256, 224)
    assert configs.learning.seed == 3 and configs.learning.train_prompt is False
    assert (configs.learning.sampler, configs.learning.sampler_percentage) == ("greedy_coreset", 0.2)
    assert configs.learning.batch_size == 4 and configs.learning.augment
    assert configs.data.categories == ("bottle", "cable") and configs.data.train_val_split == 0.9
    assert configs.run.faiss_on_gpu and configs.run.save_segmentation_images and configs.run.gpu == (0,)
    assert configs.run.log_group == "IM224"


def test_option_names_are_unique_and_each_default_appears_once_in_help():
    typed = [cli_parameter(f).typed for cls in CONFIG_CLASSES.values() for f in fields(cls) if cli_parameter(f)]
    assert len(typed) == len(set(typed))
    for name in ("--memory_size", "--epochs_num", "--key_size", "--basic_size", "--faiss_num_workers",
                 "--patchsize", "--train_val_split", "--threshold_quantile", "--save_anomaly_maps"):
        assert name in typed


def test_patchcore_only_options_parse_but_are_hidden_from_help(captured, tmp_path):
    patchcore_only = ["--preprocessing", "mean", "--aggregation", "mean", "--patchscore", "max", "--patchoverlap",
                      "0.1", "--patchsize_aggregate", "3"]
    result = CliRunner().invoke(main, [str(tmp_path), "ucad", *patchcore_only, "dataset", "mvtec", "/data"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert captured[0].model.patchoverlap == 0.1 and captured[0].model.patchsize_aggregate == (3,)
    shown = CliRunner().invoke(main, [str(tmp_path), "ucad", "--help"]).output
    assert "--patchsize " in shown
    for option in patchcore_only[::2]:
        assert option not in shown


def test_predict_and_evaluate_take_the_runs_options_for_shared_settings():
    from ucad.evaluate import dataset_command as evaluate_dataset, main as evaluate
    from ucad.predict import main as predict

    by_name = {f.name: f for cls in CONFIG_CLASSES.values() for f in fields(cls)}
    shared = {"--gpu": "gpu", "--cpu": "cpu", "--batch_size": "feature_batch_size", "--num_workers": "num_workers"}
    for command in (predict, evaluate, evaluate_dataset):
        options = {max(p.opts, key=len): p for p in command.params}
        for option, name in shared.items():
            if option in options:
                assert options[option].default == by_name[name].default
                assert options[option].help == cli_parameter(by_name[name]).help
    assert {"--gpu", "--cpu", "--batch_size", "--num_workers"} <= {max(p.opts, key=len) for p in predict.params}
    refused = CliRunner().invoke(predict, ["model.pt", "images", "out", "--batch_size", "0"])
    assert refused.exit_code == 2 and "--batch_size" in refused.output and "at least 1, got 0" in refused.output


@pytest.mark.parametrize("options, message", [
    (["--memory_size", "0"], "--memory_size must be at least 1, got 0"),
    (["--threshold_quantile", "1.5"], "--threshold_quantile must be in (0, 1], got 1.5"),
    (["x", "dataset", "--train_val_split", "0", "mvtec", "/d"], "--train_val_split must be in (0, 1], got 0.0"),
    (["x", "ucad", "-b", "resnet18", "-b", "resnet50", "dataset", "mvtec", "/d"], "-b/--backbone_names: one backbone per run"),
])
def test_bad_values_name_the_option(captured, options, message):
    args = options if "dataset" in options else options + ["x", "dataset", "mvtec", "/d"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and f"error: {message}" in result.output and not captured


@pytest.mark.parametrize("part, values, message", [
    ("model", {"patch_distance": "cosine"}, "--patch_distance 'cosine' is not one of squared, euclidean"),
    ("model", {"anomaly_scorer_num_nn": 0}, "--anomaly_scorer_num_nn must be at least 1, got 0"),
    ("model", {"patchsize": 0}, "--patchsize must be at least 1, got 0"),
    ("learning", {"sampler": "greedy"}, "sampler NAME 'greedy' is not one of identity, greedy_coreset"),
    ("learning", {"sampler_percentage": 1.5}, "--percentage must be in (0, 1], got 1.5"),
    ("learning", {"key_sampler": "kcenter"}, "--key_sampler 'kcenter' is not one of kmeans"),
    ("learning", {"knowledge_storage": "int4"}, "--knowledge_storage 'int4' is not one of fp32"),
    ("model", {"routing": "vote"}, "--routing 'vote' is not one of mean, calibrated"),
    ("run", {"nn_backend": "annoy"}, "--nn_backend 'annoy' is not one of auto, faiss, torch"),
])
def test_configs_built_in_code_are_checked_like_the_command_line(part, values, message):
    """Choices and limits are checked in one place, the configuration, for code that builds it without click."""
    configs = Configs(ModelConfig(), LearningConfig(), DataConfig("mvtec", "/d"), RunConfig("/r"))
    setattr(configs, part, replace(getattr(configs, part), **values))
    with pytest.raises(UcadError, match=re.escape(message)):
        configs.check()


def test_config_json_holds_the_dataclasses_and_resume_names_differing_options(demo_root, tmp_path):
    code, output = run(global_options(tmp_path) + TINY + dataset(demo_root, "weave"))
    assert code == 0, output
    config = json.loads((tmp_path / "p" / "g_0" / "config.json").read_text())
    assert config["learning"] == json.loads(json.dumps(
        {**LearningConfig().__dict__, "epochs_num": 1, "memory_size": 16, "key_size": 16, "basic_size": 32,
         "batch_size": 4}))
    assert config["model"]["backbone"] == "resnet18" and config["data"]["categories"] == ["weave"]
    assert config["run"]["log_group"] == "g"

    changed = global_options(tmp_path, epochs=2) + TINY[:-2] + ["--target_embed_dimension", "32"]
    code, output = run(["--resume"] + changed + dataset(demo_root, "weave"))
    assert code == 2
    assert "--epochs_num 1 there, 2 now" in output and "--target_embed_dimension 64 there, 32 now" in output
    assert "--memory_size" not in output
    # how the run executes may change on resume: more decoding threads are accepted
    same = global_options(tmp_path) + TINY + dataset(demo_root, "weave")
    same[same.index("--num_workers") + 1] = "2"
    code, output = run(["--resume"] + same)
    assert code == 0, output
