"""The continual experiment: tasks one after another; each is learned, given its thresholds, and every task seen so
far is evaluated after it. What is printed and written (result files and a checkpoint after each task, so that a
crash in task 7 keeps tasks 1-6 for --resume) are observers of the loop, told through `RunHooks`."""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ucad.config import Configs, differing_options
from ucad.continual.console import ConsoleReport, echo
from ucad.continual.evaluator import ContinualEvaluator, load_test_set
from ucad.continual.hooks import RunHooks
from ucad.continual.outputs import RunOutputs
from ucad.data.check import check_data
from ucad.data.decode import ImageGeometry, load_images, load_label_map
from ucad.data.layouts import TaskSamples, list_tasks
from ucad.data.structure_maps import default_structure_root, load_structure_map, structure_map_path
from ucad.learning.task import learn_task
from ucad.learning.thresholds import calibrate
from ucad.model.coreset import CoresetSampler
from ucad.model.nearest_neighbor import NearestNeighbourScorer
from ucad.model.scoring import held_out_margins
from ucad.model.task_memory import TaskMemory
from ucad.model.ucad_model import UcadModel
from ucad.persistence.model_file import CHECKPOINT, read_checkpoint
from ucad.persistence.run_folder import check_results_path, interrupts_held, latest_run_dir, new_run_dir, \
    remove_temporary_files
from ucad.runtime.device import select_device
from ucad.runtime.errors import RunInterrupted, UcadError
from ucad.runtime.timing import PhaseTimer


def structure_root_for(data) -> Path:
    return Path(data.structure_path) if data.structure_path else default_structure_root(data.data_path)


def load_label_maps(task: TaskSamples, structure_root: Path, geometry: ImageGeometry) -> torch.Tensor:
    maps = [load_label_map(load_structure_map(structure_map_path(s.image_path, task.root, structure_root)), geometry)
            for s in task.train]
    return torch.from_numpy(np.stack(maps))


def run_experiment(configs: Configs, hooks: RunHooks | None = None) -> Path:
    """The whole continual run described by the four configurations, reported on the console and kept in its run
    folder, which it returns; `hooks` observes it too. A new run that stops before its first task finished removes
    its folder (a failed start keeps nothing, and must not pile up folders); Ctrl-C becomes RunInterrupted."""
    run = ContinualRun(configs, [ConsoleReport(), RunOutputs(), *([hooks] if hooks else [])])
    try:
        run.set_up()
        for index in range(len(run.tasks)):
            run.learn(index)
        run.notify("run_finished")
        return run.run_dir
    except BaseException as error:
        if run.created and run.finished == 0:
            shutil.rmtree(run.run_dir, ignore_errors=True)
            run.run_dir = None
        if isinstance(error, KeyboardInterrupt):
            raise RunInterrupted(run.interrupted_message()) from None
        raise


