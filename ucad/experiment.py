"""The continual experiment: tasks one after another, evaluation of all seen tasks after each, results
and a checkpoint written as each task finishes (so a crash in task 7 keeps tasks 1-6 and --resume
continues from there)."""
from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ucad.coreset import CoresetSampler
from ucad.data_check import check_data
from ucad.datasets import TaskSamples, list_tasks
from ucad.device import select_device
from ucad.errors import RunInterrupted, UcadError
from ucad.evaluation import VARIANTS, ContinualEvaluator, TestSet
from ucad.images import ImageGeometry, load_images, load_label_map, load_masks
from ucad.learner import LearningConfig, learn_task
from ucad.model import ModelConfig, UcadModel
from ucad.nearest_neighbor import NearestNeighbourScorer
from ucad.results import check_results_path, final_table, interrupts_held, latest_run_dir, new_run_dir, \
    remove_temporary_files, summarize, write_csv, write_heatmap, write_json, write_matrices
from ucad.structure_maps import default_structure_root, load_structure_map, structure_map_path
from ucad.timing import PhaseTimer
from ucad.visualize import save_segmentation_images

CHECKPOINT = "checkpoint.pt"
# options that must agree for --resume to continue a run instead of mixing two experiments
RESUME_KEYS = ("seed", "model", "learning", "sampler", "dataset_name", "data_path", "categories", "geometry")
# ... except these, which change how fast or in how much memory a run goes, not its results (a run that ran out
# of memory must be resumable with a smaller --feature_batch_size)
RESUME_FREE = ("learning.feature_batch_size",)
# the command-line spelling of config entries whose option is not simply --<last part of the name>
OPTION_NAMES = {
    "model.backbone": "-b/--backbone_names", "model.layers": "-le/--layers_to_extract_from",
    "learning.train_prompt": "--no_scl", "learning.batch_size": "dataset --batch_size",
    "sampler.name": "sampler NAME", "sampler.percentage": "sampler -p/--percentage",
    "dataset_name": "dataset NAME", "data_path": "DATA_PATH of the dataset sub-command",
    "categories": "-d/--subdatasets",
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def echo(message: str = "") -> None:
    print(message, flush=True)


def structure_root_for(config: dict) -> Path:
    return Path(config["structure_path"]) if config.get("structure_path") else default_structure_root(config["data_path"])


def load_label_maps(task: TaskSamples, structure_root: Path, geometry: ImageGeometry) -> torch.Tensor:
    maps = [load_label_map(load_structure_map(structure_map_path(s.image_path, task.root, structure_root)), geometry)
            for s in task.train]
    return torch.from_numpy(np.stack(maps))


def load_test_set(index: int, task: TaskSamples, geometry: ImageGeometry, workers: int) -> TestSet:
    images = load_images(task.test, geometry, workers, description=f"[{task.category}] decode test")
    masks = load_masks(task.test, geometry, workers)
    labels = np.array([int(s.is_anomalous) for s in task.test])
    return TestSet(index, task.category, images, masks, labels, [s.image_path for s in task.test])


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        flat = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def differing_options(saved: dict, current: dict) -> list[str]:
    """'--epochs_num 2 there, 3 now' for each option (of RESUME_KEYS) that differs between two configurations."""
    def comparable(config):
        plain = json.loads(json.dumps({k: config.get(k) for k in RESUME_KEYS}, default=str))
        return {k: v for k, v in _flatten(plain).items() if k not in RESUME_FREE}

    before, now = comparable(saved), comparable(current)
    lines = {}
    for key in sorted(before.keys() | now.keys()):
        if before.get(key) != now.get(key):
            option = OPTION_NAMES.get(key, "--" + key.split(".")[-1])
            lines.setdefault(option, f"{option} {_shown(before.get(key))} there, {_shown(now.get(key))} now")
    return list(lines.values())


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _resume_state(config: dict) -> tuple[Path, dict] | None:
    """The newest run of the log group that has a checkpoint, not just the newest folder."""
    run_dir = latest_run_dir(config["results_path"], config["log_project"], config["log_group"], containing=CHECKPOINT)
    if run_dir is None:
        return None
    try:
        state = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)
    except Exception as error:
        raise UcadError(f"--resume: the checkpoint '{run_dir / CHECKPOINT}' cannot be read ({error}); rerun without "
                        "--resume to start a new run") from None
    differing = differing_options(state["config"], config)
    if differing:
        raise UcadError(f"--resume: the last run in '{run_dir}' was made with other settings ({'; '.join(differing)}); "
                        "rerun with that run's options to continue it, or without --resume to start a new run")
    return run_dir, state


