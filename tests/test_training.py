"""Prompt training: the SCL loss falls and only the prompt's parameters change (ViT and CNN)."""
from __future__ import annotations

import pytest
import torch

from ucad.config import LearningConfig
from ucad.learning.task import learn_task
from ucad.model.coreset import CoresetSampler
from ucad.model.ucad_model import ModelConfig, UcadModel
from ucad.runtime.timing import PhaseTimer
from ucad.learning.prompt_training import train_prompt


def train(model, prompt, images, labels, frozen_features=None, **settings) -> list[float]:
    """train_prompt with the settings of LearningConfig(**settings), the configuration's defaults for the rest."""
    learning = LearningConfig(**settings)
    return train_prompt(model, prompt, images, labels, learning, learning.seed, frozen_features)


def structured_images(n: int = 8, size: int = 64, seed: int = 0):
    """Images made of 4 quadrants of different random colours; the region map is the quadrant id."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    half = size // 2
    for i in range(n):
        for q, (y, x) in enumerate([(0, 0), (0, half), (half, 0), (half, half)]):
            colour = torch.randint(0, 256, (3, 1, 1), generator=generator, dtype=torch.uint8)
            noise = torch.randint(0, 30, (3, half, half), generator=generator, dtype=torch.uint8)
            images[i, :, y:y + half, x:x + half] = colour.expand(3, half, half) // 2 + noise
            labels[i, y:y + half, x:x + half] = q + 1
    return images, labels


@pytest.mark.parametrize("backbone, layers", [("vit_tiny_patch16_224", ("2",)), ("resnet18", ("layer2",))])
def test_prompt_training_lowers_the_loss_and_touches_only_the_prompt(backbone, layers):
    torch.manual_seed(0)
    config = ModelConfig(backbone=backbone, layers=layers, weights="random", patchsize=1, imagesize=64, resize=64,
                         pretrain_embed_dimension=64, target_embed_dimension=64)
    model = UcadModel(config, torch.device("cpu"))
    backbone_before = {k: v.clone() for k, v in model.extractor.model.state_dict().items()}
    prompt = model.new_prompt(0)
    prompt_before = {k: v.clone() for k, v in prompt.state_dict().items()}
    images, labels = structured_images()
    history = train(model, prompt, images, labels, epochs_num=12, lr=5e-2, batch_size=4)
    assert history[-1] < history[0] - 1e-3, history
    for name, value in model.extractor.model.state_dict().items():
        assert torch.equal(value, backbone_before[name]), f"backbone tensor {name} changed"
    assert any(not torch.equal(v, prompt_before[k]) for k, v in prompt.state_dict().items())
    assert all(p.grad is None for p in model.extractor.model.parameters())


def test_vit_prefix_prompt_changes_the_features():
    config = ModelConfig(backbone="vit_tiny_patch16_224", layers=("2",), weights="random", patchsize=1, imagesize=64,
                         resize=64, pretrain_embed_dimension=64, target_embed_dimension=64)
    model = UcadModel(config, torch.device("cpu"))
    images, _ = structured_images(2)
    frozen = model.features(images)
    prompted = model.features(images, model.new_prompt(0))
    assert frozen.shape == prompted.shape == (2, 16, 64)
    assert not torch.allclose(frozen, prompted)
    assert model.extractor.prompt_layers == 3  # blocks 0..2, nothing beyond the extracted block


def test_learn_task_keeps_keys_prompt_and_knowledge_of_the_configured_sizes():
    config = ModelConfig(backbone="resnet18", layers=("layer2", "layer3"), weights="random", patchsize=3,
                         imagesize=64, resize=64, pretrain_embed_dimension=32, target_embed_dimension=32)
    model = UcadModel(config, torch.device("cpu"))
    images, labels = structured_images(6)
    learning = LearningConfig(key_size=10, memory_size=20, basic_size=40, epochs_num=2, batch_size=3)
    memory, history = learn_task(model, 0, "quadrants", images, labels, CoresetSampler(), learning, PhaseTimer())
    assert memory.keys.shape == (10, 32) and memory.knowledge.shape == (20, 32)
    assert memory.knowledge_unlimited.shape == (40, 32)
    assert len(history) == 2 and memory.prompt_state is not None
