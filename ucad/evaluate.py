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
from ucad.runtime.errors import UcadError
from ucad.continual.evaluator import ContinualEvaluator, load_test_set
from ucad.model.ucad_model import KNOWLEDGE
from ucad.persistence.model_file import load_model
from ucad.persistence.run_folder import new_run_dir, prepare_output_folder
from ucad.results.pictures import save_final_outputs
from ucad.results.tables import final_tables, route_trust_line, write_json, write_run_results
from ucad.runtime.timing import PhaseTimer


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
@config_parameters("dataset", only=("name", "data_path", "categories", "num_workers"))  # the rest concerns learning
def dataset_command(**kwargs):
    """The labelled data: MVTec-layout folder or VisA; -d picks learned categories (default: all learned)."""
    return kwargs


@main.result_callback()
@one_line_errors("interrupted; the result files are written once every test set is scored: run the same command "
                 "again")
def run(datasets, model_path, gpu, cpu, output_path, feature_batch_size, save_segmentation_images, save_anomaly_maps):
    """Scores the data set's test images with the saved model and writes a run's result files."""
    if len(datasets) != 1:
        raise UcadError(f"give the labelled data after the model, once: {model_path} dataset NAME DATA_PATH "
                        "(e.g. ... dataset mvtec /data/mvtec)")
    device = select_device(gpu, cpu, warn=click.echo)
    model_path, data = Path(model_path), DataConfig(**datasets[0])
    check_bounds(data)
    folder = model_path.resolve().parent
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
    evaluator = ContinualEvaluator(model, timer, feature_batch_size, fpr_limit=RunConfig.fpr_limit)
    for task in list_tasks(data.name, data.data_path, categories):
        index = learned.index(nfc(task.category))
        evaluator.add_test_set(load_test_set(index, task, model.config.geometry, data.num_workers))
    records = evaluator.evaluate_phase(phase)
    out = Path(output_path) if output_path else new_run_dir(base, "", "evaluation")  # --output_path was made above
    rows = evaluator.image_rows(phase)
    write_run_results(out, records, rows, task_names, {"timings": timer.as_dict()})
    write_json(out / "config.json", {"model_path": str(model_path), "data": to_dict(data), "device": str(device),
                                     "model_run_configuration": model.run_configuration})
    thresholds = {t.name: t.thresholds.get(KNOWLEDGE) for t in model.tasks}
    click.echo(final_tables(records, task_names, model.config.mode, thresholds))
    if trust := route_trust_line(rows, model.route_trust_threshold(), model.config.route_trust_quantile):
        click.echo(trust)
    for line in save_final_outputs(evaluator, out, phase, save_segmentation_images, save_anomaly_maps):
        click.echo(line)
    click.echo(f"results: {out}")


if __name__ == "__main__":
    main()
