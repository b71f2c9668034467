"""Training a task's prompt with the structure-based contrastive loss. Nothing here sees test data: the epoch count is
fixed up front, and the last prompt is kept unless ucad.learning.epoch_selection picks one on held-out images."""
from __future__ import annotations

import torch
from tqdm import tqdm

from ucad.config import LearningConfig
from ucad.learning.loss import anchor_penalty, labels_to_grid, structure_contrastive_loss
from ucad.runtime.device import OutOfMemoryRetry


def train_prompt(model, prompt: torch.nn.Module, images: torch.Tensor, label_maps: torch.Tensor,
                 learning: LearningConfig, seed: int, frozen_features: torch.Tensor | None = None,
                 description: str = "prompt", after_epoch=None) -> list[float]:
    """images (N,3,S,S) uint8 and label_maps (N,S,S) int on the CPU or the device -> the mean loss per epoch.

    With learning.prompt_anchor > 0 the prompted embedding of each image is kept near `frozen_features` (N, P, D),
    the frozen backbone's embedding, which the learner has already (with learning.augment the flipped batch's is
    computed instead). `after_epoch(prompt)` is called after every epoch (ucad.learning.epoch_selection)."""
    scl_features, anchor, augment = learning.scl_features, learning.prompt_anchor, learning.augment
    if anchor > 0 and frozen_features is None:
        raise ValueError("anchor > 0 needs frozen_features, the frozen embedding of the training images")
    prompt.train().requires_grad_(True)
    optimizer = torch.optim.Adam(prompt.parameters(), lr=learning.lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    batches = OutOfMemoryRetry(learning.batch_size, "prompt training", "dataset --batch_size")

    def step(index: torch.Tensor) -> tuple[torch.Tensor, int]:
        batch = images[index].to(model.device, non_blocking=True)
        labels = label_maps[index].to(model.device, non_blocking=True)
        if augment:
            for dim in (-1, -2):  # random horizontal, then vertical flips, the same for an image and its region map
                if torch.rand(1, generator=generator).item() < 0.5:
                    batch, labels = batch.flip(dim), labels.flip(dim)
        if anchor > 0 and augment:
            # a backbone is not flip-equivariant: a flipped image's frozen features are not its features flipped
            with torch.no_grad():
                frozen = model.embed(batch, None)
        else:
            frozen = frozen_features[index].to(model.device, non_blocking=True) if anchor > 0 else None
        features, grid, embedded = model.training_features(batch, prompt, scl_features, embedded=anchor > 0)
        loss = structure_contrastive_loss(features, labels_to_grid(labels, grid, learning.label_sampling),
                                          learning.temperature)
        if anchor > 0:
            loss = loss + anchor * anchor_penalty(embedded, frozen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prompt.parameters(), learning.grad_clip)
        optimizer.step()
        return loss.detach() * len(index), len(index)

    progress = tqdm(range(learning.epochs_num), desc=description, leave=False)
    for _ in progress:
        order = torch.randperm(images.shape[0], generator=generator)
        # the epoch's loss is summed on the device: a float() per step would wait for the GPU every step
        total, count = torch.zeros((), device=model.device), 0
        while count < len(order):
            weighted_loss, used = batches.run(lambda size: step(order[count:count + size]))
            total += weighted_loss
            count += used
        history.append(float(total) / count)
        progress.set_postfix(loss=f"{history[-1]:.4f}")
        if after_epoch is not None:
            after_epoch(prompt)
    prompt.eval().requires_grad_(False)
    return history
