"""Training one task's prompt with the structure-based contrastive loss, for a fixed number of epochs.

Nothing here sees test data: the number of epochs is fixed up front, and the last prompt is kept unless
ucad.epoch_selection picks an epoch on held-out training images.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from ucad.device import OutOfMemoryRetry
from ucad.loss import anchor_penalty, labels_to_grid, structure_contrastive_loss

SCL_FEATURES = ("raw", "embedded")


def train_prompt(model, prompt: torch.nn.Module, images: torch.Tensor, label_maps: torch.Tensor,
                 epochs: int = 25, lr: float = 5e-4, batch_size: int = 8, clip: float = 1.0,
                 temperature: float = 0.5, augment: bool = False, scl_features: str = "raw",
                 label_sampling: str = "centre", seed: int = 0, description: str = "prompt",
                 after_epoch=None, anchor: float = 0.0, frozen_features: torch.Tensor | None = None) -> list[float]:
    """images (N,3,S,S) uint8 and label_maps (N,S,S) int on the CPU or the device. Returns mean loss per epoch.

    anchor > 0 adds anchor * anchor_penalty: the prompted embedding of each training image is kept near
    `frozen_features` (N, P, D), the frozen backbone's embedding of the same images (the learner has them already;
    with `augment` the flipped batch's frozen embedding is computed instead).

    scl_features "raw": the loss sees the extractor's raw features at the patch grid (the released method);
    "embedded": the pooled PatchCore embedding that the memory stores (an ablation). `after_epoch(prompt)` is called
    after every epoch (validation-based epoch choice, ucad.epoch_selection)."""
    if scl_features not in SCL_FEATURES:
        raise ValueError(f"scl_features must be one of {SCL_FEATURES}, got {scl_features!r}")
    if anchor > 0 and frozen_features is None:
        raise ValueError("anchor > 0 needs frozen_features, the frozen embedding of the training images")
    prompt.train()
    prompt.requires_grad_(True)
    optimizer = torch.optim.Adam(prompt.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    batches = OutOfMemoryRetry(batch_size, "prompt training", "dataset --batch_size")

    def step(index: torch.Tensor) -> tuple[torch.Tensor, int]:
        batch = images[index].to(model.device, non_blocking=True)
        labels = label_maps[index].to(model.device, non_blocking=True)
        if augment:
            batch, labels = _flip(batch, labels, generator)
        frozen = None
        if anchor > 0 and augment:
            # a backbone is not flip-equivariant: a flipped image's frozen features are not its features flipped
            with torch.no_grad():
                frozen = model.embed(batch, None)
        elif anchor > 0:
            frozen = frozen_features[index].to(model.device, non_blocking=True)
        features, grid, embedded = model.training_features(batch, prompt, scl_features, embedded=anchor > 0)
        loss = structure_contrastive_loss(features, labels_to_grid(labels, grid, label_sampling), temperature)
        if anchor > 0:
            loss = loss + anchor * anchor_penalty(embedded, frozen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prompt.parameters(), clip)
        optimizer.step()
        return loss.detach() * len(index), len(index)

    progress = tqdm(range(epochs), desc=description, leave=False)
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
    prompt.eval()
    prompt.requires_grad_(False)
    return history


def _flip(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
    """Random horizontal / vertical flips, the same for an image and its region map."""
    if torch.rand(1, generator=generator).item() < 0.5:
        images, labels = images.flip(-1), labels.flip(-1)
    if torch.rand(1, generator=generator).item() < 0.5:
        images, labels = images.flip(-2), labels.flip(-2)
    return images, labels