def fidelity_line(model: UcadModel, model_config: ModelConfig, learning: LearningConfig) -> str:
    """The settings where a run can differ from the released code, each marked released / ours (README section
    'Differences from the released code')."""
    released = {"input_norm": "imagenet", "patch_distance": "squared", "scl_features": "raw",
                "label_sampling": "centre"}
    used = {"input_norm": model.extractor.input_norm, "patch_distance": model_config.patch_distance,
            "scl_features": learning.scl_features, "label_sampling": learning.label_sampling}
    return ", ".join(f"--{k} {v} ({'as released' if v == released[k] else 'differs from the released code'})"
                     for k, v in used.items())


def _interrupted_message(run_dir: Path | None, finished: int, total: int) -> str:
    if run_dir is None or finished == 0:
        return "interrupted before the first task finished, nothing was kept: rerun the same command to start again"
    if finished == total:
        return f"interrupted after the last task; the results are in '{run_dir}'"
    return (f"interrupted after {finished} of {total} task(s), kept in '{run_dir}': rerun the same command with "
            f"--resume to continue with task {finished + 1}")


def run_experiment(config: dict) -> Path:
    """config: the merged options of the command line (see ucad.cli). Returns the run folder.

    A new run that stops before its first task finished removes its folder (a failed start keeps nothing, and
    must not pile up folders); Ctrl-C becomes RunInterrupted, whose message says how to continue."""
    progress = {"run_dir": None, "created": False, "finished": 0, "total": 0}
    try:
        return _run_experiment(config, progress)
    except BaseException as error:
        if progress["created"] and progress["finished"] == 0:
            shutil.rmtree(progress["run_dir"], ignore_errors=True)
            progress["run_dir"] = None
        if isinstance(error, KeyboardInterrupt):
            raise RunInterrupted(_interrupted_message(progress["run_dir"], progress["finished"],
                                                      progress["total"])) from None
        raise