class ContinualRun:
    """The state of a run (model, evaluator, records so far, run folder) and its loop."""

    def __init__(self, configs: Configs, hooks: list[RunHooks]):
        self.configs, self.hooks = configs, hooks
        self.run_dir: Path | None = None
        self.created = False  # this run made its folder (a resumed one did not)
        self.finished = 0  # tasks learned, evaluated and kept
        self.tasks: list[TaskSamples] = []
        self.records: list[dict] = []
        self.image_rows: list[dict] = []
        self.losses: dict[str, list[float]] = {}
        self.timer = PhaseTimer()
        self.started = time.perf_counter()

    def notify(self, event: str, *arguments) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *arguments)

    def set_up(self) -> None:
        configs = self.configs
        model_config, learning, data, run = configs.model, configs.learning, configs.data, configs.run
        configs.check()
        for seed_generator in (random.seed, np.random.seed, torch.manual_seed):
            seed_generator(learning.seed)
        check_results_path(run.results_path, run.log_project, run.log_group)
        device = select_device(run.gpu, run.cpu, warn=echo)
        self.tasks = list_tasks(data.name, data.data_path, list(data.categories), data.train_val_split, learning.seed)
        self.structure_root = structure_root_for(data) if model_config.learns_prompts and learning.train_prompt \
            else None
        resumed = self._checkpoint() if run.resume else None
        if run.resume and resumed is None:
            echo("note: --resume found no run of this log group with a checkpoint; starting a new one")
        # every file of every task before anything trains: a bad file in the last task must not cost the others
        for message in check_data(self.tasks, self.structure_root, data.num_workers,
                                  skip_training_of=len(resumed[1]["tasks"]) if resumed else 0):
            echo(message)

        # the backbone (and its weights) first: a download failure must not leave an empty run folder behind
        self.scorer = NearestNeighbourScorer(model_config.anomaly_scorer_num_nn, run.nn_backend, device,
                                             run.faiss_on_gpu, run.faiss_num_workers,
                                             patch_distance=model_config.patch_distance)
        self.model = UcadModel(model_config, device, run.precision, scorer=self.scorer)
        self.sampler = CoresetSampler(learning.sampler, learning.sampler_percentage, learning.seed)
        self.evaluator = ContinualEvaluator(self.model, self.timer, learning.feature_batch_size, run.fpr_limit,
                                            reuse=not run.reference_evaluation)
        if resumed:
            self.run_dir, state = resumed
            remove_temporary_files(self.run_dir)  # what a killed write left behind
            self.model.tasks = [TaskMemory.from_state(task, device) for task in state["tasks"]]
            self.records, self.image_rows, self.losses = state["records"], state["image_rows"], state["losses"]
            self.finished = len(self.model.tasks)
            self.timer.load(state.get("timings", {}))
        else:
            self.run_dir = new_run_dir(run.results_path, run.log_project, run.log_group)
            self.created = True
        self.notify("run_started")
        self.started = time.perf_counter()

    def _checkpoint(self) -> tuple[Path, dict] | None:
        """The newest run of the log group that has a checkpoint (not just the newest folder), and its checkpoint."""
        run = self.configs.run
        run_dir = latest_run_dir(run.results_path, run.log_project, run.log_group, containing=CHECKPOINT)
        if run_dir is None:
            return None
        state = read_checkpoint(run_dir)
        if differing := differing_options(state["configs"], self.configs):
            raise UcadError(f"--resume: the last run in '{run_dir}' was made with other settings "
                            f"({'; '.join(differing)}); rerun with that run's options to continue it, or without "
                            "--resume to start a new run")
        return run_dir, state

    def progress(self) -> dict:
        """What a checkpoint keeps beside the learned tasks; `set_up` restores it."""
        return {"configs": self.configs.as_dict(), "records": self.records, "image_rows": self.image_rows,
                "losses": self.losses, "timings": self.timer.as_dict()}

    def learn(self, index: int) -> None:
        """Task `index`'s test set joins the evaluation; the task is learned unless a resumed run already has it."""
        task, learning = self.tasks[index], self.configs.learning
        with self.timer.phase("image_loading", len(task.test)):
            self.evaluator.add_test_set(load_test_set(index, task, self.configs.model.geometry,
                                                      self.configs.data.num_workers))
        if index < self.finished:
            return
        self.notify("task_started", index)
        train_images, label_maps, validation_images = self._training_images(task)
        started = time.perf_counter()
        memory, self.losses[task.category] = learn_task(self.model, index, task.category, train_images, label_maps,
                                                        self.sampler, learning, self.timer, validation_images)
        seconds = time.perf_counter() - started
        del train_images, label_maps
        self.model.tasks.append(memory)
        if validation_images is not None:  # scored as this task (its prompt and knowledge)
            with self.timer.phase("thresholds", validation_images.shape[0]):
                memory.thresholds = calibrate(self.model, index, validation_images, learning.threshold_quantile,
                                              learning.feature_batch_size)
                memory.routing["held_out_margins"] = held_out_margins(self.model, validation_images,
                                                                      learning.feature_batch_size)
        del validation_images
        self.notify("task_learned", index, seconds)

        started = time.perf_counter()
        self.records += self.evaluator.evaluate_phase(index)
        self.image_rows += self.evaluator.image_rows(index)
        self.notify("phase_evaluated", index, time.perf_counter() - started)
        started = time.perf_counter()
        with interrupts_held():  # Ctrl-C waits until every file of the phase is written
            self.notify("phase_finished", index)
            self.finished = index + 1
        self.notify("phase_kept", index, time.perf_counter() - started)

    def _training_images(self, task: TaskSamples) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The task's training images and structure label maps on the device (all epochs use them: no per-step host
        transfers), and its held-out normal images (thresholds, --epoch_selection) or None."""
        geometry, workers, device = self.configs.model.geometry, self.configs.data.num_workers, self.model.device
        with self.timer.phase("image_loading", len(task.train)):
            train_images = load_images(task.train, geometry, workers, description=f"[{task.category}] decode train")
            label_maps = load_label_maps(task, self.structure_root, geometry) if self.structure_root else None
        if train_images.shape[0] == 0:
            raise UcadError(f"task '{task.category}' has an empty training set")
        validation_images = None
        if task.validation:
            with self.timer.phase("image_loading", len(task.validation)):
                validation_images = load_images(task.validation, geometry, workers,
                                                description=f"[{task.category}] decode held-out")
        return train_images.to(device), label_maps.to(device) if label_maps is not None else None, validation_images

    def interrupted_message(self) -> str:
        if self.run_dir is None or self.finished == 0:
            return "interrupted before the first task finished, nothing was kept: rerun the same command to start again"
        if self.finished == len(self.tasks):
            return f"interrupted after the last task; the results are in '{self.run_dir}'"
        return (f"interrupted after {self.finished} of {len(self.tasks)} task(s), kept in '{self.run_dir}': rerun the "
                f"same command with --resume to continue with task {self.finished + 1}")
