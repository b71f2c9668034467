"""Task-specific prompts: the only parameters UCAD trains.

ViT backbones get prefix prompts (DualPrompt's E-prompt): per transformer layer, `length` learnable key tokens and
value tokens prepended to the attention's keys and values. CNN backbones, which have no attention to prefix, get a
per-channel scale and shift at the input of every stage up to the deepest extracted one, starting as the identity."""
from __future__ import annotations

import torch
from torch import nn


class PrefixPrompt(nn.Module):
    """tokens[layer, 0] are the prefix keys and tokens[layer, 1] the prefix values of that layer."""

    def __init__(self, num_layers: int, length: int, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.tokens = nn.Parameter(torch.rand(num_layers, 2, length, dim, generator=generator) * 2.0 - 1.0)

    def is_identity(self) -> bool:
        return False  # prefix tokens always take part in attention


class ChannelPrompt(nn.Module):
    """x -> x * (1 + scale) + shift per channel, at the input of each prompted stage."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.scale = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in channels])
        self.shift = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in channels])

    def is_identity(self) -> bool:
        """True while the prompt leaves every feature as it is, bit for bit (x * 1 + 0)."""
        return all(not p.any() for p in (*self.scale, *self.shift))

    def scale_and_shift(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        scale, shift = (p[stage].view(1, -1, 1, 1).to(x.dtype) for p in (self.scale, self.shift))
        return x * (1.0 + scale) + shift
