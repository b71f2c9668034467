"""Saving and loading a UcadModel.

`tasks_state` is what checkpoints hold (the learned tasks as tensors and plain values). The model file written by
`save_model` adds the backbone's weights (safetensors) and the run's configuration, so that a machine without network
or weight packages loads it with `torch.load(weights_only=True)`."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from ucad.model.backbones import FeatureExtractor
from ucad.config import ModelConfig, RunConfig, from_dict, to_dict
from ucad.runtime.errors import UcadError
from ucad.model.knowledge import PackedKnowledge
from ucad.model.task_memory import TaskMemory
from ucad.model.ucad_model import BANKS, KNOWLEDGE, UNLIMITED, UcadModel
from ucad.model.nearest_neighbor import NearestNeighbourScorer
from ucad.persistence.run_folder import atomic_write
from ucad.learning.thresholds import Threshold

MODEL_FORMAT = "ucad-model"
MODEL_FORMAT_VERSION = 2


def tasks_state(model: UcadModel, banks: tuple[str, ...] = BANKS) -> dict:
    """The learned tasks as tensors and plain values (loads with weights_only)."""
    return {"format_version": MODEL_FORMAT_VERSION, "config": to_dict(model.config), "grid": list(model.grid),
            "tasks": [_task_state(t, banks) for t in model.tasks]}


def restore_tasks(model: UcadModel, state: dict) -> None:
    model.tasks = []
    for t in state["tasks"]:
        t = _to(t, model.device)
        packed = PackedKnowledge.from_state(t["knowledge_packed"], model.device) if t.get("knowledge_packed") else None
        keys = PackedKnowledge.from_state(t["keys_packed"], model.device) if t.get("keys_packed") else None
        thresholds = {bank: Threshold.from_dict(v) for bank, v in (t.get("thresholds") or {}).items()}
        model.tasks.append(TaskMemory(t["name"], keys.decode() if keys is not None else t["keys"], t["prompt_state"],
                                      packed.decode() if packed is not None else t["knowledge"],
                                      t.get("knowledge_unlimited"), t.get("extra", {}), thresholds, packed,
                                      t.get("routing") or {}, keys))


def save_model(model: UcadModel, path: Path, run_configuration: dict | None = None, full: bool = False) -> None:
    """One self-contained file: backbone weights (safetensors), tasks, thresholds, configuration. Without `full`,
    what scoring never uses stays out: the unlimited knowledge and the backbone beyond the deepest extracted layer
    (classifier included)."""
    from safetensors.torch import save as safetensors_bytes

    extractor = model.extractor
    weights = extractor.model.state_dict() if full else extractor.scoring_state_dict(model.config.imagesize)
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    state = {**tasks_state(model, BANKS if full else (KNOWLEDGE,)), "format": MODEL_FORMAT,
             "backbone": {"safetensors": safetensors_bytes(weights), "complete": full,
                          "input_norm": extractor.input_norm, "mean": list(extractor.mean),
                          "std": list(extractor.std), "source": extractor.weights_description},
             "run_configuration": run_configuration or {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary:
        torch.save(state, temporary)


def load_model(path: Path, device: torch.device, weights: str | None = None, precision: str | None = None,
               scorer: NearestNeighbourScorer | None = None) -> UcadModel:
    """A model written by `save_model`. The backbone is built without pretrained weights (no hub, no package) and
    given the stored ones; `weights` (auto | hub | random | PATH) takes them from elsewhere instead. Without
    `precision`, the arithmetic the model was trained with (its thresholds were computed with it); without
    `scorer`, the nearest-neighbour settings of the run that made it."""
    path = Path(path)
    if path.is_dir():
        raise UcadError(f"'{path}' is a folder; give the model file inside it (models/ucad_model.pt of a run "
                        "saved with --save_patchcore_model)")
    if not path.is_file():
        raise UcadError(f"model file '{path}' does not exist (it is written by --save_patchcore_model)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UcadError(f"cannot read model file '{path}' ({first}); models saved before format "
                        f"{MODEL_FORMAT_VERSION} need the run again with --save_patchcore_model") from None
    if (not isinstance(state, dict) or state.get("format") != MODEL_FORMAT
            or state.get("format_version") != MODEL_FORMAT_VERSION):
        raise UcadError(f"'{path}' is not a UCAD model file of format {MODEL_FORMAT_VERSION} (written by "
                        "--save_patchcore_model); rerun the experiment to save one")
    config = from_dict(ModelConfig, state["config"])
    recorded_run = state.get("run_configuration", {}).get("run", {})
    config.weights = "random" if weights is None else weights  # "random": the architecture, its weights from the file
    extractor = _stored_extractor(config, state["backbone"], path) if weights is None else None
    precision = recorded_run.get("precision", "fp32") if precision is None else precision
    if scorer is None:
        run = from_dict(RunConfig, {"results_path": "", **recorded_run})
        scorer = NearestNeighbourScorer(config.anomaly_scorer_num_nn, run.nn_backend, device, run.faiss_on_gpu,
                                        run.faiss_num_workers, patch_distance=config.patch_distance)
    model = UcadModel(config, device, precision, extractor, scorer)
    if tuple(state["grid"]) != model.grid:
        raise UcadError(f"model file '{path}': stored patch grid {tuple(state['grid'])} differs from the "
                        f"rebuilt backbone's {model.grid}")
    restore_tasks(model, state)
    model.run_configuration = state.get("run_configuration", {})
    return model


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


def _task_state(task: TaskMemory, banks: tuple[str, ...]) -> dict:
    packed, keys = task.packed, task.packed_keys
    # packed knowledge and keys are stored as packed (their bytes are the point); scoring and routing decode them
    return _to({"name": task.name, "keys": None if keys is not None else task.keys,
                "keys_packed": keys.state() if keys is not None else None, "prompt_state": task.prompt_state,
                "knowledge": None if packed is not None else task.knowledge,
                "knowledge_packed": packed.state() if packed is not None else None,
                "knowledge_unlimited": task.knowledge_unlimited if UNLIMITED in banks else None,
                "thresholds": {bank: asdict(t) for bank, t in task.thresholds.items() if bank in banks},
                "extra": task.extra, "routing": task.routing}, "cpu")


def _to(value, device):
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value.detach().to(device) if isinstance(value, torch.Tensor) else value
