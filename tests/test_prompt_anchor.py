"""--prompt_anchor: a term that keeps the prompted embedding of normal training images near the frozen one."""
from __future__ import annotations

import pytest
import torch

from test_training import structured_images, train
from ucad.learning.loss import anchor_penalty
from ucad.model.ucad_model import ModelConfig, UcadModel
import ucad.learning.prompt_training


def test_anchor_penalty_is_the_relative_squared_drift():
    frozen = torch.tensor([[[3.0, 4.0], [0.0, 5.0]]])  # |f|^2 = 25 for both patches
    assert float(anchor_penalty(frozen * 1.1, frozen)) == pytest.approx(0.01)  # a uniform 10 % drift
    moved = frozen.clone()
    moved[0, 0] += torch.tensor([1.0, 2.0])  # one patch moved by |(1, 2)|^2 = 5: mean 2.5 over mean 25
    assert float(anchor_penalty(moved, frozen)) == pytest.approx(0.1)
    assert float(anchor_penalty(frozen, frozen)) == 0.0


def drift_after_training(anchor: float) -> float:
    torch.manual_seed(0)
    config = ModelConfig(backbone="resnet18", layers=("layer2",), weights="random", patchsize=1, imagesize=64,
                         resize=64, pretrain_embed_dimension=32, target_embed_dimension=32)
    model = UcadModel(config, torch.device("cpu"))
    images, labels = structured_images()
    frozen = model.features(images, None, batch_size=8)
    prompt = model.new_prompt(0)
    train(model, prompt, images, labels, epochs_num=6, lr=5e-2, batch_size=4, prompt_anchor=anchor,
          frozen_features=frozen if anchor > 0 else None)
    prompted = model.features(images, prompt, batch_size=8)
    return float(anchor_penalty(prompted, frozen))


def test_the_anchor_keeps_prompted_features_nearer_the_frozen_ones():
    free, anchored = drift_after_training(0.0), drift_after_training(100.0)
    assert free > 0.01  # SCL alone moves the features (else the test could not tell the two apart)
    assert anchored < 0.5 * free


def test_the_anchor_needs_the_frozen_features():
    config = ModelConfig(backbone="resnet18", layers=("layer2",), weights="random", imagesize=32, resize=32,
                         pretrain_embed_dimension=16, target_embed_dimension=16)
    model = UcadModel(config, torch.device("cpu"))
    images, labels = structured_images(2, 32)
    with pytest.raises(ValueError, match="frozen_features"):
        train(model, model.new_prompt(0), images, labels, epochs_num=1, prompt_anchor=1.0)


def test_with_flips_the_anchor_compares_against_the_flipped_images_own_frozen_features():
    """A CNN is not flip-equivariant: an unmoved prompt must cost nothing, flipped or not."""
    config = ModelConfig(backbone="resnet18", layers=("layer2",), weights="random", patchsize=1, imagesize=32,
                         resize=32, pretrain_embed_dimension=16, target_embed_dimension=16)
    model = UcadModel(config, torch.device("cpu"))
    images, labels = structured_images(4, 32)
    frozen = model.features(images, None, batch_size=4)
    seen = []
    original = ucad.learning.prompt_training.anchor_penalty
    ucad.learning.prompt_training.anchor_penalty = lambda prompted, reference: seen.append(float(original(prompted, reference).detach())) \
        or original(prompted, reference)
    try:
        train(model, model.new_prompt(0), images, labels, epochs_num=1, lr=1e-12, batch_size=4,
              augment=True, seed=1, prompt_anchor=1.0, frozen_features=frozen)
    finally:
        ucad.learning.prompt_training.anchor_penalty = original
    assert len(seen) == 1 and seen[0] < 1e-8  # the CNN prompt starts as the identity
