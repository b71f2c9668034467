"""The continual experiment: tasks one after another, evaluation of all seen tasks after each, results and a
checkpoint written as each task finishes (so a crash in task 7 keeps tasks 1-6 and --resume continues from there).
`RunHooks` lets an instrument observe a run without touching its internals."""
from __future__ import annotations

import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ucad import __version__
from ucad.config import Configs, LearningConfig, ModelConfig, differing_options
from ucad.model.coreset import CoresetSampler
from ucad.data.check import check_data
from ucad.data.layouts import TaskSamples, list_tasks, output_name
from ucad.runtime.device import select_device
from ucad.runtime.errors import RunInterrupted, UcadError
from ucad.continual.evaluator import ContinualEvaluator, TestSet
from ucad.data.decode import ImageGeometry, load_images, load_label_map, load_masks
from ucad.learning.task import learn_task
from ucad.model.task_memory import TaskMemory
from ucad.model.ucad_model import KNOWLEDGE, UcadModel
from ucad.persistence.model_file import restore_tasks, save_model, tasks_state
from ucad.model.nearest_neighbor import NearestNeighbourScorer
from ucad.results.tables import final_tables, write_json, write_run_results
from ucad.persistence.run_folder import atomic_write, check_results_path, interrupts_held, latest_run_dir, new_run_dir, \
    remove_temporary_files
from ucad.data.structure_maps import default_structure_root, load_structure_map, structure_map_path
from ucad.learning.thresholds import calibrate
from ucad.runtime.timing import PhaseTimer
from ucad.results.pictures import save_segmentation_images

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_TASKS = "checkpoint_tasks"  # one file per learned task, written once: checkpoint.pt names them
MODEL_FILE = Path("models") / "ucad_model.pt"


class RunHooks:
    """Points of a run that an instrument (e.g. benchmarks/benchmark.py) may observe; each does nothing here."""

    def task_learned(self, index: int, memory: TaskMemory, seconds: float) -> None:
        """After task `index` was learned (before its thresholds and the evaluation)."""

    def phase_evaluated(self, index: int, evaluator: ContinualEvaluator, seconds: float) -> None:
        """After every seen task was evaluated following task `index`."""

    def phase_written(self, index: int, run_dir: Path, seconds: float) -> None:
        """After the result files and the checkpoint of phase `index` were written."""


def echo(message: str = "") -> None:
    print(message, flush=True)


def structure_root_for(data) -> Path:
    return Path(data.structure_path) if data.structure_path else default_structure_root(data.data_path)


def load_label_maps(task: TaskSamples, structure_root: Path, geometry: ImageGeometry) -> torch.Tensor:
    maps = [load_label_map(load_structure_map(structure_map_path(s.image_path, task.root, structure_root)), geometry)
            for s in task.train]
    return torch.from_numpy(np.stack(maps))


def load_test_set(index: int, task: TaskSamples, geometry: ImageGeometry, workers: int) -> TestSet:
    images = load_images(task.test, geometry, workers, description=f"[{task.category}] decode test")
    return TestSet(index, task.category, images, load_masks(task.test, geometry, workers),
                   np.array([int(s.is_anomalous) for s in task.test]), [s.image_path for s in task.test],
                   [s.defect_type for s in task.test])


def fidelity_line(model: UcadModel, model_config: ModelConfig, learning: LearningConfig) -> str:
    """The settings where a run can differ from the released code, each marked released / ours (README section
    'Differences from the released code')."""
    released = {"input_norm": "imagenet", "patch_distance": "squared", "scl_features": "raw",
                "label_sampling": "centre", "precision": "fp32"}
    used = {"input_norm": model.extractor.input_norm, "patch_distance": model_config.patch_distance,
            "scl_features": learning.scl_features, "label_sampling": learning.label_sampling,
            "precision": "fp32" if model.amp_dtype is None else str(model.amp_dtype).replace("torch.", "")}
    return ", ".join(f"--{k} {v} ({'as released' if v == released[k] else 'differs from the released code'})"
                     for k, v in used.items())


