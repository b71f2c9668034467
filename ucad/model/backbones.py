"""Feature maps from a frozen timm backbone, with or without a task prompt.

ViTs are run block by block with our own prefix-prompted attention (on top of timm's modules, not a fork); CNNs are
run with forward hooks. Both stop at the deepest extracted layer: UCAD reads block 5 of 12, the rest never runs."""
from __future__ import annotations

import contextlib
import functools
import re

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ucad.runtime.errors import UcadError
from ucad.data.decode import IMAGENET_MEAN, IMAGENET_STD, normalize
from ucad.model.prompt import ChannelPrompt, PrefixPrompt
from ucad.model.weights import create_backbone

DEFAULT_LAYERS_VIT = ["5"]
DEFAULT_LAYERS_CNN = ["2", "3"]  # timm feature stages of stride 8 and 16 (layer2/layer3 of a ResNet)


class _StopForward(Exception):
    """Raised by the hook of the deepest extracted layer so the rest of the network is skipped."""


class FeatureExtractor(nn.Module):
    """images (uint8, B x 3 x S x S) -> list of feature maps (B x C x h x w), one per extracted layer."""

    def __init__(self, backbone_name: str, layers: list[str] | tuple[str, ...], weights: str = "auto",
                 imagesize: int | None = None, input_norm: str = "auto"):
        super().__init__()
        # create_backbone returns the model frozen (eval mode, no gradients)
        self.model, self.weights_description = create_backbone(backbone_name, weights=weights)
        self.is_vit = isinstance(self.model, VisionTransformer)
        if self.is_vit and imagesize and tuple(self.model.patch_embed.img_size) != (imagesize, imagesize):
            # a ViT has a fixed input size: rebuild it for this one (timm resamples the position embedding)
            self.model, self.weights_description = create_backbone(backbone_name, weights=weights, img_size=imagesize)
        self.input_norm = getattr(self.model, "trained_input_norm", "imagenet") if input_norm == "auto" else input_norm
        cfg = (getattr(self.model, "pretrained_cfg", None) or {}) if self.input_norm == "backbone" else {}
        self.mean, self.std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        layers = list(layers) or (DEFAULT_LAYERS_VIT if self.is_vit else DEFAULT_LAYERS_CNN)
        (self._setup_vit if self.is_vit else self._setup_cnn)(layers)

    def _setup_vit(self, layers: list[str]) -> None:
        depth = len(self.model.blocks)
        indices = set()
        for layer in layers:
            if not (match := re.fullmatch(r"(?:blocks\.)?(\d+)", layer)) or int(match.group(1)) >= depth:
                raise UcadError(f"-le/--layers_to_extract_from '{layer}' is not a block of this ViT: use an index "
                                f"0..{depth - 1} or blocks.N (UCAD uses 5)")
            indices.add(int(match.group(1)))
        self.block_indices = sorted(indices)
        self.prompt_layers = self.block_indices[-1] + 1
        for block in self.model.blocks[:self.prompt_layers]:
            missing = [a for a in ("norm1", "attn", "ls1", "norm2", "mlp", "ls2") if not hasattr(block, a)]
            if missing or not hasattr(block.attn, "qkv"):
                raise UcadError(f"backbone block type {type(block).__name__} is not supported for prefix prompts")
        self.layer_names = [f"blocks.{i}" for i in self.block_indices]
        self.channels = [self.model.embed_dim] * len(self.block_indices)

    @staticmethod
    def _attention(attn: nn.Module, x: torch.Tensor, prefix: torch.Tensor | None):
        """timm's attention, with `prefix` (2, length, dim), the prompt's keys and values, before the tokens' own."""
        batch, tokens, _ = x.shape
        q, k, v = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if prefix is not None:
            prefix_k, prefix_v = (p.to(x.dtype).reshape(1, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
                                  .expand(batch, -1, -1, -1) for p in prefix)
            k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        out = getattr(attn, "norm", nn.Identity())(out)
        if (gate := getattr(attn, "gate", None)) is not None:
            out = out * gate(x).sigmoid()
        return attn.proj(out)

    def _vit_features(self, x: torch.Tensor, prompt: PrefixPrompt | None) -> list[torch.Tensor]:
        model = self.model
        x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        outputs = []
        for index, block in enumerate(model.blocks[:self.prompt_layers]):
            prefix = prompt.tokens[index] if prompt is not None and index < prompt.tokens.shape[0] else None
            x = x + block.ls1(self._attention(block.attn, block.norm1(x), prefix))
            x = x + block.ls2(block.mlp(block.norm2(x)))
            if index in self.block_indices:
                patches = x[:, model.num_prefix_tokens:]
                outputs.append(patches.transpose(1, 2).reshape(x.shape[0], -1, *model.patch_embed.grid_size))
        return outputs

    def _setup_cnn(self, layers: list[str]) -> None:
        modules = dict(self.model.named_modules())
        stages = [entry["module"] for entry in getattr(self.model, "feature_info", [])]
        names = []
        for layer in layers:
            if layer.isdigit():
                if int(layer) >= len(stages):
                    raise UcadError(f"-le '{layer}': this backbone has feature stages 0..{len(stages) - 1} ({stages})")
                layer = stages[int(layer)]
            elif layer not in modules:
                raise UcadError(f"-le/--layers_to_extract_from '{layer}' is not a module of this backbone; "
                                f"its feature stages are {stages} (or give their index 0..{len(stages) - 1})")
            names.append(layer)
        self.layer_names = sorted(set(names), key=list(modules).index)  # in network order
        # the prompted stages: the deepest layer and its numbered predecessors (layer1..layer3, blocks.0..blocks.2)
        numbered = re.fullmatch(r"(.*\.|\D+)(\d+)", self.layer_names[-1])
        self.prompt_stage_names = [self.layer_names[-1]] if numbered is None else [
            f"{numbered.group(1)}{i}" for i in range(int(numbered.group(2)) + 1)
            if f"{numbered.group(1)}{i}" in modules]
        self._stage_channels = [0] * len(self.prompt_stage_names)
        for name in self.layer_names:
            modules[name].register_forward_hook(functools.partial(self._capture_output, name))
        for stage_index, name in enumerate(self.prompt_stage_names):
            modules[name].register_forward_pre_hook(functools.partial(self._prompt_stage_input, stage_index))
        # one dry run on a small image finds the channel counts the prompts need
        with torch.no_grad():
            self.channels = [m.shape[1] for m in self._cnn_features(torch.zeros(1, 3, 64, 64), None)]

    def _capture_output(self, name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._captured[name] = output
        if name == self.layer_names[-1]:
            raise _StopForward

    def _prompt_stage_input(self, stage_index: int, module: nn.Module, inputs: tuple) -> tuple | None:
        self._stage_channels[stage_index] = inputs[0].shape[1]
        if self._active_prompt is not None:  # else None: the input passes unchanged
            return (self._active_prompt.scale_and_shift(stage_index, inputs[0]), *inputs[1:])

    def _cnn_features(self, x: torch.Tensor, prompt: ChannelPrompt | None) -> list[torch.Tensor]:
        self._captured, self._active_prompt = {}, prompt
        with contextlib.suppress(_StopForward):
            self.model(x)
        self._active_prompt = None
        return [self._captured[name] for name in self.layer_names]

    def new_prompt(self, length: int, generator: torch.Generator | None = None) -> nn.Module:
        if self.is_vit:
            return PrefixPrompt(self.prompt_layers, length, self.model.embed_dim, generator=generator)
        return ChannelPrompt(self._stage_channels)

    def describe(self, prompts: bool = True) -> str:
        kind = "ViT, prefix prompts on blocks 0..%d" % (self.prompt_layers - 1) if self.is_vit else (
            "CNN, channel prompts at the inputs of " + ", ".join(self.prompt_stage_names))
        if not prompts:
            kind = ("ViT" if self.is_vit else "CNN") + ", frozen, no prompts"
        return (f"{self.weights_description}; extracting {', '.join(self.layer_names)} ({kind}); "
                f"input normalised with mean {self.mean} std {self.std} (--input_norm {self.input_norm})")

    @torch.no_grad()
    def feature_maps_of_size(self, imagesize: int) -> list[torch.Tensor]:
        """The feature maps of one blank image of the given size (their shapes give the patch grid)."""
        device = next(self.model.parameters()).device
        return self(torch.zeros(1, 3, imagesize, imagesize, dtype=torch.uint8, device=device))

    def scoring_state_dict(self, imagesize: int) -> dict[str, torch.Tensor]:
        """The backbone's parameters and buffers that feature extraction runs through (found by running it), plus the
        model's own (ViT position embedding, class token): later blocks and the classifier never run here."""
        called = {""}  # the model's own tensors
        with contextlib.ExitStack() as hooks:
            for name, module in self.model.named_modules():
                hooks.enter_context(module.register_forward_pre_hook(lambda *_, name=name: called.add(name)))
            self.feature_maps_of_size(imagesize)
        return {key: value for key, value in self.model.state_dict().items() if key.rpartition(".")[0] in called}

    def load_scoring_state_dict(self, state_dict: dict[str, torch.Tensor], imagesize: int, source: str) -> None:
        if missing := sorted(set(self.scoring_state_dict(imagesize)) - set(state_dict)):
            raise UcadError(f"{source}: the stored backbone lacks {len(missing)} tensor(s) feature extraction needs "
                            f"(e.g. {missing[0]}): the model file is damaged or from another backbone")
        result = self.model.load_state_dict(state_dict, strict=False)
        if result.unexpected_keys:
            raise UcadError(f"{source}: the stored backbone has tensors this backbone lacks "
                            f"(e.g. {result.unexpected_keys[0]}): the model file is from another backbone")

    def forward(self, images_uint8: torch.Tensor, prompt: nn.Module | None = None) -> list[torch.Tensor]:
        x = normalize(images_uint8, self.mean, self.std)
        return self._vit_features(x, prompt) if self.is_vit else self._cnn_features(x, prompt)
