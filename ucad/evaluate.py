"""Evaluate a saved model on a labelled data set in the MVTec or VisA layout (as PatchCore's load_and_evaluate):

    python -m ucad.evaluate [--cpu] MODEL dataset [-d CATEGORY ...] mvtec DATA_PATH

Each category's test set is scored as in the last phase of a run, through the same evaluator: routed by keys
among all the model's tasks (task_agnostic) and with its task given (oracle), with the model's thresholds. It
writes the run's result files (results_per_task.csv, results_mean.csv, scores_per_image.csv, ...) to
`evaluation_N` beside the model's `models/` folder, or to --output_path.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ucad.cli import config_parameters
from ucad.config import DataConfig, LearningConfig, check_bounds, to_dict
from ucad.datasets import list_tasks
from ucad.device import select_device
from ucad.errors import UcadError
from ucad.evaluation import VARIANTS, ContinualEvaluator
from ucad.experiment import echo, load_test_set, save_final_outputs
from ucad.model import KNOWLEDGE, UcadModel
from ucad.results import final_table, new_run_dir, threshold_table, write_json, write_run_results
from ucad.timing import PhaseTimer

DATA_FIELDS = ("name", "data_path", "categories", "num_workers")  # the rest of `dataset` concerns learning


def evaluate_model(model_path: Path, data: DataConfig, device, output_path: Path | None = None,
                   batch_size: int = LearningConfig.feature_batch_size, pictures: bool = False,
                   maps: bool = False) -> Path:
    """Scores the data set's test images with the saved model; returns the folder the results went to."""
    check_bounds(data)
    model = UcadModel.load(model_path, device)
    task_names = [t.name for t in model.tasks]
    categories = list(data.categories) or task_names
    unknown = [c for c in categories if c not in task_names]
    if unknown:
        raise UcadError(f"-d {unknown[0]}: not a task of this model, which learned {', '.join(task_names)}; "
                        "only test sets of learned tasks can be evaluated")
    tasks = list_tasks(data.name, data.data_path, categories)
    phase = len(model.tasks) - 1
    timer = PhaseTimer()
    evaluator = ContinualEvaluator(model, timer, batch_size)
    for task in tasks:
        evaluator.add_test_set(load_test_set(task_names.index(task.category), task, model.config.geometry,
                                             data.num_workers))
    variants = VARIANTS if model.config.mode == "ucad" else ("task_agnostic", "oracle")
    records = evaluator.evaluate_phase(phase, variants)
    image_rows = evaluator.image_rows(phase, variants)
    folder = Path(model_path).resolve().parent
    base = folder.parent if folder.name == "models" else folder
    out = Path(output_path) if output_path else new_run_dir(base, "", "evaluation")
    out.mkdir(parents=True, exist_ok=True)
    write_run_results(out, records, image_rows, task_names, {"timings": timer.as_dict()})
    write_json(out / "config.json", {"model_path": str(model_path), "data": to_dict(data), "device": str(device),
                                     "model_run_configuration": model.run_configuration})
    echo(final_table(records, task_names, model.config.mode))
    thresholds = {t.name: t.thresholds.get(KNOWLEDGE) for t in model.tasks}
    if any(thresholds.values()):
        echo("\n" + threshold_table(records, thresholds))
    save_final_outputs(evaluator, out, phase, pictures, maps)
    echo(f"results: {out}")
    return out


@click.group(chain=True)
@click.argument("model_path", type=click.Path())
@click.option("--gpu", type=int, default=[0], multiple=True, show_default=True, help="GPU index; CPU fallback when none.")
@click.option("--cpu", is_flag=True, help="Run on the CPU.")
@click.option("--output_path", type=click.Path(file_okay=False), default=None,
              help="Where the result files go (default: evaluation_N beside the model's models/ folder).")
@click.option("--batch_size", type=int, default=LearningConfig.feature_batch_size, show_default=True,
              help="Images per batch when extracting features.")
@click.option("--save_segmentation_images", is_flag=True, help="Write image | ground truth | anomaly map pictures.")
@click.option("--save_anomaly_maps", is_flag=True, help="Write each test image's anomaly map as .npy.")
def main(**kwargs):
    """Evaluate a saved UCAD model (--save_patchcore_model) on a labelled data set."""


@main.command("dataset")
@config_parameters("dataset", only=DATA_FIELDS)
def dataset_command(**kwargs):
    """The labelled data: MVTec-layout folder or VisA; -d picks learned categories (default: all learned)."""
    return kwargs


@main.result_callback()
def run(datasets, model_path, gpu, cpu, output_path, batch_size, save_segmentation_images, save_anomaly_maps):
    try:
        if len(datasets) != 1:
            raise UcadError("give the 'dataset NAME DATA_PATH' sub-command once (e.g. ... dataset mvtec /data/mvtec)")
        device = select_device(gpu, cpu, warn=echo)
        evaluate_model(Path(model_path), DataConfig(**datasets[0]), device, output_path, batch_size,
                       save_segmentation_images, save_anomaly_maps)
    except UcadError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