def run_experiment(configs: Configs, hooks: RunHooks | None = None) -> Path:
    """The whole continual run described by the four configurations (see ucad.config). Returns the run folder.

    A new run that stops before its first task finished removes its folder (a failed start keeps nothing, and
    must not pile up folders); Ctrl-C becomes RunInterrupted, whose message says how to continue."""
    run = ContinualRun(configs, hooks or RunHooks())
    try:
        run.set_up()
        for index in range(len(run.tasks)):
            run.learn(index)
        run.report()
        return run.run_dir
    except BaseException as error:
        if run.created and run.finished == 0:
            shutil.rmtree(run.run_dir, ignore_errors=True)
            run.run_dir = None
        if isinstance(error, KeyboardInterrupt):
            raise RunInterrupted(run.interrupted_message()) from None
        raise


class ContinualRun:
    def __init__(self, configs: Configs, hooks: RunHooks):
        self.configs, self.hooks = configs, hooks
        self.run_dir: Path | None = None
        self.created = False  # this run made its folder (a resumed one did not)
        self.finished = 0  # tasks learned, evaluated and written
        self.tasks: list[TaskSamples] = []
        self.records: list[dict] = []
        self.image_rows: list[dict] = []
        self.losses: dict[str, list[float]] = {}
        self.timer = PhaseTimer()
        self.started = time.perf_counter()

    def set_up(self) -> None:
        configs = self.configs
        model_config, learning, data, run = configs.model, configs.learning, configs.data, configs.run
        configs.check()
        random.seed(learning.seed)
        np.random.seed(learning.seed)
        torch.manual_seed(learning.seed)
        check_results_path(run.results_path, run.log_project, run.log_group)
        device = select_device(run.gpu, run.cpu, warn=echo)
        self.tasks = list_tasks(data.name, data.data_path, list(data.categories), data.train_val_split, learning.seed)
        self.structure_root = structure_root_for(data) if model_config.learns_prompts and learning.train_prompt \
            else None
        resumed = self._resume_state() if run.resume else None
        if run.resume and resumed is None:
            echo("note: --resume found no run of this log group with a checkpoint; starting a new one")
        # every file of every task before anything trains: a bad file in the last task must not cost the others
        for message in check_data(self.tasks, self.structure_root, data.num_workers,
                                  skip_training_of=len(resumed[1]["model"]["tasks"]) if resumed else 0):
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
            restore_tasks(self.model, state["model"])
            self.records, self.image_rows, self.losses = state["records"], state["image_rows"], state["losses"]
            self.finished = len(state["model"]["tasks"])
            self.timer.load(state.get("timings", {}))
            # a kill between two result files may have left them disagreeing: the checkpoint, written last, decides
            with interrupts_held():
                self._write_result_files()
        else:
            self.run_dir = new_run_dir(run.results_path, run.log_project, run.log_group)
            self.created = True
        self._announce(device)
        self.started = time.perf_counter()

    def _resume_state(self) -> tuple[Path, dict] | None:
        """The newest run of the log group that has a checkpoint, not just the newest folder."""
        run = self.configs.run
        run_dir = latest_run_dir(run.results_path, run.log_project, run.log_group, containing=CHECKPOINT)
        if run_dir is None:
            return None
        try:
            state = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True)
            recorded = state["configs"]
            state["model"]["tasks"] = [torch.load(run_dir / CHECKPOINT_TASKS / name, map_location="cpu",
                                                  weights_only=True) for name in state["task_files"]]
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UcadError(f"--resume: the checkpoint '{run_dir / CHECKPOINT}' cannot be read ({first}); rerun "
                            "without --resume to start a new run") from None
        if differing := differing_options(recorded, self.configs):
            raise UcadError(f"--resume: the last run in '{run_dir}' was made with other settings "
                            f"({'; '.join(differing)}); rerun with that run's options to continue it, or without "
                            "--resume to start a new run")
        return run_dir, state

    def _announce(self, device: torch.device) -> None:
        """What the run is about to do, and config.json."""
        model, scorer, model_config, learning = self.model, self.scorer, self.configs.model, self.configs.learning
        names = [t.category for t in self.tasks]
        echo(f"UCAD run folder: {self.run_dir}")
        autocast = f" (autocast {str(model.amp_dtype).replace('torch.', '')})" if model.amp_dtype else ""
        echo(f"device: {device}{autocast}")
        backbone_description = model.extractor.describe(prompts=model_config.learns_prompts)
        echo(f"backbone: {backbone_description}")
        echo(f"mode: {model_config.mode}; patch size {model_config.patchsize}, embedding "
             f"{model_config.target_embed_dimension}; patch grid {model.grid[0]}x{model.grid[1]}; sampler "
             f"{self.sampler.name}; nearest neighbours: {scorer.describe()}")
        if model_config.learns_prompts:
            training = (f"{learning.epochs_num} epochs, SCL with structure maps from {self.structure_root}"
                        if learning.train_prompt else "OFF (--no_scl): prompts keep their random initialisation")
            echo(f"memory: keys {learning.key_size} ({learning.key_storage}), knowledge {learning.memory_size}, "
                 f"unlimited {learning.basic_size} per task; prompt training: {training}")
        echo("comparability with the released code: " + fidelity_line(model, model_config, learning))
        echo(f"tasks ({len(self.tasks)}): {', '.join(names)}"
             + (f"; resuming after task {self.finished}" if self.finished else ""))
        if not any(task.validation for task in self.tasks):
            echo("thresholds: none, since no normal training images are held out (dataset --train_val_split 1.0); "
                 "F1 at a threshold is not reported (F1-max is). Hold some out with e.g. --train_val_split 0.9")
        write_json(self.run_dir / "config.json", {
            "version": __version__, **self.configs.as_dict(), "task_order": names, "device": str(device),
            "backbone_description": backbone_description, "input_norm_used": model.extractor.input_norm,
            "input_mean": model.extractor.mean, "input_std": model.extractor.std, "patch_grid": model.grid,
            "nn": scorer.describe()})

    def learn(self, index: int) -> None:
        """Task `index`: its test set joins the evaluation; unless a resumed run already has it, it is learned,
        its thresholds are set, every seen task is evaluated and the phase's files are written."""
        task, data, geometry = self.tasks[index], self.configs.data, self.configs.model.geometry
        with self.timer.phase("image_loading", len(task.test)):
            self.evaluator.add_test_set(load_test_set(index, task, geometry, data.num_workers))
        if index < self.finished:
            return
        echo(f"\n== task {index + 1}/{len(self.tasks)}: {task.category} ({len(task.train)} train, "
             f"{len(task.validation)} held out, {len(task.test)} test)")
        with self.timer.phase("image_loading", len(task.train)):
            train_images = load_images(task.train, geometry, data.num_workers,
                                       description=f"[{task.category}] decode train")
            label_maps = load_label_maps(task, self.structure_root, geometry) if self.structure_root else None
        if train_images.shape[0] == 0:
            raise UcadError(f"task '{task.category}' has an empty training set")
        # the whole task lives on the device for all epochs: no per-step host transfers
        train_images = train_images.to(self.model.device)
        label_maps = label_maps.to(self.model.device) if label_maps is not None else None
        validation_images = None  # the held-out normal images: thresholds, and epochs with --epoch_selection
        if task.validation:
            with self.timer.phase("image_loading", len(task.validation)):
                validation_images = load_images(task.validation, geometry, data.num_workers,
                                                description=f"[{task.category}] decode held-out")
        started = time.perf_counter()
        memory, history = learn_task(self.model, index, task.category, train_images, label_maps, self.sampler,
                                     self.configs.learning, self.timer, validation_images)
        self.hooks.task_learned(index, memory, time.perf_counter() - started)
        del train_images, label_maps
        self.model.tasks.append(memory)
        self.losses[task.category] = history
        self._describe_task(memory, history)
        if validation_images is not None:
            self._set_thresholds(index, validation_images)
        del validation_images

        started = time.perf_counter()
        phase_records = self.evaluator.evaluate_phase(index)
        self.records += phase_records
        self.image_rows += self.evaluator.image_rows(index)
        self.hooks.phase_evaluated(index, self.evaluator, time.perf_counter() - started)
        started = time.perf_counter()
        with interrupts_held():  # Ctrl-C waits until every file of the phase is written
            self._write_result_files()
            self._write_checkpoint()
            self.finished = index + 1
        self.hooks.phase_written(index, self.run_dir, time.perf_counter() - started)
        mine = [r for r in phase_records if r["variant"] == "task_agnostic"]
        aurocs = [r["image_auroc"] for r in mine if not np.isnan(r["image_auroc"])]  # nan: one class only
        auroc = f"{np.mean(aurocs):.3f}" if aurocs else "-"
        over = "" if len(aurocs) == len(mine) else f" (over the {len(aurocs)} task(s) whose test set has both classes)"
        echo(f"   after {task.category}: mean image AUROC {auroc}{over}, "
             f"mean routing accuracy {np.mean([r['routing_accuracy'] for r in mine]):.3f} over {len(mine)} task(s)")

    def _describe_task(self, memory: TaskMemory, history: list[float]) -> None:
        if history:
            drift = memory.extra.get("feature_drift")
            echo(f"   prompt loss {history[0]:.4f} -> {history[-1]:.4f} over {len(history)} epochs; "
                 + (f"the kept prompt moved the training images' features {drift:.1%} from the frozen ones"
                    if drift is not None else "no prompt kept"))
        if "chosen_epoch" in memory.extra:
            chosen = memory.extra["chosen_epoch"]
            echo(f"   epoch chosen on held-out synthetic defects: {chosen or 'none (frozen features)'} "
                 f"(validation score per epoch, 0 = no prompt: "
                 f"{', '.join(f'{v:.3f}' for v in memory.extra['validation_scores'])})")
        kept = memory.memory_bytes()
        keys = memory.packed_keys.storage if memory.packed_keys else "fp32"
        echo(f"   kept for this task: {sum(kept.values()):,} bytes (keys {kept['keys']:,} as {keys}, "
             f"prompt {kept['prompt']:,}, "
             f"knowledge {kept['knowledge']:,} as {memory.packed.storage if memory.packed else 'fp32'})")

    def _set_thresholds(self, index: int, normal_images: torch.Tensor) -> None:
        """The task's thresholds from its held-out normal images, scored as that task (its prompt and knowledge)."""
        learning = self.configs.learning
        with self.timer.phase("thresholds", normal_images.shape[0]):
            self.model.tasks[index].thresholds = calibrate(self.model, index, normal_images,
                                                           learning.threshold_quantile, learning.feature_batch_size)
        chosen = self.model.tasks[index].thresholds[KNOWLEDGE]
        echo(f"   thresholds from {chosen.images} held-out normal image(s), quantile {chosen.quantile:g}: "
             f"image {chosen.image:.5g}, pixel {chosen.pixel:.5g}")

    def _write_result_files(self) -> None:
        tasks = self.model.tasks
        write_run_results(self.run_dir, self.records, self.image_rows, [t.category for t in self.tasks], {
            "losses": self.losses, "timings": self.timer.as_dict(),
            "memory_bytes_per_task": {t.name: t.memory_bytes() for t in tasks},
            "feature_drift": {t.name: t.extra.get("feature_drift") for t in tasks},
            "chosen_epochs": {t.name: t.extra["chosen_epoch"] for t in tasks if "chosen_epoch" in t.extra}})
        write_json(self.run_dir / "timings.json", self.timer.as_dict())

    def _write_checkpoint(self) -> None:
        """Written after every other file of the phase: the checkpoint names the finished phase, and --resume
        rewrites the other files from it, so a kill between two files cannot leave a run that disagrees. A task's
        learned state is written once, to its own file, so a phase writes as much as one task holds."""
        model_state = tasks_state(self.model)
        names = [f"task_{index:03d}.pt" for index in range(len(self.model.tasks))]
        (self.run_dir / CHECKPOINT_TASKS).mkdir(exist_ok=True)
        for index, (name, task) in enumerate(zip(names, model_state.pop("tasks"))):
            # the newest task always: a file left by a run killed before its checkpoint may hold an older try
            if index == len(names) - 1 or not (self.run_dir / CHECKPOINT_TASKS / name).is_file():
                with atomic_write(self.run_dir / CHECKPOINT_TASKS / name) as temporary:
                    torch.save(task, temporary)
        state = {"configs": self.configs.as_dict(), "model": model_state, "task_files": names,
                 "records": self.records, "image_rows": self.image_rows, "losses": self.losses,
                 "timings": self.timer.as_dict()}
        with atomic_write(self.run_dir / CHECKPOINT) as temporary:
            torch.save(state, temporary)

    def report(self) -> None:
        """The final tables, pictures and maps, and the saved model."""
        run, names = self.configs.run, [t.category for t in self.tasks]
        total = time.perf_counter() - self.started
        echo("\n" + final_tables(self.records, names, self.configs.model.mode,
                                 {t.name: t.thresholds.get(KNOWLEDGE) for t in self.model.tasks}))
        echo(f"\nwall time {total:.1f} s; per phase: " + ", ".join(f"{k} {v['seconds']:.1f}s"
                                                                 for k, v in self.timer.as_dict().items()))
        save_final_outputs(self.evaluator, self.run_dir, len(self.tasks) - 1, run.save_segmentation_images,
                           run.save_anomaly_maps)
        if run.save_patchcore_model:
            path = self.run_dir / MODEL_FILE
            save_model(self.model, path, {**self.configs.as_dict(), "task_order": names}, full=run.save_full_model)
            echo(f"model: {path} (score new images: python -m ucad.predict {path} IMAGE_FOLDER OUTPUT_FOLDER)")
        echo(f"results: {self.run_dir}")
        sys.stdout.flush()

    def interrupted_message(self) -> str:
        if self.run_dir is None or self.finished == 0:
            return "interrupted before the first task finished, nothing was kept: rerun the same command to start again"
        if self.finished == len(self.tasks):
            return f"interrupted after the last task; the results are in '{self.run_dir}'"
        return (f"interrupted after {self.finished} of {len(self.tasks)} task(s), kept in '{self.run_dir}': rerun the "
                f"same command with --resume to continue with task {self.finished + 1}")


