"""ucad.persistence.model_file: one stored format for model files and checkpoints, a task stored and restored by
name, model files and checkpoints of format 2 still read, each task's checkpoint file written once."""
from __future__ import annotations

import copy
from dataclasses import asdict

import pytest
import torch

from ucad.config import ModelConfig, to_dict
from ucad.learning.thresholds import Threshold
from ucad.model.knowledge import pack_knowledge
from ucad.model.task_memory import TaskMemory
from ucad.model.ucad_model import UcadModel
from ucad.persistence.model_file import CHECKPOINT, CHECKPOINT_TASKS, load_model, read_checkpoint, save_model, \
    write_checkpoint
from ucad.runtime.errors import UcadError

IMAGES = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def model() -> UcadModel:
    """Two tasks with a prompt, fp16 knowledge, thresholds of both banks and routing statistics."""
    model = UcadModel(ModelConfig(backbone="resnet18", layers=("layer2", "layer3"), weights="random", imagesize=32,
                                  resize=32, pretrain_embed_dimension=16, target_embed_dimension=16),
                      torch.device("cpu"))
    for index in range(2):
        features = model.embed(IMAGES[index:index + 2]).reshape(-1, 16).detach()
        packed = pack_knowledge(features[::3], "fp16")
        model.tasks.append(TaskMemory(
            name=f"task{index}", keys=features[:5], prompt_state=model.new_prompt(index).state_dict(),
            knowledge=packed.decode(), knowledge_unlimited=features[::2], packed=packed,
            extra={"loss_history": [1.5, 1.25], "feature_drift": 0.125},
            thresholds={"knowledge": Threshold(2.0 + index, 1.5, 0.99, 4),
                        "knowledge_unlimited": Threshold(1.0, 0.5, 0.99, 4)},
            routing={"key_distance_scale": torch.tensor([0.5 + index])}))
    return model


def assert_same_tasks(restored: list[TaskMemory], original: list[TaskMemory], unlimited: bool = True) -> None:
    assert [t.name for t in restored] == [t.name for t in original]
    for again, task in zip(restored, original):
        assert torch.equal(again.keys, task.keys) and torch.equal(again.knowledge, task.knowledge)
        assert again.packed.storage == "fp16" and torch.equal(again.packed.vectors, task.packed.vectors)
        assert again.prompt_state.keys() == task.prompt_state.keys()
        assert all(torch.equal(again.prompt_state[k], v) for k, v in task.prompt_state.items())
        assert again.extra == task.extra and again.routing.keys() == task.routing.keys()
        assert torch.equal(again.routing["key_distance_scale"], task.routing["key_distance_scale"])
        if unlimited:
            assert torch.equal(again.knowledge_unlimited, task.knowledge_unlimited)
            assert again.thresholds == task.thresholds
        else:
            assert again.knowledge_unlimited is None and again.thresholds == {"knowledge": task.thresholds["knowledge"]}


def test_a_task_is_stored_and_restored_by_name(model):
    state = model.tasks[0].to_state()
    assert state["knowledge"] is None and state["knowledge_packed"]["storage"] == "fp16"  # stored as packed
    assert_same_tasks([TaskMemory.from_state(state)], model.tasks[:1])
    scoring = model.tasks[0].to_state(scoring_only=True)
    assert_same_tasks([TaskMemory.from_state(scoring)], model.tasks[:1], unlimited=False)


def save_format_2(model: UcadModel, path) -> None:
    """A model file of format 2 ("ucad-model"), laid out key by key as --save_patchcore_model wrote that format."""
    from safetensors.torch import save

    weights = model.extractor.scoring_state_dict(model.config.imagesize)
    tasks = [{"name": t.name, "keys": t.keys, "keys_packed": None, "prompt_state": t.prompt_state,
              "knowledge": None, "knowledge_packed": t.packed.state(), "knowledge_unlimited": None,
              "thresholds": {"knowledge": asdict(t.thresholds["knowledge"])}, "extra": t.extra,
              "routing": t.routing} for t in model.tasks]
    torch.save({"format_version": 2, "config": to_dict(model.config), "grid": list(model.grid), "tasks": tasks,
                "format": "ucad-model",
                "backbone": {"safetensors": save({k: v.contiguous().clone() for k, v in weights.items()}),
                             "complete": False, "input_norm": model.extractor.input_norm,
                             "mean": list(model.extractor.mean), "std": list(model.extractor.std),
                             "source": "random"},
                "run_configuration": {}}, path)


