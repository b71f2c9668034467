"""Evaluate a saved model on a labelled data set in the MVTec or VisA layout (as PatchCore's load_and_evaluate):

    python -m ucad.evaluate [--cpu] MODEL dataset [-d CATEGORY ...] mvtec DATA_PATH

Each category's test set is scored as in the last phase of a run (task_agnostic and oracle, with the model's
thresholds); the run's result files go to `evaluation_N` beside the model's `models/` folder, or to --output_path."""
from __future__ import annotations

from pathlib import Path

import click

from ucad.cli.options import config_parameters, one_line_errors, shared_options
from ucad.config import DataConfig, RunConfig, check_bounds, to_dict
from ucad.data.layouts import list_tasks, nfc
from ucad.runtime.device import select_device
from ucad.runtime.errors import RunInterrupted, UcadError
from ucad.continual.evaluator import ContinualEvaluator
from ucad.continual.experiment import echo, load_test_set, save_final_outputs
from ucad.model.ucad_model import KNOWLEDGE
from ucad.persistence.model_file import load_model
from ucad.predict import prepare_output_folder
from ucad.results.tables import final_tables, write_json, write_run_results
from ucad.persistence.run_folder import new_run_dir
from ucad.runtime.timing import PhaseTimer

DATA_FIELDS = ("name", "data_path", "categories", "num_workers")  # the rest of `dataset` concerns learning


def evaluate_model(model_path: Path, data: DataConfig, device, output_path: Path | None, batch_size: int,
                   pictures: bool, maps: bool) -> Path:
    """Scores the data set's test images with the saved model; returns the folder the results went to."""
    check_bounds(data)
    folder = Path(model_path).resolve().parent
    base = folder.parent if folder.name == "models" else folder
    # an unwritable destination is one line before the model is read, not a traceback after the evaluation
    if output_path:
        prepare_output_folder(Path(output_path), "--output_path")
    elif base.is_dir():  # else the model file is missing, which load_model says
        prepare_output_folder(base, "the folder beside the model (choose another with --output_path)")
    model = load_model(model_path, device)
    task_names = [t.name for t in model.tasks]
    learned = [nfc(name) for name in task_names]  # a name typed on one system, stored on another
    categories = list(data.categories) or task_names
    if unknown := [c for c in categories if nfc(c) not in learned]:
        raise UcadError(f"-d {unknown[0]}: not a task of this model, which learned {', '.join(task_names)}; "
                        "only test sets of learned tasks can be evaluated")
    phase, timer = len(model.tasks) - 1, PhaseTimer()
    evaluator = ContinualEvaluator(model, timer, batch_size, fpr_limit=RunConfig.fpr_limit)
    for task in list_tasks(data.name, data.data_path, categories):
        index = learned.index(nfc(task.category))
        evaluator.add_test_set(load_test_set(index, task, model.config.geometry, data.num_workers))
    records = evaluator.evaluate_phase(phase)
    out = Path(output_path) if output_path else new_run_dir(base, "", "evaluation")  # --output_path was made above
    write_run_results(out, records, evaluator.image_rows(phase), task_names, {"timings": timer.as_dict()})
    write_json(out / "config.json", {"model_path": str(model_path), "data": to_dict(data), "device": str(device),
                                     "model_run_configuration": model.run_configuration})
    thresholds = {t.name: t.thresholds.get(KNOWLEDGE) for t in model.tasks}
    echo(final_tables(records, task_names, model.config.mode, thresholds))
    save_final_outputs(evaluator, out, phase, pictures, maps)
    echo(f"results: {out}")
    return out


@click.group(chain=True, invoke_without_command=True)
@click.argument("model_path", type=click.Path())
@shared_options("gpu", "cpu")
@click.option("--output_path", type=click.Path(file_okay=False), default=None,
              help="Where the result files go (default: evaluation_N beside the model's models/ folder).")
@shared_options("feature_batch_size", "save_segmentation_images", "save_anomaly_maps",
                renamed={"feature_batch_size": "--batch_size"})
def main(**kwargs):
    """Evaluate a saved UCAD model (--save_patchcore_model) on a labelled data set."""


@main.command("dataset")
@config_parameters("dataset", only=DATA_FIELDS)
def dataset_command(**kwargs):
    """The labelled data: MVTec-layout folder or VisA; -d picks learned categories (default: all learned)."""
    return kwargs


@main.result_callback()
def run(datasets, model_path, gpu, cpu, output_path, feature_batch_size, save_segmentation_images,
        save_anomaly_maps):
    with one_line_errors():
        if len(datasets) != 1:
            raise UcadError(f"give the labelled data after the model, once: {model_path} dataset NAME DATA_PATH "
                            "(e.g. ... dataset mvtec /data/mvtec)")
        device = select_device(gpu, cpu, warn=echo)
        try:
            evaluate_model(Path(model_path), DataConfig(**datasets[0]), device, output_path, feature_batch_size,
                           save_segmentation_images, save_anomaly_maps)
        except KeyboardInterrupt:
            raise RunInterrupted("interrupted; the result files are written once every test set is scored: run the "
                                 "same command again") from None


if __name__ == "__main__":
    main()
