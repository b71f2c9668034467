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


def structure_contrastive_loss(features: torch.Tensor, labels: torch.Tensor,
                               temperature: float = 0.5) -> torch.Tensor:
    """features (B, P, D), labels (B, P): mean over images and over pairs i != j of
    -s_ij for same-region pairs and exp(s_ij) for different-region pairs, s = cosine / temperature."""
    normed = F.normalize(features.float(), dim=-1)
    similarity = normed @ normed.transpose(1, 2) / temperature
    same = labels[:, :, None] == labels[:, None, :]
    per_pair = torch.where(same, -similarity, torch.exp(similarity))
    patches = features.shape[1]
    off_diagonal = ~torch.eye(patches, dtype=torch.bool, device=features.device)
    return per_pair[:, off_diagonal].mean()
