"""The continual experiment: tasks one after another, evaluation of all seen tasks after each, results
and a checkpoint written as each task finishes (so a crash in task 7 keeps tasks 1-6 and --resume
continues from there)."""
from __future__ import annotations

import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ucad.config import Configs, LearningConfig, ModelConfig, differing_options
from ucad.coreset import CoresetSampler
from ucad.data_check import check_data
from ucad.datasets import TaskSamples, list_tasks
from ucad.device import select_device
from ucad.errors import RunInterrupted, UcadError
from ucad.evaluation import VARIANTS, ContinualEvaluator, TestSet
from ucad.images import ImageGeometry, load_images, load_label_map, load_masks
from ucad.learner import learn_task
from ucad.model import KNOWLEDGE, UcadModel
from ucad.nearest_neighbor import NearestNeighbourScorer
from ucad.results import check_results_path, final_table, interrupts_held, latest_run_dir, new_run_dir, \
    remove_temporary_files, threshold_table, write_json, write_run_results
from ucad.structure_maps import default_structure_root, load_structure_map, structure_map_path
from ucad.thresholds import calibrate
from ucad.timing import PhaseTimer
from ucad.visualize import save_segmentation_images

CHECKPOINT = "checkpoint.pt"
MODEL_FILE = Path("models") / "ucad_model.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    masks = load_masks(task.test, geometry, workers)
    labels = np.array([int(s.is_anomalous) for s in task.test])
    return TestSet(index, task.category, images, masks, labels, [s.image_path for s in task.test],
                   [s.defect_type for s in task.test])


def _resume_state(configs: Configs) -> tuple[Path, dict] | None:
    """The newest run of the log group that has a checkpoint, not just the newest folder."""
    run = configs.run
    run_dir = latest_run_dir(run.results_path, run.log_project, run.log_group, containing=CHECKPOINT)
    if run_dir is None:
        return None
    try:
        state = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True)
        recorded = state["configs"]
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UcadError(f"--resume: the checkpoint '{run_dir / CHECKPOINT}' cannot be read ({first}); rerun without "
                        "--resume to start a new run") from None
    differing = differing_options(recorded, configs)
    if differing:
        raise UcadError(f"--resume: the last run in '{run_dir}' was made with other settings ({'; '.join(differing)}); "
                        "rerun with that run's options to continue it, or without --resume to start a new run")
    return run_dir, state


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


def _interrupted_message(run_dir: Path | None, finished: int, total: int) -> str:
    if run_dir is None or finished == 0:
        return "interrupted before the first task finished, nothing was kept: rerun the same command to start again"
    if finished == total:
        return f"interrupted after the last task; the results are in '{run_dir}'"
    return (f"interrupted after {finished} of {total} task(s), kept in '{run_dir}': rerun the same command with "
            f"--resume to continue with task {finished + 1}")


def run_experiment(configs: Configs) -> Path:
    """The whole continual run described by the four configurations (see ucad.config). Returns the run folder.

    A new run that stops before its first task finished removes its folder (a failed start keeps nothing, and
    must not pile up folders); Ctrl-C becomes RunInterrupted, whose message says how to continue."""
    progress = {"run_dir": None, "created": False, "finished": 0, "total": 0}
    try:
        return _run_experiment(configs, progress)
    except BaseException as error:
        if progress["created"] and progress["finished"] == 0:
            shutil.rmtree(progress["run_dir"], ignore_errors=True)
            progress["run_dir"] = None
        if isinstance(error, KeyboardInterrupt):
            raise RunInterrupted(_interrupted_message(progress["run_dir"], progress["finished"],
                                                      progress["total"])) from None
        raise


