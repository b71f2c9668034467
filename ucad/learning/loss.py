"""Structure-based contrastive loss (SCL): patches of one Segment-Anything region are pulled
together, patches of different regions pushed apart."""
from __future__ import annotations

import torch
import torch.nn.functional as F

LABEL_SAMPLING = {"centre": "nearest-exact", "corner": "nearest"}


def labels_to_grid(label_maps: torch.Tensor, grid: tuple[int, int], sampling: str = "centre") -> torch.Tensor:
    """(B, S, S) integer region maps -> (B, h*w): each patch takes the region id at its centre pixel (rows 8, 24,
    ... for 16-pixel patches, as the released code samples); "corner" takes its top-left pixel (rows 0, 16, ...).
    Nearest sampling either way: region ids must not blend."""
    resized = F.interpolate(label_maps[:, None].float(), size=grid, mode=LABEL_SAMPLING[sampling])
    return resized.reshape(label_maps.shape[0], -1).long()


def structure_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """features (B, P, D), labels (B, P): per image, the mean over pairs i != j of labelled patches of -s_ij for
    same-region pairs and exp(s_ij) for different-region pairs (s = cosine / temperature), then the mean over images.

    Label 0 is "in no region" (left uncovered by Segment Anything): its patches take part in no pair, or an all-zero
    map would train the prompt on one fake region. An image with fewer than 2 regions contributes nothing; a batch
    of only such images gives 0 (with a graph, so backward still works)."""
    normed = F.normalize(features.float(), dim=-1)
    similarity = normed @ normed.transpose(1, 2) / temperature
    same = labels[:, :, None] == labels[:, None, :]
    per_pair = torch.where(same, -similarity, torch.exp(similarity))
    labelled = labels > 0
    off_diagonal = ~torch.eye(features.shape[1], dtype=torch.bool, device=features.device)
    counted = labelled[:, :, None] & labelled[:, None, :] & off_diagonal
    per_image = torch.where(counted, per_pair, 0.0).sum((1, 2)) / counted.sum((1, 2)).clamp(min=1)
    # two regions or more: some labelled patch differs from the image's largest label
    contributing = (labelled & (labels != labels.max(dim=1, keepdim=True).values)).any(dim=1)
    if not bool(contributing.any()):
        return features.sum() * 0.0
    return per_image[contributing].mean()


def anchor_penalty(prompted: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """How far the prompt moved normal patches from the frozen backbone's, in the embedding the memory stores:
    mean over patches of ||prompted - frozen||^2 divided by the mean ||frozen||^2, so a uniform 10 % drift costs
    0.01 whatever the backbone's feature scale. Added to SCL with weight --prompt_anchor (ours, not released)."""
    frozen = frozen.float()
    return ((prompted - frozen) ** 2).sum(-1).mean() / (frozen ** 2).sum(-1).mean().clamp_min(1e-12)
