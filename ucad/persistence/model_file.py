"""The one stored format of what a run learned (FORMAT, FORMAT_VERSION), model files and checkpoints alike: a header
(format, version, content, the model's configuration and patch grid) and the tasks as `TaskMemory.to_state` gives
them; tensors and plain values, so that `torch.load(weights_only=True)` reads them without network or weight packages.
A model file adds the backbone's weights (safetensors) and the run's configuration; a checkpoint adds what the run
computed so far, and keeps each task in a file of its own, written once: a phase writes as much as one task holds."""
from __future__ import annotations

from pathlib import Path

import torch

from ucad.config import ModelConfig, RunConfig, from_dict, to_dict
from ucad.model.backbones import FeatureExtractor
from ucad.model.nearest_neighbor import NearestNeighbourScorer
from ucad.model.task_memory import TaskMemory
from ucad.model.ucad_model import UcadModel
from ucad.persistence.run_folder import atomic_write
from ucad.runtime.errors import UcadError

FORMAT, FORMAT_VERSION = "ucad", 3
# the marks of format 2, whose header and tasks FORMAT keeps as they are, so that its files are read as they are
EARLIER_FORMATS = {"model": ("ucad-model", 2), "checkpoint": (None, 2)}
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_TASKS = "checkpoint_tasks"  # one file per learned task, written once: checkpoint.pt names them


def save_model(model: UcadModel, path: Path, run_configuration: dict | None = None, full: bool = False) -> None:
    """One self-contained file: backbone weights (safetensors), tasks, thresholds, configuration; without `full`,
    not what scoring never uses (the unlimited knowledge, the backbone after the deepest extracted layer)."""
    from safetensors.torch import save as safetensors_bytes

    extractor = model.extractor
    weights = extractor.model.state_dict() if full else extractor.scoring_state_dict(model.config.imagesize)
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, {**_header(model, "model"), "tasks": [task.to_state(scoring_only=not full) for task in model.tasks],
                 "backbone": {"safetensors": safetensors_bytes(weights), "complete": full,
                              "input_norm": extractor.input_norm, "mean": list(extractor.mean),
                              "std": list(extractor.std), "source": extractor.weights_description},
                 "run_configuration": run_configuration or {}})


def load_model(path: Path, device: torch.device, weights: str | None = None, precision: str | None = None) -> UcadModel:
    """A model written by `save_model`, with the nearest-neighbour settings of the run that made it. The backbone is
    built without pretrained weights (no hub, no package) and given the stored ones, or those `weights` names; without
    `precision`, the arithmetic the model was trained with (its thresholds were computed with it)."""
    path = Path(path)
    if path.is_dir():
        raise UcadError(f"'{path}' is a folder; give the model file inside it (models/ucad_model.pt of a run "
                        "saved with --save_patchcore_model)")
    if not path.is_file():
        raise UcadError(f"model file '{path}' does not exist (it is written by --save_patchcore_model)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UcadError(f"cannot read model file '{path}' ({_first_line(error)}); models saved before format "
                        f"{EARLIER_FORMATS['model'][1]} need the run again with --save_patchcore_model") from None
    if not (isinstance(state, dict) and _readable(state, "model")):
        raise UcadError(f"'{path}' is not a UCAD model file (written by --save_patchcore_model, format "
                        f"{FORMAT} {FORMAT_VERSION} or earlier); rerun the experiment to save one")
    config = from_dict(ModelConfig, state["config"])
    config.weights = "random" if weights is None else weights  # "random": the architecture, its weights from the file
    extractor = _stored_extractor(config, state["backbone"], path) if weights is None else None
    run = from_dict(RunConfig, {"results_path": "", **state.get("run_configuration", {}).get("run", {})})
    scorer = NearestNeighbourScorer(config.anomaly_scorer_num_nn, run.nn_backend, device, run.faiss_on_gpu,
                                    run.faiss_num_workers, patch_distance=config.patch_distance)
    model = UcadModel(config, device, precision or run.precision, extractor, scorer)
    if tuple(state["grid"]) != model.grid:
        raise UcadError(f"model file '{path}': stored patch grid {tuple(state['grid'])} differs from the "
                        f"rebuilt backbone's {model.grid}")
    model.tasks = [TaskMemory.from_state(task, device) for task in state["tasks"]]
    model.run_configuration = state.get("run_configuration", {})
    return model


def write_checkpoint(run_dir: Path, model: UcadModel, progress: dict) -> None:
    """The checkpoint of a run whose learned tasks are `model.tasks`; `progress` (plain values) is what else the run
    keeps, and comes back from `read_checkpoint`. Each task's file is written once; checkpoint.pt, which names them,
    is written last, so it only ever names complete files."""
    names = [f"task_{index:03d}.pt" for index in range(len(model.tasks))]
    (run_dir / CHECKPOINT_TASKS).mkdir(exist_ok=True)
    for index, (name, task) in enumerate(zip(names, model.tasks)):
        # the newest task always: a file left by a run killed before its checkpoint may hold an older try
        if index == len(names) - 1 or not (run_dir / CHECKPOINT_TASKS / name).is_file():
            _save(run_dir / CHECKPOINT_TASKS / name, task.to_state())
    _save(run_dir / CHECKPOINT, {**_header(model, "checkpoint"), "task_files": names, **progress})


def read_checkpoint(run_dir: Path) -> dict:
    """The progress `write_checkpoint` was given, with "tasks": the stored form of each learned task."""
    path = run_dir / CHECKPOINT
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {**state.pop("model", {}), **state}  # a checkpoint of format 2 holds its header under "model"
        if not _readable(state, "checkpoint"):
            raise ValueError(f"format {state.get('format')} {state.get('format_version')} is not "
                             f"{FORMAT} {FORMAT_VERSION}")
        state["tasks"] = [torch.load(run_dir / CHECKPOINT_TASKS / name, map_location="cpu", weights_only=True)
                          for name in state["task_files"]]
    except Exception as error:
        raise UcadError(f"--resume: the checkpoint '{path}' cannot be read ({_first_line(error)}); rerun without "
                        "--resume to start a new run") from None
    return state


def _header(model: UcadModel, content: str) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "content": content, "config": to_dict(model.config),
            "grid": list(model.grid)}


def _readable(state: dict, content: str) -> bool:
    marks = (state.get("format"), state.get("format_version"))
    return (marks == (FORMAT, FORMAT_VERSION) and state.get("content") == content) or marks == EARLIER_FORMATS[content]


def _save(path: Path, state: dict) -> None:
    with atomic_write(path) as temporary:
        torch.save(state, temporary)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _stored_extractor(config: ModelConfig, stored: dict, path: Path) -> FeatureExtractor:
    from safetensors.torch import load as safetensors_load

    extractor = FeatureExtractor(config.backbone, config.layers, "random", config.imagesize, stored["input_norm"])
    extractor.mean, extractor.std = tuple(stored["mean"]), tuple(stored["std"])
    try:
        extractor.load_scoring_state_dict(safetensors_load(stored["safetensors"]), config.imagesize,
                                          f"model file '{path}'")
    except RuntimeError as error:  # shapes that do not fit
        raise UcadError(f"model file '{path}': its backbone weights do not fit {config.backbone} "
                        f"({str(error).splitlines()[0]})") from None
    extractor.weights_description = f"{stored['source']} (stored in {path.name})"
    return extractor
