"""Learning one task: keys from the frozen backbone, a prompt trained with SCL, knowledge from the
prompted backbone. Only these three are kept; the task's images are dropped afterwards."""
from __future__ import annotations

import torch

from ucad.config import LearningConfig
from ucad.coreset import CoresetSampler
from ucad.keys import select_keys
from ucad.knowledge import pack_knowledge
from ucad.model import TaskMemory, UcadModel
from ucad.timing import PhaseTimer
from ucad.training import train_prompt


def learn_task(model: UcadModel, task_index: int, name: str, images: torch.Tensor, label_maps: torch.Tensor | None,
               sampler: CoresetSampler, config: LearningConfig, timer: PhaseTimer) -> tuple[TaskMemory, list[float]]:
    """images: (N,3,S,S) uint8 (CPU or device). Returns the task's memory and the loss per epoch."""
    n = images.shape[0]
    with timer.phase("key_features", n):
        frozen = model.features(images, None, config.feature_batch_size, f"[{name}] key features")
        frozen = frozen.reshape(-1, frozen.shape[-1])
    with timer.phase("keys"):
        keys = select_keys(frozen, config.key_size, config.key_sampler, seed=config.seed * 1000 + task_index)

    if model.config.mode == "patchcore":
        # the oracle baseline: one PatchCore memory bank per task from frozen features, sized by -p
        with timer.phase("coreset"):
            knowledge = sampler.subsample(frozen)
        return TaskMemory(name, keys, None, knowledge), []
    del frozen

    prompt = model.new_prompt(task_index, config.seed)
    history: list[float] = []
    if config.train_prompt:
        with timer.phase("prompt_training", n * config.epochs_num):
            history = train_prompt(model, prompt, images, label_maps, config.epochs_num, config.lr, config.batch_size,
                                   config.grad_clip, config.temperature, config.augment,
                                   scl_features=config.scl_features, label_sampling=config.label_sampling,
                                   seed=config.seed * 1000 + task_index, description=f"[{name}] prompt")
    prompt.requires_grad_(False)
    with timer.phase("knowledge_features", n):
        prompted = model.features(images, prompt, config.feature_batch_size, f"[{name}] knowledge features")
        prompted = prompted.reshape(-1, prompted.shape[-1])
    with timer.phase("coreset"):
        selected = sampler.subsample(prompted, config.memory_size)
        unlimited = sampler.subsample(prompted, config.basic_size) if config.basic_size > 0 else None
    packed = pack_knowledge(selected, config.knowledge_storage, training=prompted, seed=config.seed * 1000 + task_index)
    state = {k: v.detach().clone() for k, v in prompt.state_dict().items()}
    # scoring uses exactly the vectors a saved model will decode, whatever the storage
    return TaskMemory(name, keys, state, packed.decode(), unlimited, {"loss_history": history},
                      packed=packed), history