def _run_experiment(config: dict, progress: dict) -> Path:
    seed_everything(config["seed"])
    check_results_path(config["results_path"], config["log_project"], config["log_group"])
    device = select_device(config["gpu"], config.get("cpu", False), warn=echo)
    geometry = ImageGeometry(**config["geometry"])
    tasks = list_tasks(config["dataset_name"], config["data_path"], config["categories"],
                       config["train_val_split"], config["seed"])
    progress["total"] = len(tasks)
    model_config = ModelConfig(**config["model"])
    learning = LearningConfig(**config["learning"])
    if model_config.mode == "ucad" and learning.train_prompt:
        structure_root = structure_root_for(config)
    else:
        structure_root = None
    resumed = _resume_state(config) if config.get("resume") else None
    if config.get("resume") and resumed is None:
        echo("note: --resume found no run of this log group with a checkpoint; starting a new one")
    # every file of every task before anything trains: a bad file in the last task must not cost the others
    for message in check_data(tasks, structure_root, config["num_workers"],
                              skip_training_of=len(resumed[1]["model"]["tasks"]) if resumed else 0):
        echo(message)

    # the backbone (and its weights) first: a download failure must not leave an empty run folder behind
    model = UcadModel(model_config, device, config.get("precision", "auto"))
    if resumed:
        run_dir = resumed[0]
        remove_temporary_files(run_dir)  # what a killed write left behind
    else:
        run_dir = new_run_dir(config["results_path"], config["log_project"], config["log_group"])
    progress.update(run_dir=run_dir, created=resumed is None)

    sampler = CoresetSampler(config["sampler"]["name"], config["sampler"]["percentage"], config["seed"])
    scorer = NearestNeighbourScorer(model_config.anomaly_scorer_num_nn, config.get("nn_backend", "auto"), device,
                                    config.get("faiss_on_gpu", False), config.get("faiss_num_workers", 4),
                                    patch_distance=model_config.patch_distance)
    if config.get("faiss_on_gpu") and not scorer.faiss_on_gpu:
        echo("note: --faiss_on_gpu: this faiss has no GPU support or no GPU is visible; "
             f"nearest neighbours use {scorer.describe()}")
    timer = PhaseTimer()
    evaluator = ContinualEvaluator(model, scorer, timer, learning.feature_batch_size, config.get("fpr_limit", 0.3),
                                   reuse=not config.get("reference_evaluation", False))
    task_names = [t.category for t in tasks]
    records: list[dict] = []
    losses: dict[str, list[float]] = {}
    done = 0
    if resumed:
        state = resumed[1]
        model.load_tasks(state["model"])
        records, losses, done = state["records"], state["losses"], len(state["model"]["tasks"])
        timer.merge(_timer_from(state.get("timings", {})))
        progress["finished"] = done
        # a kill between two result files may have left them disagreeing: the checkpoint, written last, decides
        with interrupts_held():
            _write_result_files(run_dir, records, task_names, losses, timer, model)

    echo(f"UCAD run folder: {run_dir}")
    echo(f"device: {device}{' (autocast ' + str(model.amp_dtype).replace('torch.', '') + ')' if model.amp_dtype else ''}")
    backbone_description = model.extractor.describe(prompts=model_config.mode == "ucad")
    echo(f"backbone: {backbone_description}")
    echo(f"mode: {model_config.mode}; patch size {model_config.patchsize}, embedding {model_config.target_embed_dimension}; "
         f"sampler {sampler.name}; nearest neighbours: {scorer.describe()}")
    if model_config.mode == "ucad":
        echo(f"memory: keys {learning.key_size}, knowledge {learning.memory_size}, unlimited {learning.basic_size} "
             f"per task; prompt training: " + (f"{learning.epochs_num} epochs, SCL with structure maps from "
                                              f"{structure_root}" if learning.train_prompt else
                                              "OFF (--no_scl): prompts keep their random initialisation"))
    echo("comparability with the released code: " + fidelity_line(model, model_config, learning))
    echo(f"tasks ({len(tasks)}): {', '.join(task_names)}" + (f"; resuming after task {done}" if done else ""))
    write_json(run_dir / "config.json", {**config, "task_order": task_names, "device": str(device),
                                        "backbone_description": backbone_description,
                                        "input_norm_used": model.extractor.input_norm,
                                        "input_mean": model.extractor.mean, "input_std": model.extractor.std,
                                        "nn": scorer.describe()})

    variants = VARIANTS if model_config.mode == "ucad" else ("task_agnostic", "oracle")
    started = time.perf_counter()
    for index, task in enumerate(tasks):
        with timer.phase("image_loading", len(task.test)):
            evaluator.add_test_set(load_test_set(index, task, geometry, config["num_workers"]))
        if index < done:
            continue
        echo(f"\n== task {index + 1}/{len(tasks)}: {task.category} ({len(task.train)} train, {len(task.test)} test)")
        with timer.phase("image_loading", len(task.train)):
            train_images = load_images(task.train, geometry, config["num_workers"],
                                       description=f"[{task.category}] decode train")
            label_maps = load_label_maps(task, structure_root, geometry) if structure_root else None
        if train_images.shape[0] == 0:
            raise UcadError(f"task '{task.category}' has an empty training set")
        # the whole task lives on the device for all epochs: no per-step host transfers
        train_images = train_images.to(device)
        label_maps = label_maps.to(device) if label_maps is not None else None
        validation_images = None
        if learning.epoch_selection == "validation" and model_config.mode == "ucad" and task.validation:
            with timer.phase("image_loading", len(task.validation)):
                validation_images = load_images(task.validation, geometry, config["num_workers"],
                                                description=f"[{task.category}] decode held-out")
        memory, history = learn_task(model, index, task.category, train_images, label_maps, sampler, learning, timer,
                                     validation_images)
        del train_images, label_maps
        model.tasks.append(memory)
        losses[task.category] = history
        if history:
            echo(f"   prompt loss {history[0]:.4f} -> {history[-1]:.4f} over {len(history)} epochs; prompted features "
                 f"of the training images moved {memory.extra.get('feature_drift', 0.0):.1%} from the frozen ones")
        if "chosen_epoch" in memory.extra:
            chosen = memory.extra["chosen_epoch"]
            echo(f"   epoch chosen on held-out synthetic defects: {chosen if chosen else 'none (frozen features)'} "
                 f"(validation score per epoch, 0 = no prompt: "
                 f"{', '.join(f'{v:.3f}' for v in memory.extra['validation_scores'])})")
        kept = memory.memory_bytes()
        echo(f"   kept for this task: {sum(kept.values()):,} bytes (keys {kept['keys']:,}, prompt {kept['prompt']:,}, "
             f"knowledge {kept['knowledge']:,} as {memory.packed.storage if memory.packed else 'fp32'})")
        phase_records = evaluator.evaluate_phase(index, variants)
        records += phase_records
        with interrupts_held():  # Ctrl-C waits until every file of the phase is written
            _write_result_files(run_dir, records, task_names, losses, timer, model)
            _write_checkpoint(run_dir, records, losses, timer, model, config)
            progress["finished"] = index + 1
        mine = {r["task_index"]: r for r in phase_records if r["variant"] == "task_agnostic"}
        echo(f"   after {task.category}: mean image AUROC {np.mean([r['image_auroc'] for r in mine.values()]):.3f}, "
             f"mean routing accuracy {np.mean([r['routing_accuracy'] for r in mine.values()]):.3f} over {len(mine)} task(s)")

    total = time.perf_counter() - started
    echo("\n" + final_table(records, task_names, model_config.mode))
    echo(f"\nwall time {total:.1f} s; per phase: " + ", ".join(f"{k} {v['seconds']:.1f}s"
                                                             for k, v in timer.as_dict().items()))
    if config.get("save_segmentation_images"):
        count = 0
        for test_set in evaluator.test_sets:
            routes, scores, maps = evaluator.final_maps(test_set, len(tasks) - 1)
            names = [f"{Path(p).parent.name}_{Path(p).stem}" for p in test_set.paths]
            captions = [f"{Path(p).parent.name} -> {task_names[int(r)]}" for p, r in zip(test_set.paths, routes)]
            count += save_segmentation_images(run_dir / "segmentation_images" / test_set.name, test_set.images,
                                              test_set.masks, maps.numpy(), scores.numpy(), names, captions)
        echo(f"segmentation images: {count} in {run_dir / 'segmentation_images'}")
    if config.get("save_patchcore_model"):
        model.save(run_dir / "models" / "ucad_model.pt")
        echo(f"model: {run_dir / 'models' / 'ucad_model.pt'} (score new images: python -m ucad.predict "
             f"{run_dir / 'models' / 'ucad_model.pt'} IMAGE_FOLDER OUTPUT_FOLDER)")
    echo(f"results: {run_dir}")
    sys.stdout.flush()
    return run_dir