def _run_experiment(configs: Configs, progress: dict) -> Path:
    model_config, learning, data, run = configs.model, configs.learning, configs.data, configs.run
    configs.check()
    seed_everything(learning.seed)
    check_results_path(run.results_path, run.log_project, run.log_group)
    device = select_device(run.gpu, run.cpu, warn=echo)
    geometry = model_config.geometry
    tasks = list_tasks(data.name, data.data_path, list(data.categories), data.train_val_split, learning.seed)
    progress["total"] = len(tasks)
    structure_root = structure_root_for(data) if model_config.mode == "ucad" and learning.train_prompt else None
    resumed = _resume_state(configs) if run.resume else None
    if run.resume and resumed is None:
        echo("note: --resume found no run of this log group with a checkpoint; starting a new one")
    # every file of every task before anything trains: a bad file in the last task must not cost the others
    for message in check_data(tasks, structure_root, data.num_workers,
                              skip_training_of=len(resumed[1]["model"]["tasks"]) if resumed else 0):
        echo(message)

    # the backbone (and its weights) first: a download failure must not leave an empty run folder behind
    scorer = NearestNeighbourScorer(model_config.anomaly_scorer_num_nn, run.nn_backend, device, run.faiss_on_gpu,
                                    run.faiss_num_workers, patch_distance=model_config.patch_distance)
    model = UcadModel(model_config, device, run.precision, scorer=scorer)
    if resumed:
        run_dir = resumed[0]
        remove_temporary_files(run_dir)  # what a killed write left behind
    else:
        run_dir = new_run_dir(run.results_path, run.log_project, run.log_group)
    progress.update(run_dir=run_dir, created=resumed is None)

    sampler = CoresetSampler(learning.sampler, learning.sampler_percentage, learning.seed)
    if run.faiss_on_gpu and not scorer.faiss_on_gpu:
        echo("note: --faiss_on_gpu: this faiss has no GPU support or no GPU is visible; "
             f"nearest neighbours use {scorer.describe()}")
    timer = PhaseTimer()
    evaluator = ContinualEvaluator(model, timer, learning.feature_batch_size, run.fpr_limit,
                                   reuse=not run.reference_evaluation)
    task_names = [t.category for t in tasks]
    records: list[dict] = []
    image_rows: list[dict] = []
    losses: dict[str, list[float]] = {}
    done = 0
    if resumed:
        state = resumed[1]
        model.load_tasks(state["model"])
        records, image_rows, losses = state["records"], state["image_rows"], state["losses"]
        done = len(state["model"]["tasks"])
        timer.merge(_timer_from(state.get("timings", {})))
        progress["finished"] = done
        # a kill between two result files may have left them disagreeing: the checkpoint, written last, decides
        with interrupts_held():
            _write_result_files(run_dir, records, image_rows, task_names, losses, timer, model)

    echo(f"UCAD run folder: {run_dir}")
    echo(f"device: {device}{' (autocast ' + str(model.amp_dtype).replace('torch.', '') + ')' if model.amp_dtype else ''}")
    backbone_description = model.extractor.describe(prompts=model_config.mode == "ucad")
    echo(f"backbone: {backbone_description}")
    echo(f"mode: {model_config.mode}; patch size {model_config.patchsize}, embedding {model_config.target_embed_dimension}; "
         f"patch grid {model.grid[0]}x{model.grid[1]}; sampler {sampler.name}; nearest neighbours: {scorer.describe()}")
    if model_config.mode == "ucad":
        echo(f"memory: keys {learning.key_size}, knowledge {learning.memory_size}, unlimited {learning.basic_size} "
             f"per task; prompt training: " + (f"{learning.epochs_num} epochs, SCL with structure maps from "
                                              f"{structure_root}" if learning.train_prompt else
                                              "OFF (--no_scl): prompts keep their random initialisation"))
    echo("comparability with the released code: " + fidelity_line(model, model_config, learning))
    echo(f"tasks ({len(tasks)}): {', '.join(task_names)}" + (f"; resuming after task {done}" if done else ""))
    if not any(task.validation for task in tasks):
        echo("thresholds: none, since no normal training images are held out (dataset --train_val_split 1.0); "
             "F1 at a threshold is not reported (F1-max is). Hold some out with e.g. --train_val_split 0.9")
    write_json(run_dir / "config.json", {**configs.as_dict(), "task_order": task_names, "device": str(device),
                                        "backbone_description": backbone_description,
                                        "input_norm_used": model.extractor.input_norm,
                                        "input_mean": model.extractor.mean, "input_std": model.extractor.std,
                                        "patch_grid": model.grid, "nn": scorer.describe()})

    variants = VARIANTS if model_config.mode == "ucad" else ("task_agnostic", "oracle")
    started = time.perf_counter()
    for index, task in enumerate(tasks):
        with timer.phase("image_loading", len(task.test)):
            evaluator.add_test_set(load_test_set(index, task, geometry, data.num_workers))
        if index < done:
            continue
        echo(f"\n== task {index + 1}/{len(tasks)}: {task.category} ({len(task.train)} train, "
             f"{len(task.validation)} held out, {len(task.test)} test)")
        with timer.phase("image_loading", len(task.train)):
            train_images = load_images(task.train, geometry, data.num_workers,
                                       description=f"[{task.category}] decode train")
            label_maps = load_label_maps(task, structure_root, geometry) if structure_root else None
        if train_images.shape[0] == 0:
            raise UcadError(f"task '{task.category}' has an empty training set")
        # the whole task lives on the device for all epochs: no per-step host transfers
        train_images = train_images.to(device)
        label_maps = label_maps.to(device) if label_maps is not None else None
        validation_images = None  # the held-out normal images: thresholds, and epochs with --epoch_selection
        if task.validation:
            with timer.phase("image_loading", len(task.validation)):
                validation_images = load_images(task.validation, geometry, data.num_workers,
                                                description=f"[{task.category}] decode held-out")
        memory, history = learn_task(model, index, task.category, train_images, label_maps, sampler, learning, timer,
                                     validation_images)
        del train_images, label_maps
        model.tasks.append(memory)
        losses[task.category] = history
        if history:
            drift = memory.extra.get("feature_drift")
            echo(f"   prompt loss {history[0]:.4f} -> {history[-1]:.4f} over {len(history)} epochs; "
                 + (f"the kept prompt moved the training images' features {drift:.1%} from the frozen ones"
                    if drift is not None else "no prompt kept"))
        if "chosen_epoch" in memory.extra:
            chosen = memory.extra["chosen_epoch"]
            echo(f"   epoch chosen on held-out synthetic defects: {chosen if chosen else 'none (frozen features)'} "
                 f"(validation score per epoch, 0 = no prompt: "
                 f"{', '.join(f'{v:.3f}' for v in memory.extra['validation_scores'])})")
        kept = memory.memory_bytes()
        echo(f"   kept for this task: {sum(kept.values()):,} bytes (keys {kept['keys']:,}, prompt {kept['prompt']:,}, "
             f"knowledge {kept['knowledge']:,} as {memory.packed.storage if memory.packed else 'fp32'})")
        if validation_images is not None:
            _set_thresholds(model, index, validation_images, learning, timer)
        del validation_images
        phase_records = evaluator.evaluate_phase(index, variants)
        records += phase_records
        image_rows += evaluator.image_rows(index, variants)
        with interrupts_held():  # Ctrl-C waits until every file of the phase is written
            _write_result_files(run_dir, records, image_rows, task_names, losses, timer, model)
            _write_checkpoint(run_dir, records, image_rows, losses, timer, model, configs)
            progress["finished"] = index + 1
        mine = {r["task_index"]: r for r in phase_records if r["variant"] == "task_agnostic"}
        echo(f"   after {task.category}: mean image AUROC {np.mean([r['image_auroc'] for r in mine.values()]):.3f}, "
             f"mean routing accuracy {np.mean([r['routing_accuracy'] for r in mine.values()]):.3f} over {len(mine)} task(s)")

    total = time.perf_counter() - started
    echo("\n" + final_table(records, task_names, model_config.mode))
    thresholds = {t.name: t.thresholds.get(KNOWLEDGE) for t in model.tasks}
    if any(thresholds.values()):
        echo("\n" + threshold_table(records, thresholds))
    echo(f"\nwall time {total:.1f} s; per phase: " + ", ".join(f"{k} {v['seconds']:.1f}s"
                                                             for k, v in timer.as_dict().items()))
    save_final_outputs(evaluator, run_dir, len(tasks) - 1, run.save_segmentation_images, run.save_anomaly_maps)
    if run.save_patchcore_model:
        model.save(run_dir / MODEL_FILE, {**configs.as_dict(), "task_order": task_names}, full=run.save_full_model)
        echo(f"model: {run_dir / MODEL_FILE} (score new images: python -m ucad.predict "
             f"{run_dir / MODEL_FILE} IMAGE_FOLDER OUTPUT_FOLDER)")
    echo(f"results: {run_dir}")
    sys.stdout.flush()
    return run_dir


