"""What a continual run keeps in its folder: config.json when it starts; after each phase the result files, then the
checkpoint; at the end the pictures and anomaly maps asked for, and the model file."""
from __future__ import annotations

from pathlib import Path

from ucad import __version__
from ucad.continual.console import echo
from ucad.continual.hooks import RunHooks
from ucad.persistence.model_file import save_model, write_checkpoint
from ucad.persistence.run_folder import interrupts_held
from ucad.results.pictures import save_final_outputs
from ucad.results.tables import write_json, write_run_results

MODEL_FILE = Path("models") / "ucad_model.pt"


class RunOutputs(RunHooks):
    def run_started(self, run) -> None:
        if run.finished:
            # a kill between two result files may have left them disagreeing: the checkpoint, written last, decides
            with interrupts_held():
                self._write_results(run)
        model = run.model
        write_json(run.run_dir / "config.json", {
            "version": __version__, **run.configs.as_dict(), "task_order": [t.category for t in run.tasks],
            "device": str(model.device), "backbone_description": model.extractor.describe(
                prompts=run.configs.model.learns_prompts), "input_norm_used": model.extractor.input_norm,
            "input_mean": model.extractor.mean, "input_std": model.extractor.std, "patch_grid": model.grid,
            "nn": run.scorer.describe()})

    def phase_finished(self, run, index: int) -> None:
        """The checkpoint last: --resume rewrites the others from it, so a kill between two files leaves no conflict."""
        self._write_results(run)
        write_checkpoint(run.run_dir, run.model, run.progress())

    def run_finished(self, run) -> None:
        settings, run_dir = run.configs.run, run.run_dir
        for line in save_final_outputs(run.evaluator, run_dir, len(run.tasks) - 1, settings.save_segmentation_images,
                                       settings.save_anomaly_maps):
            echo(line)
        if settings.save_patchcore_model:
            save_model(run.model, run_dir / MODEL_FILE, {**run.configs.as_dict(), "task_order": [
                t.category for t in run.tasks]}, full=settings.save_full_model)
            echo(f"model: {run_dir / MODEL_FILE} (score new images: python -m ucad.predict {run_dir / MODEL_FILE} "
                 "IMAGE_FOLDER OUTPUT_FOLDER)")
        echo(f"results: {run_dir}")

    @staticmethod
    def _write_results(run) -> None:
        tasks, timings = run.model.tasks, run.timer.as_dict()
        write_run_results(run.run_dir, run.records, run.image_rows, [t.category for t in run.tasks], {
            "losses": run.losses, "timings": timings,
            "memory_bytes_per_task": {t.name: t.memory_bytes() for t in tasks},
            "feature_drift": {t.name: t.extra.get("feature_drift") for t in tasks},
            "chosen_epochs": {t.name: t.extra["chosen_epoch"] for t in tasks if "chosen_epoch" in t.extra}})
        write_json(run.run_dir / "timings.json", timings)