def _timer_from(timings: dict) -> PhaseTimer:
    timer = PhaseTimer()
    for name, value in timings.items():
        timer.seconds[name] = value["seconds"]
        timer.items[name] = value["items"]
    return timer


def _write_result_files(run_dir: Path, records, task_names, losses, timer: PhaseTimer, model: UcadModel) -> None:
    write_csv(run_dir / "results_all_phases.csv", records)
    last = max(r["phase"] for r in records)
    write_csv(run_dir / "results_per_task.csv", [r for r in records if r["phase"] == last])
    summary = summarize(records, task_names)
    write_csv(run_dir / "results_mean.csv", summary)
    write_matrices(run_dir, records, task_names)
    write_heatmap(run_dir / "image_auroc_matrix.png", records, task_names)
    write_json(run_dir / "summary.json", {"summary": summary, "losses": losses, "timings": timer.as_dict(),
                                          "memory_bytes_per_task": {t.name: t.memory_bytes() for t in model.tasks},
                                          "feature_drift": {t.name: t.extra.get("feature_drift") for t in model.tasks},
                                          "chosen_epochs": {t.name: t.extra["chosen_epoch"] for t in model.tasks
                                                            if "chosen_epoch" in t.extra},
                                          "tasks_finished": last + 1, "task_order": task_names})
    write_json(run_dir / "timings.json", timer.as_dict())


def _write_checkpoint(run_dir: Path, records, losses, timer: PhaseTimer, model: UcadModel, config) -> None:
    """Written after every other file of the phase: the checkpoint names the finished phase, and --resume
    rewrites the other files from it, so a kill between two files cannot leave a run that disagrees."""
    state = {"config": json.loads(json.dumps(config, default=str)), "model": model.state(), "records": records,
             "losses": losses, "timings": timer.as_dict()}
    temporary = run_dir / (CHECKPOINT + ".tmp")
    try:
        torch.save(state, temporary)
        temporary.replace(run_dir / CHECKPOINT)
    finally:
        temporary.unlink(missing_ok=True)