def _set_thresholds(model: UcadModel, index: int, normal_images: torch.Tensor, learning: LearningConfig,
                    timer: PhaseTimer) -> None:
    """The task's thresholds from its held-out normal images, scored as that task (its prompt and knowledge)."""
    with timer.phase("thresholds", normal_images.shape[0]):
        model.tasks[index].thresholds = calibrate(model, index, normal_images, learning.threshold_quantile,
                                                  learning.feature_batch_size)
    chosen = model.tasks[index].thresholds[KNOWLEDGE]
    echo(f"   thresholds from {chosen.images} held-out normal image(s), quantile {chosen.quantile:g}: "
         f"image {chosen.image:.5g}, pixel {chosen.pixel:.5g}")


def save_final_outputs(evaluator: ContinualEvaluator, run_dir: Path, phase: int, pictures: bool, maps: bool) -> None:
    """Pictures (image | ground truth | map) and .npy anomaly maps of every test image, task-agnostic variant."""
    if not (pictures or maps):
        return
    task_names = [t.name for t in evaluator.model.tasks]
    count = 0
    for test_set in evaluator.test_sets:
        routes, scores, anomaly_maps = evaluator.task_agnostic_scoring(test_set, phase)
        names = [f"{Path(p).parent.name}_{Path(p).stem}" for p in test_set.paths]
        if pictures:
            captions = [f"{Path(p).parent.name} -> {task_names[int(r)]}" for p, r in zip(test_set.paths, routes)]
            save_segmentation_images(run_dir / "segmentation_images" / test_set.name, test_set.images,
                                     test_set.masks, anomaly_maps.numpy(), scores.numpy(), names, captions)
        if maps:
            folder = run_dir / "anomaly_maps" / test_set.name
            folder.mkdir(parents=True, exist_ok=True)
            for name, anomaly_map in zip(names, anomaly_maps.numpy()):
                np.save(folder / f"{name}.npy", anomaly_map.astype(np.float32))
        count += len(names)
    if pictures:
        echo(f"segmentation images: {count} in {run_dir / 'segmentation_images'}")
    if maps:
        echo(f"anomaly maps (.npy): {count} in {run_dir / 'anomaly_maps'}")