@pytest.mark.parametrize("written_by", ["format 2", "save_model"])
def test_a_model_file_loads_and_scores_as_the_model_that_wrote_it(model, tmp_path, written_by):
    path = tmp_path / "ucad_model.pt"
    if written_by == "format 2":
        save_format_2(model, path)
    else:
        save_model(model, path)
    loaded = load_model(path, torch.device("cpu"))
    assert_same_tasks(loaded.tasks, model.tasks, unlimited=False)
    expected, scored = model.score(IMAGES), loaded.score(IMAGES)
    assert torch.equal(scored.routed_task, expected.routed_task)
    torch.testing.assert_close(scored.image_scores, expected.image_scores)


def test_a_checkpoint_or_a_model_file_of_another_format_is_refused_in_one_line(model, tmp_path):
    write_checkpoint(tmp_path, model, {"configs": {}})
    with pytest.raises(UcadError, match="is not a UCAD model file") as refused:
        load_model(tmp_path / CHECKPOINT, torch.device("cpu"))
    assert "\n" not in str(refused.value)
    save_model(model, tmp_path / "ucad_model.pt")
    state = torch.load(tmp_path / "ucad_model.pt", weights_only=True)
    torch.save({**state, "format_version": 4}, tmp_path / "newer.pt")
    with pytest.raises(UcadError, match="newer.pt' is not a UCAD model file"):
        load_model(tmp_path / "newer.pt", torch.device("cpu"))
    torch.save({**torch.load(tmp_path / CHECKPOINT, weights_only=True), "format_version": 4}, tmp_path / CHECKPOINT)
    with pytest.raises(UcadError, match=r"^--resume: the checkpoint .* cannot be read \(format ucad 4 is not ucad 3\)"):
        read_checkpoint(tmp_path)


def having_learned(model: UcadModel, tasks: list[TaskMemory]) -> UcadModel:
    learned = copy.copy(model)
    learned.tasks = tasks
    return learned


def test_a_checkpoint_writes_each_task_once_and_reads_back_its_progress(model, tmp_path):
    progress = {"configs": {"model": {"mode": "ucad"}}, "records": [{"phase": 0}], "image_rows": [], "losses": {}}
    first = TaskMemory("first", model.tasks[0].keys, None, model.tasks[0].knowledge)
    write_checkpoint(tmp_path, having_learned(model, [first]), progress)
    written = tmp_path / CHECKPOINT_TASKS / "task_000.pt"
    marked = {**torch.load(written, weights_only=True), "name": "as first written"}
    torch.save(marked, written)  # a file a later phase rewrote would lose this mark
    stale = tmp_path / CHECKPOINT_TASKS / "task_001.pt"
    torch.save({**marked, "name": "a try killed before its checkpoint"}, stale)
    write_checkpoint(tmp_path, having_learned(model, [first, model.tasks[1]]), {**progress, "records": []})
    state = read_checkpoint(tmp_path)
    assert state["task_files"] == ["task_000.pt", "task_001.pt"] and state["records"] == []
    assert [TaskMemory.from_state(t).name for t in state["tasks"]] == ["as first written", "task1"]
    assert state["configs"] == progress["configs"] and not list(tmp_path.rglob("*.tmp"))


def test_a_checkpoint_of_format_2_is_read(model, tmp_path):
    """A checkpoint of format 2: the header under "model", no format name, each task in its own file."""
    (tmp_path / CHECKPOINT_TASKS).mkdir()
    for index, task in enumerate(model.tasks):
        torch.save({"name": task.name, "keys": task.keys, "keys_packed": None, "prompt_state": task.prompt_state,
                    "knowledge": None, "knowledge_packed": task.packed.state(),
                    "knowledge_unlimited": task.knowledge_unlimited,
                    "thresholds": {bank: asdict(t) for bank, t in task.thresholds.items()}, "extra": task.extra,
                    "routing": task.routing}, tmp_path / CHECKPOINT_TASKS / f"task_{index:03d}.pt")
    torch.save({"configs": {"learning": {"seed": 3}}, "task_files": ["task_000.pt", "task_001.pt"],
                "model": {"format_version": 2, "config": to_dict(model.config), "grid": list(model.grid), "tasks": []},
                "records": [{"phase": 1}], "image_rows": [{"image": "a.png"}], "losses": {"task0": [1.0]},
                "timings": {}}, tmp_path / CHECKPOINT)
    state = read_checkpoint(tmp_path)
    assert state["configs"] == {"learning": {"seed": 3}} and state["records"] == [{"phase": 1}]
    assert_same_tasks([TaskMemory.from_state(t) for t in state["tasks"]], model.tasks)
