"""Choosing a task's prompt epoch honestly: on held-out normal training images and synthetic defects made on them
(ucad.learning.synthetic_defects), never on the test set.

The released code keeps, per task, the epoch with the best *test* AUROC; that number is not a result. Here, after
every epoch the prompt is scored as it would be used: knowledge = coreset of the prompted training features, each
validation image scored against it. The best epoch's prompt is kept, or none (frozen features) when no epoch beats
the unprompted backbone. Criterion: image AUROC + pixel AP on the validation set; ties keep the earlier epoch."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ucad.model.anomaly_map import image_scores
from ucad.model.coreset import CoresetSampler
from ucad.results.metrics import average_precision, roc_auc
from ucad.learning.synthetic_defects import make_validation_set


@dataclass
class EpochJudge:
    """Scores a prompt after each epoch and remembers the best state (epoch 0 = no prompt at all)."""

    model: object  # UcadModel
    train_images: torch.Tensor
    validation_images: torch.Tensor
    sampler: CoresetSampler
    memory_size: int
    feature_batch_size: int
    frozen: torch.Tensor  # (N * P, D) fp32 unprompted features of train_images, as the learner computed them
    seed: int = 0
    scores: list[float] = field(default_factory=list)  # per candidate: no prompt, epoch 1, epoch 2, ...
    chosen_epoch: int = 0  # 0 = no prompt; k = the prompt after epoch k
    best_state: dict | None = None
    best_features: torch.Tensor | None = None  # (N * P, D) training features under the chosen candidate

    def __post_init__(self):
        self.images, self.masks, self.labels = make_validation_set(self.validation_images, self.seed)
        self.scores.append(self.score(None, self.frozen))  # the unprompted backbone is the bar every epoch must clear
        self.best_features = self.frozen

    @torch.no_grad()
    def score(self, prompt: torch.nn.Module | None, features: torch.Tensor) -> float:
        knowledge = self.sampler.subsample(features, self.memory_size)
        # scored as the task will be: the model's own scoring primitive, with this candidate prompt and knowledge
        patch_scores = self.model.patch_scores(self.images, prompt, {"knowledge": knowledge},
                                               batch_size=self.feature_batch_size)["knowledge"]
        maps = self.model.anomaly_maps(patch_scores).cpu()
        image_auroc = roc_auc(self.labels, image_scores(patch_scores).numpy())
        pixel_ap = average_precision(self.masks.numpy().ravel(), maps.numpy().ravel())
        return float(image_auroc + pixel_ap)

    def after_epoch(self, prompt: torch.nn.Module) -> None:
        features = self.model.features(self.train_images, prompt, self.feature_batch_size).flatten(0, 1)
        self.scores.append(self.score(prompt, features))
        if self.scores[-1] > self.scores[self.chosen_epoch]:
            self.chosen_epoch = len(self.scores) - 1
            self.best_state = {k: v.detach().clone() for k, v in prompt.state_dict().items()}
            self.best_features = features  # the knowledge is chosen from these: no second pass over the images