def _timer_from(timings: dict) -> PhaseTimer:
    timer = PhaseTimer()
    for name, value in timings.items():
        timer.seconds[name] = value["seconds"]
        timer.items[name] = value["items"]
    return timer


def _write_result_files(run_dir: Path, records, image_rows, task_names, losses, timer: PhaseTimer,
                       model: UcadModel) -> None:
    write_run_results(run_dir, records, image_rows, task_names, {
        "losses": losses, "timings": timer.as_dict(),
        "memory_bytes_per_task": {t.name: t.memory_bytes() for t in model.tasks},
        "feature_drift": {t.name: t.extra.get("feature_drift") for t in model.tasks},
        "chosen_epochs": {t.name: t.extra["chosen_epoch"] for t in model.tasks if "chosen_epoch" in t.extra}})
    write_json(run_dir / "timings.json", timer.as_dict())


def _write_checkpoint(run_dir: Path, records, image_rows, losses, timer: PhaseTimer, model: UcadModel,
                      configs: Configs) -> None:
    """Written after every other file of the phase: the checkpoint names the finished phase, and --resume
    rewrites the other files from it, so a kill between two files cannot leave a run that disagrees."""
    state = {"configs": configs.as_dict(), "model": model.state(), "records": records, "image_rows": image_rows,
             "losses": losses, "timings": timer.as_dict()}
    temporary = run_dir / (CHECKPOINT + ".tmp")
    try:
        torch.save(state, temporary)
        temporary.replace(run_dir / CHECKPOINT)
    finally:
        temporary.unlink(missing_ok=True)
