"""A confidence for every route: the trust threshold comes from the margins of held-out normal images, and an image
that looks like two tasks at once is flagged while clear images are trusted."""
from __future__ import annotations

import math

import pytest
import torch

from ucad.config import ModelConfig
from ucad.model.router import route_trust_threshold
from ucad.model.scoring import held_out_margins
from ucad.model.task_memory import TaskMemory
from ucad.model.ucad_model import UcadModel

SIZE = 32


def textured(kind: str, generator: torch.Generator, count: int = 1) -> torch.Tensor:
    """(count, 3, S, S) uint8: 'stripes' (vertical bars) or 'checks' (a checkerboard), with a little noise."""
    coordinates = torch.arange(SIZE)
    if kind == "stripes":
        pattern = ((coordinates[None, :] // 4) % 2).expand(SIZE, SIZE)
    else:
        pattern = ((coordinates[:, None] // 8 + coordinates[None, :] // 8) % 2)
    base = (40 + 180 * pattern).float()
    noise = torch.randn(count, 3, SIZE, SIZE, generator=generator) * 6
    return (base + noise).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def two_task_model() -> UcadModel:
    torch.manual_seed(0)
    model = UcadModel(ModelConfig(backbone="resnet18", layers=("layer2",), weights="random", imagesize=SIZE,
                                  resize=SIZE, pretrain_embed_dimension=16, target_embed_dimension=16),
                      torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    for name in ("stripes", "checks"):
        features = model.embed(textured(name, generator, 4)).reshape(-1, 16).detach()
        model.tasks.append(TaskMemory(name, features[::2], None, features))
        # as the run does once a task is learned: its held-out images' margins among the tasks learned so far
        model.tasks[-1].routing["held_out_margins"] = held_out_margins(model, textured(name, generator, 3))
    return model


def test_an_image_of_two_tasks_at_once_is_flagged_and_clear_images_are_trusted(two_task_model):
    generator = torch.Generator().manual_seed(2)
    stripes, checks = textured("stripes", generator), textured("checks", generator)
    mixed = torch.cat([stripes[..., : SIZE // 2], checks[..., SIZE // 2:]], dim=3)  # left half one, right the other
    scored = two_task_model.score(torch.cat([stripes, checks, mixed]), maps=False)
    assert scored.routed_task[:2].tolist() == [0, 1]
    # the first task had no rival when it was learned, so the margins of the second task's held-out images decide
    threshold = two_task_model.route_trust_threshold()
    assert threshold == pytest.approx(float(torch.quantile(two_task_model.tasks[1].routing["held_out_margins"], 0.05)))
    assert scored.routing_margins[2] < 0.05 * threshold  # the mixed image sits between the two tasks
    assert scored.route_trusted[1:].tolist() == [True, False]


def test_the_threshold_is_the_quantile_of_finite_held_out_margins():
    margins = [torch.tensor([math.inf, math.inf]), torch.tensor([0.4, 0.1, 0.3]), torch.tensor([0.2])]
    assert route_trust_threshold(margins, 0.0) == pytest.approx(0.1)
    assert route_trust_threshold(margins, 0.5) == pytest.approx(0.25)  # numpy's linear interpolation of 4 values
    assert route_trust_threshold([torch.tensor([math.inf])], 0.05) is None  # a single task: nothing to go by
    assert route_trust_threshold([], 0.05) is None


def test_a_model_without_held_out_margins_leaves_trust_unknown(two_task_model):
    bare = UcadModel(two_task_model.config, torch.device("cpu"), extractor=two_task_model.extractor)
    bare.tasks = [TaskMemory(t.name, t.keys, None, t.knowledge) for t in two_task_model.tasks]
    scored = bare.score(textured("stripes", torch.Generator().manual_seed(3)), maps=False)
    assert scored.route_trusted is None and scored.routing_margins.shape == (1,)
