"""Learning a task passes over its training images no more often than the method needs, and what it keeps is what
recomputing every pass would give."""
from __future__ import annotations

import pytest
import torch

from ucad.config import LearningConfig, ModelConfig
from ucad.model.coreset import CoresetSampler
from ucad.learning.task import learn_task
from ucad.model.ucad_model import UcadModel
from ucad.runtime.timing import PhaseTimer


def tiny(seed: int = 0):
    model = UcadModel(ModelConfig(backbone="resnet18", layers=("layer2", "layer3"), weights="random", imagesize=32,
                                  resize=32, pretrain_embed_dimension=16, target_embed_dimension=16),
                      torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    held_out = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(1, 4, (6, 32, 32), generator=g)
    return model, images, held_out, labels


def passes_over(model, images):
    """Counts model.features calls on the training images (their first dimension)."""
    calls, features = [], model.features

    def counting(batch, *args, **kwargs):
        calls.append(batch.shape[0] == images.shape[0] and torch.equal(batch, images))
        return features(batch, *args, **kwargs)

    model.features = counting
    return calls


def learn(model, images, held_out, labels, **options):
    config = LearningConfig(memory_size=8, key_size=4, basic_size=0, epochs_num=2, batch_size=3, **options)
    return learn_task(model, 0, "t", images, labels, CoresetSampler("approx_greedy_coreset", seed=0), config,
                      PhaseTimer(), held_out)[0]


def recomputed_knowledge(model, images, memory):
    """The knowledge a learner that computes the kept prompt's features again would keep."""
    prompt = model.prompt_for(0) if memory.prompt_state is not None else None
    features = model.features(images, prompt).reshape(-1, 16)
    sampler = CoresetSampler("approx_greedy_coreset", seed=0)
    return sampler.subsample(features, 8)


@pytest.mark.parametrize("options", [{"train_prompt": False}, {"epoch_selection": "validation"}],
                         ids=["no_scl", "epoch_selection"])
def test_knowledge_comes_from_features_already_computed(options):
    model, images, held_out, labels = tiny()
    calls = passes_over(model, images)
    memory = learn(model, images, held_out, labels, **options)
    epochs = 0 if options.get("train_prompt") is False else 2
    assert sum(calls) == 1 + epochs  # the key features, then one pass per epoch for the judge; none again after
    model.features = UcadModel.features.__get__(model)
    model.tasks.append(memory)
    expected = recomputed_knowledge(model, images, memory)
    assert torch.equal(memory.knowledge, expected)


def test_without_training_the_identity_prompt_changes_no_feature():
    model, images, _, _ = tiny()
    prompt = model.new_prompt(0)
    assert prompt.is_identity()
    assert torch.equal(model.features(images, prompt), model.features(images, None))
    with torch.no_grad():
        prompt.scale[0][0] = 0.5
    assert not prompt.is_identity()
