"""Learning one task: keys from the frozen backbone, a prompt trained with SCL, knowledge from the
prompted backbone. Only these three are kept; the task's images are dropped afterwards."""
from __future__ import annotations

import torch

from ucad.config import LearningConfig
from ucad.model.coreset import CoresetSampler
from ucad.learning.epoch_selection import EpochJudge
from ucad.runtime.errors import UcadError
from ucad.model.keys import task_keys
from ucad.model.knowledge import pack_knowledge, vectors_in_budget
from ucad.model.task_memory import TaskMemory
from ucad.model.ucad_model import UcadModel
from ucad.runtime.timing import PhaseTimer
from ucad.learning.prompt_training import train_prompt


def learn_task(model: UcadModel, task_index: int, name: str, images: torch.Tensor, label_maps: torch.Tensor | None,
               sampler: CoresetSampler, config: LearningConfig, timer: PhaseTimer,
               validation_images: torch.Tensor | None = None) -> tuple[TaskMemory, list[float]]:
    """images: (N,3,S,S) uint8 (CPU or device); validation_images: held-out normal training images (used by
    --epoch_selection validation and --routing's statistics). Returns the task's memory and the loss per epoch."""
    n, seed = images.shape[0], config.task_seed(task_index)
    with timer.phase("key_features", n):
        frozen = model.features(images, None, config.feature_batch_size, f"[{name}] key features").flatten(0, 1)
    # --memory_size 0: as many knowledge vectors as the storage keeps in the paper's bytes
    memory_size = config.memory_size or vectors_in_budget(config.knowledge_storage, frozen.shape[-1])
    with timer.phase("keys"):
        keys, packed_keys = task_keys(frozen, config.key_size, config.key_sampler, config.key_storage, seed)
        routing = model.routing_statistics(keys, frozen.view(n, -1, frozen.shape[-1]), validation_images,
                                           config.feature_batch_size)

    if not model.config.learns_prompts:
        # PatchCore per task: the memory bank is a coreset of the frozen features themselves, sized by -p
        with timer.phase("coreset"):
            knowledge = sampler.subsample(frozen)
        return TaskMemory(name, keys, None, knowledge, routing=routing, packed_keys=packed_keys), []
    prompt = model.new_prompt(seed)
    history, extra = [], {}
    prompted = None  # the training images' features under the kept prompt, where already known
    if not config.train_prompt and prompt.is_identity():
        prompted = frozen  # a prompt that starts as the identity and never trains changes no feature
    judge = None
    if config.train_prompt and config.epoch_selection == "validation":
        if validation_images is None or validation_images.shape[0] == 0:
            raise UcadError("--epoch_selection validation scores each epoch on held-out normal training images: "
                            "keep some aside with `dataset --train_val_split 0.9`")
        with timer.phase("epoch_selection", validation_images.shape[0]):
            judge = EpochJudge(model, images, validation_images, sampler, memory_size,
                               config.feature_batch_size, frozen, seed=seed)
    frozen = frozen.half()  # kept through training to measure the prompt's drift below (and for --prompt_anchor)
    if config.train_prompt:
        with timer.phase("prompt_training", n * config.epochs_num):
            history = train_prompt(model, prompt, images, label_maps, config, seed,
                                   frozen.view(n, -1, frozen.shape[-1]), f"[{name}] prompt",
                                   judge.after_epoch if judge else None)
    if judge is not None:
        extra.update(chosen_epoch=judge.chosen_epoch, validation_scores=judge.scores)
        prompted = judge.best_features
        if judge.best_state is None:
            prompt = None  # no epoch beat the unprompted backbone: the task is scored on frozen features
        else:
            prompt.load_state_dict(judge.best_state)
        del judge
    if prompted is None:
        with timer.phase("knowledge_features", n):
            prompted = model.features(images, prompt, config.feature_batch_size, f"[{name}] knowledge features")
            prompted = prompted.reshape(-1, prompted.shape[-1])
    # how far the prompt moved the task's own normal patches from the frozen backbone's (relative L2, mean over
    # patches): the measure of whether a prompt "stays out of the way" of what PatchCore-style scoring relies on
    if prompt is not None:  # with no prompt kept (epoch selection chose none) there is nothing to measure
        frozen = frozen.float()
        extra["feature_drift"] = float(((prompted - frozen).norm(dim=1) / frozen.norm(dim=1).clamp_min(1e-12)).mean())
    del frozen
    with timer.phase("coreset"):
        selected = sampler.subsample(prompted, memory_size)
        unlimited = sampler.subsample(prompted, config.basic_size) if config.basic_size > 0 else None
    with timer.phase("knowledge_packing"):  # learning principal directions or codebooks: seconds with faiss
        packed = pack_knowledge(selected, config.knowledge_storage, training=prompted, seed=seed)
    state = {k: v.detach().clone() for k, v in prompt.state_dict().items()} if prompt is not None else None
    # scoring uses exactly the vectors a saved model will decode, whatever the storage
    return TaskMemory(name, keys, state, packed.decode(), unlimited, {"loss_history": history, **extra},
                      packed=packed, routing=routing, packed_keys=packed_keys), history
