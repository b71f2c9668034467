"""Typed configuration end to end: the command line builds the dataclasses, each default is defined once,
config.json is written from them and --resume names the options that differ."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
from click.testing import CliRunner

import ucad.continual.experiment
from test_cli import TINY, dataset, global_options, run
from ucad import config
from ucad.cli.run import main
from ucad.config import CONFIG_CLASSES, Configs, DataConfig, LearningConfig, ModelConfig, RunConfig, cli_parameter
from ucad.runtime.errors import UcadError

REPOSITORY = Path(__file__).resolve().parents[1]


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


def test_patchcore_only_options_are_noted_and_not_configuration(captured, tmp_path):
    patchcore_only = ["--preprocessing", "mean", "--aggregation", "mean", "--patchscore", "max", "--patchoverlap",
                      "0.1", "--patchsize_aggregate", "3"]
    result = CliRunner().invoke(main, [str(tmp_path), "ucad", *patchcore_only, "dataset", "mvtec", "/data"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "note: --preprocessing, --aggregation, --patchscore, --patchoverlap, --patchsize_aggregate ignored: PatchCore "
        "options whose one behaviour is implemented here (mean pooling, the maximum patch score, stride 1)"]
    recorded = json.dumps(captured[0].as_dict())
    assert captured[0].model == ModelConfig() and not any(option[2:] in recorded for option in patchcore_only[::2])
    shown = CliRunner().invoke(main, [str(tmp_path), "ucad", "--help"]).output
    assert "--patchsize " in shown
    for option in patchcore_only[::2]:
        assert option not in shown


def test_settings_load_neither_click_nor_torch():
    shown = subprocess.run([sys.executable, "-c", "import sys, ucad.config; print('torch' in sys.modules, 'click' in "
                            "sys.modules, 'ucad.model.keys' in sys.modules)"], capture_output=True, text=True,
                           cwd=REPOSITORY, timeout=120)
    assert shown.stdout.split() == ["False", "False", "False"], shown.stderr


def test_every_label_sampling_choice_has_an_interpolation():
    from ucad.learning import loss

    assert set(loss.LABEL_SAMPLING) == set(config.LABEL_SAMPLINGS)


def test_help_states_no_released_values_and_the_table_names_real_settings():
    for cls in CONFIG_CLASSES.values():
        for config_field in fields(cls):
            assert "released" not in getattr(cli_parameter(config_field), "help", ""), config_field.name
    for name, value in config.RELEASED_CODE.items():
        config_field = config.FIELDS[name][1]
        assert config.checked_value(config_field, value, name) == value  # a value the setting can take
        assert cli_parameter(config_field) is not None


def test_departures_from_the_released_code_are_listed_as_typed():
    defaults = {**asdict(ModelConfig()), **asdict(LearningConfig()), "input_norm": "imagenet", "precision": "fp32"}
    assert config.departures_from_released_code(defaults) == ["--key_sampler kmeans (released: approx_greedy_coreset)"]
    changed = {**defaults, "key_sampler": "approx_greedy_coreset", "train_prompt": False, "precision": "bf16",
               "input_norm": "backbone", "knowledge_storage": "pq", "memory_size": 2176}
    assert config.departures_from_released_code(changed) == [
        "--input_norm backbone (released: imagenet)", "--knowledge_storage pq (released: fp32)",
        "--no_scl on (released: off)", "--precision bf16 (released: fp32)"]


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
    (["--memory_size", "-1"], "--memory_size must be at least 0, got -1"),
    (["--threshold_quantile", "1.5"], "--threshold_quantile must be in (0, 1], got 1.5"),
    (["x", "dataset", "--train_val_split", "0", "mvtec", "/d"], "--train_val_split must be in (0, 1], got 0.0"),
    (["x", "ucad", "-b", "resnet18", "-b", "resnet50", "dataset", "mvtec", "/d"], "-b/--backbone_names: one backbone per run"),
    (["--memory_size", "abc"], "--memory_size must be an integer, got 'abc'"),
    (["x", "ucad", "--key_sampler", "kcenter", "dataset", "mvtec", "/d"],
     "--key_sampler 'kcenter' is not one of kmeans"),
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
    ("learning", {"memory_size": "abc"}, "--memory_size must be an integer, got 'abc'"),
    ("learning", {"memory_size": 19.6}, "--memory_size must be an integer, got 19.6"),
    ("model", {"patchsize": True}, "--patchsize must be an integer, got True"),
    ("learning", {"train_prompt": "false"}, "learning.train_prompt must be true or false, got 'false'"),
    ("learning", {"lr": "1e-4"}, "--lr must be a number, got '1e-4'"),
    ("data", {"categories": "bottle"}, "--subdatasets must be a list, got 'bottle'"),
    ("run", {"gpu": (0, "1")}, "--gpu must be an integer, got '1'"),
    ("learning", {"temperature": None}, "learning.temperature must be a number, got None"),
])
def test_configs_built_in_code_are_checked_like_the_command_line(part, values, message):
    """Choices and limits are checked in one place, the configuration, for code that builds it without click."""
    configs = Configs(ModelConfig(), LearningConfig(), DataConfig("mvtec", "/d"), RunConfig("/r"))
    setattr(configs, part, replace(getattr(configs, part), **values))
    with pytest.raises(UcadError, match=re.escape(message)):
        configs.check()


def test_checking_brings_values_to_their_fields_types():
    configs = Configs(ModelConfig(smoothing_sigma=4), LearningConfig(lr=1), DataConfig("mvtec", "/d", ["a", "b"]),
                      RunConfig("/r", gpu=[1]))
    configs.check()
    assert (configs.model.smoothing_sigma, configs.learning.lr, configs.data.categories, configs.run.gpu) == (
        4.0, 1.0, ("a", "b"), (1,))
    assert type(configs.learning.lr) is float and configs == Configs(
        ModelConfig(), LearningConfig(lr=1.0), DataConfig("mvtec", "/d", ("a", "b")), RunConfig("/r", gpu=(1,)))


def test_config_json_holds_the_dataclasses_and_resume_names_differing_options(demo_root, tmp_path):
    code, output = run(global_options(tmp_path) + TINY + ["--patchoverlap", "0.1"] + dataset(demo_root, "weave"))
    assert code == 0, output
    written = (tmp_path / "p" / "g_0" / "config.json").read_text()
    assert "--patchoverlap ignored" in output and "patchoverlap" not in written
    config = json.loads(written)
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