def save_final_outputs(evaluator: ContinualEvaluator, run_dir: Path, phase: int, pictures: bool, maps: bool) -> None:
    """Pictures (image | ground truth | map) and .npy anomaly maps of every test image, task-agnostic variant."""
    if not (pictures or maps):
        return
    task_names = [t.name for t in evaluator.model.tasks]
    for test_set in evaluator.test_sets:
        scored = evaluator.task_agnostic_scoring(test_set, phase)
        anomaly_maps = scored.anomaly_maps.numpy()
        names = [output_name(Path(p)) for p in test_set.paths]
        if pictures:
            captions = [f"{Path(p).parent.name} -> {task_names[int(r)]}"
                        for p, r in zip(test_set.paths, scored.routed_task)]
            save_segmentation_images(run_dir / "segmentation_images" / test_set.name, test_set.images,
                                     test_set.masks, anomaly_maps, scored.image_scores.numpy(), names, captions)
        if maps:
            folder = run_dir / "anomaly_maps" / test_set.name
            folder.mkdir(parents=True, exist_ok=True)
            for name, anomaly_map in zip(names, anomaly_maps):
                np.save(folder / f"{name}.npy", anomaly_map.astype(np.float32))
    count = sum(len(test_set.paths) for test_set in evaluator.test_sets)
    if pictures:
        echo(f"segmentation images: {count} in {run_dir / 'segmentation_images'}")
    if maps:
        echo(f"anomaly maps (.npy): {count} in {run_dir / 'anomaly_maps'}")
