"""ucad.learning.loss (structure-based contrastive loss, label maps to the patch grid) and ucad.model.router (task choice)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ucad.learning.loss import labels_to_grid, structure_contrastive_loss
from ucad.model.router import TaskKeyIndex, route


# ----------------------------------------------------------------------------- the loss
def test_hand_computed_example():
    # 1 image, 3 patches, 2-d features, regions [1, 1, 2]
    #   f1 = (1, 0), f2 = (1, 1), f3 = (0, 1)
    #   cos12 = 1/sqrt2, cos13 = 0, cos23 = 1/sqrt2; with temperature 0.5: s = 2 * cos
    #   s12 = sqrt2, s13 = 0, s23 = sqrt2
    # ordered pairs i != j (6 of them):
    #   (1,2), (2,1): same region       -> -s12 = -sqrt2 each
    #   (1,3), (3,1): different regions -> exp(s13) = exp(0) = 1 each
    #   (2,3), (3,2): different regions -> exp(s23) = exp(sqrt2) each
    #   loss = (-2 sqrt2 + 2 + 2 exp(sqrt2)) / 6 = (-2.828427 + 2 + 8.226501) / 6 = 1.233012
    features = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    labels = torch.tensor([[1, 1, 2]])
    expected = (-2 * math.sqrt(2) + 2 + 2 * math.exp(math.sqrt(2))) / 6
    assert expected == pytest.approx(1.233012, abs=1e-6)
    loss = structure_contrastive_loss(features, labels, temperature=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the default temperature is the paper's 0.5, and the feature scale does not matter (cosine)
    assert structure_contrastive_loss(features * 7.0, labels).item() == pytest.approx(expected, rel=1e-6)


def test_batch_is_mean_over_images():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 10, 6, generator=g)
    labels = torch.randint(1, 4, (3, 10), generator=g)
    per_image = [structure_contrastive_loss(features[i:i + 1], labels[i:i + 1]) for i in range(3)]
    batch = structure_contrastive_loss(features, labels)
    assert batch.item() == pytest.approx(torch.stack(per_image).mean().item(), rel=1e-6)


def test_against_explicit_double_loop():
    """With label 0 ("no region") among the labels: its patches are in no pair; images of < 2 regions are out."""
    g = torch.Generator().manual_seed(1)
    features = torch.randn(3, 7, 5, generator=g)
    labels = torch.randint(0, 3, (3, 7), generator=g)
    labels[2] = torch.tensor([0, 0, 2, 0, 2, 2, 0])  # one region only: contributes nothing
    assert (labels[:2] == 0).any() and all(len(set(labels[b].tolist()) - {0}) == 2 for b in range(2))
    per_image = []
    for b in range(2):
        total, count = 0.0, 0
        for i in range(7):
            for j in range(7):
                if i == j or labels[b, i] == 0 or labels[b, j] == 0:
                    continue
                s = F.cosine_similarity(features[b, i], features[b, j], dim=0).item() / 0.5
                total += -s if labels[b, i] == labels[b, j] else math.exp(s)
                count += 1
        per_image.append(total / count)
    got = structure_contrastive_loss(features, labels, temperature=0.5)
    assert got.item() == pytest.approx(sum(per_image) / 2, rel=1e-5)


def test_label_zero_is_no_region():
    g = torch.Generator().manual_seed(4)
    features = torch.randn(2, 6, 5, generator=g, requires_grad=True)
    # an all-zero map (no region anywhere) and a single-region map train nothing: loss 0, zero gradient
    for labels in (torch.zeros(2, 6, dtype=torch.long), torch.tensor([[0, 3, 3, 0, 3, 0], [1, 1, 1, 1, 1, 1]])):
        loss = structure_contrastive_loss(features, labels)
        loss.backward()
        assert loss.item() == 0.0 and features.grad.abs().sum() == 0
        features.grad = None
    # zero-labelled patches change nothing: the loss equals that of the labelled patches alone
    labels = torch.tensor([[1, 0, 2, 2, 0, 1]])
    kept = torch.tensor([0, 2, 3, 5])
    full = structure_contrastive_loss(features[:1], labels)
    alone = structure_contrastive_loss(features[:1, kept], labels[:, kept])
    assert full.item() == pytest.approx(alone.item(), rel=1e-6)


def test_gradient_flows_and_pulls_same_region_together():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(1, 6, 4, generator=g, requires_grad=True)
    labels = torch.tensor([[1, 1, 1, 2, 2, 2]])
    loss = structure_contrastive_loss(features, labels)
    loss.backward()
    assert features.grad is not None
    assert torch.isfinite(features.grad).all()
    assert features.grad.abs().sum() > 0
    # one gradient step lowers the loss
    with torch.no_grad():
        stepped = features - 0.1 * features.grad
    assert structure_contrastive_loss(stepped, labels) < loss


def test_loss_extremes():
    same = torch.ones(1, 4, 3)  # identical patches: s = 1 / temperature = 2 for every pair
    # two regions of two patches: 4 same-region ordered pairs (-2 each), 8 different-region ones (exp(2) each)
    two = torch.tensor([[1, 1, 2, 2]])
    expected = (4 * -2.0 + 8 * math.exp(2.0)) / 12
    assert structure_contrastive_loss(same, two).item() == pytest.approx(expected, rel=1e-6)
    # all patches different regions and identical: loss = exp(2)
    assert structure_contrastive_loss(same, torch.arange(1, 5)[None]).item() == pytest.approx(math.exp(2.0), rel=1e-6)


# ----------------------------------------------------------------------------- label maps
def test_labels_to_grid_keeps_ids_by_nearest_sampling():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :4, :4] = 3
    labels[0, :4, 4:] = 7
    labels[0, 4:, :] = 100_000  # a large id must survive exactly
    grid = labels_to_grid(labels, (4, 4))
    assert grid.shape == (1, 16)
    assert grid.dtype == torch.long
    assert torch.equal(grid.reshape(4, 4), labels[0, 1::2, 1::2])  # the centre pixel of each 2x2 cell
    assert set(grid.unique().tolist()) == {3, 7, 100_000}


@pytest.mark.parametrize("size,grid", [(224, (14, 14)), (16, (5, 5)), (10, (14, 14)), (64, (4, 8))])
def test_labels_to_grid_never_blends(size, grid):
    g = torch.Generator().manual_seed(3)
    # checkerboard-like random ids: any averaging would create values that are not ids
    ids = torch.tensor([1, 5, 9, 250, 4097])
    labels = ids[torch.randint(0, 5, (2, size, size), generator=g)]
    out = labels_to_grid(labels, grid)
    assert out.shape == (2, grid[0] * grid[1])
    assert set(out.unique().tolist()) <= set(ids.tolist())
    # centre sampling = floor((i + 0.5) * size / grid), torch's 'nearest-exact'
    rows = ((torch.arange(grid[0]) + 0.5) * size / grid[0]).floor().long()
    cols = ((torch.arange(grid[1]) + 0.5) * size / grid[1]).floor().long()
    assert torch.equal(out.reshape(2, *grid), labels[:, rows][:, :, cols])
    corner = labels_to_grid(labels, grid, "corner")  # top-left sampling (--label_sampling corner)
    rows = (torch.arange(grid[0]) * size / grid[0]).floor().long()
    cols = (torch.arange(grid[1]) * size / grid[1]).floor().long()
    assert torch.equal(corner.reshape(2, *grid), labels[:, rows][:, :, cols])


@pytest.mark.parametrize("size,stride", [(224, 16), (224, 8), (128, 16)])
def test_labels_are_sampled_at_patch_centres_on_vit_and_cnn_grids(size, stride):
    # each label is its own row index: the sampled rows are read off directly
    grid = size // stride
    labels = torch.arange(size)[None, :, None].expand(1, size, size)
    sampled = labels_to_grid(labels, (grid, grid)).reshape(grid, grid)[:, 0]
    assert sampled.tolist() == [stride // 2 + stride * i for i in range(grid)]  # 8, 24, 40, ... for ViT-B/16
    assert labels_to_grid(labels, (grid, grid), "corner").reshape(grid, grid)[:, 0].tolist() == [
        stride * i for i in range(grid)]


# ----------------------------------------------------------------------------- routing
def make_tasks(dim=16, keys=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, dim, generator=g) * 10.0
    key_sets = [c + torch.randn(keys, dim, generator=g) for c in centres]
    return centres, key_sets, g


def test_key_distances_and_route_pick_the_right_task():
    centres, key_sets, g = make_tasks()
    truth = torch.tensor([2, 0, 1, 1, 0, 2])
    images = torch.stack([centres[t] + torch.randn(9, 16, generator=g) for t in truth])  # (6, 9 patches, 16)
    per_task = TaskKeyIndex(key_sets).distances(images)
    assert per_task.shape == (6, 3)
    assert torch.equal(route(per_task), truth)
    # the key distance = mean over the image's patches of the distance to the nearest key
    expected = (torch.cdist(images[0], key_sets[1]).min(dim=1).values ** 2).mean()  # squared L2, the default
    assert per_task[0, 1].item() == pytest.approx(expected.item(), rel=1e-4)


def test_route_is_per_image_argmin():
    distances = torch.tensor([[3.0, 1.0, 2.0], [0.5, 0.7, 0.6], [9.0, 9.0, 1.0]])
    assert route(distances).tolist() == [1, 0, 2]
    assert route(torch.tensor([[4.0]])).tolist() == [0]  # a single stored task


def test_routing_by_mean_not_by_single_patch():
    # one outlier patch close to task 1's keys must not flip an image that matches task 0 everywhere else
    keys0 = torch.zeros(5, 4)
    keys1 = torch.full((5, 4), 10.0)
    image = torch.full((1, 10, 4), 1.0)
    image[0, 0] = 10.0
    per_task = TaskKeyIndex([keys0, keys1]).distances(image)
    assert route(per_task).tolist() == [0]
