"""The UCAD model: a frozen backbone plus, per learned task, its keys, prompt and knowledge.

This is also the file format of --save_patchcore_model: everything needed to score new images
without knowing their task, and nothing of the training images themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ucad.backbones import FeatureExtractor
from ucad.device import OutOfMemoryRetry, autocast, autocast_dtype
from ucad.errors import UcadError
from ucad.knowledge import PackedKnowledge
from ucad.patch_features import PatchEmbedder

MODEL_FORMAT_VERSION = 1


@dataclass
class TaskMemory:
    name: str
    keys: torch.Tensor | None  # (key_size, D) frozen features: task identity
    prompt_state: dict[str, torch.Tensor] | None  # None in PatchCore mode (no prompt)
    knowledge: torch.Tensor  # (memory_size, D) prompted features: what normal looks like
    knowledge_unlimited: torch.Tensor | None = None  # (basic_size, D) the larger-memory variant
    extra: dict = field(default_factory=dict)
    packed: PackedKnowledge | None = None  # how `knowledge` is stored (fp32 / fp16 / PQ codes); None = fp32

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this task keeps for routing and scoring (the unlimited variant is a reference, not counted)."""
        def size(tensors):
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)
        knowledge = self.packed.nbytes if self.packed is not None else size([self.knowledge])
        return {"keys": size([self.keys]), "prompt": size((self.prompt_state or {}).values()),
                "knowledge": knowledge}


@dataclass
class ModelConfig:
    backbone: str = "vit_base_patch16_224"
    layers: tuple[str, ...] = ()
    weights: str = "auto"
    input_norm: str = "auto"  # auto = ImageNet mean/std as released, except weight sources trained otherwise
    patchsize: int = 1
    pretrain_embed_dimension: int = 1024
    target_embed_dimension: int = 1024
    prompt_length: int = 1
    imagesize: int = 224
    resize: int = 224
    resize_mode: str = "crop"
    anomaly_scorer_num_nn: int = 1
    patch_distance: str = "squared"  # released: faiss IndexFlatL2 scores (squared L2); "euclidean" takes the root
    smoothing_sigma: float = 4.0
    mode: str = "ucad"


class UcadModel:
    def __init__(self, config: ModelConfig, device: torch.device, precision: str = "auto",
                 extractor: FeatureExtractor | None = None):
        self.config = config
        self.device = device
        self.extractor = extractor or FeatureExtractor(config.backbone, config.layers, config.weights,
                                                       config.imagesize, config.input_norm)
        self.extractor.to(device)
        self.embedder = PatchEmbedder(config.patchsize, config.pretrain_embed_dimension,
                                      config.target_embed_dimension)
        self.amp_dtype = autocast_dtype(device, precision)
        self.tasks: list[TaskMemory] = []
        self.grid: tuple[int, int] | None = None
        # per requested --feature_batch_size: once halved after running out of GPU memory, it stays halved
        self.feature_batches: dict[int, OutOfMemoryRetry] = {}

    def new_prompt(self, task_index: int, seed: int) -> torch.nn.Module:
        generator = torch.Generator().manual_seed(seed * 1000 + task_index)
        return self.extractor.new_prompt(self.config.prompt_length, generator).to(self.device)

    def prompt_for(self, task_index: int) -> torch.nn.Module | None:
        state = self.tasks[task_index].prompt_state
        if state is None:
            return None
        prompt = self.extractor.new_prompt(self.config.prompt_length).to(self.device)
        prompt.load_state_dict(state)
        prompt.requires_grad_(False)
        return prompt

    def embed(self, images_uint8: torch.Tensor, prompt: torch.nn.Module | None = None) -> torch.Tensor:
        """(B,3,S,S) uint8 on the device -> (B, P, D) float32 patch features (with grad if the prompt has)."""
        with autocast(self.device, self.amp_dtype):
            maps = self.extractor(images_uint8, prompt)
        features, self.grid = self.embedder([m.float() for m in maps])
        return features

    def scl_features(self, images_uint8: torch.Tensor, prompt: torch.nn.Module) -> tuple[torch.Tensor, tuple[int, int]]:
        """What the structure-contrastive loss sees, as in the released code: the extractor's raw features of the
        deepest extracted layer (ViT: that block's patch tokens, 768-d for ViT-B; CNN: that stage's map resized to
        the patch grid), not the pooled PatchCore embedding. Returns (B, P, C) float32 and the grid."""
        with autocast(self.device, self.amp_dtype):
            maps = self.extractor(images_uint8, prompt)
        grid = self.embedder.grid_of(tuple(max(m.shape[d] for m in maps) for d in (2, 3)))
        deepest = maps[-1].float()  # layers are kept in network order
        if tuple(deepest.shape[2:]) != grid:
            deepest = F.interpolate(deepest, size=grid, mode="bilinear", align_corners=False)
        return deepest.flatten(2).transpose(1, 2), grid

    @torch.no_grad()
    def features(self, images_uint8: torch.Tensor, prompt: torch.nn.Module | None = None, batch_size: int = 32,
                 description: str | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Features of many images in batches; stays on the device."""
        batches = self.feature_batches.setdefault(
            batch_size, OutOfMemoryRetry(batch_size, "feature extraction", "--feature_batch_size"))
        parts, done = [], 0
        with tqdm(total=images_uint8.shape[0], desc=description, disable=description is None, leave=False) as bar:
            while done < images_uint8.shape[0]:
                part = batches.run(lambda size: self.embed(
                    images_uint8[done:done + size].to(self.device, non_blocking=True), prompt).to(out_dtype))
                parts.append(part)
                done += part.shape[0]
                bar.update(part.shape[0])
        return torch.cat(parts)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict:
        return {
            "format_version": MODEL_FORMAT_VERSION,
            "config": self.config.__dict__,
            "grid": self.grid,
            "tasks": [
                {"name": t.name, "keys": _cpu(t.keys), "prompt_state": _cpu(t.prompt_state),
                 "knowledge": None if t.packed is not None else _cpu(t.knowledge),
                 "knowledge_packed": _cpu(t.packed.state()) if t.packed is not None else None,
                 "knowledge_unlimited": _cpu(t.knowledge_unlimited), "extra": t.extra}
                for t in self.tasks
            ],
        }

    def load_tasks(self, state: dict) -> None:
        self.grid = tuple(state["grid"]) if state.get("grid") else None
        self.tasks = []
        for t in state["tasks"]:
            packed = PackedKnowledge.from_state(t["knowledge_packed"], self.device) if t.get("knowledge_packed") \
                else None
            knowledge = packed.decode() if packed is not None else _to(t["knowledge"], self.device)
            self.tasks.append(TaskMemory(t["name"], _to(t["keys"], self.device), _to(t["prompt_state"], self.device),
                                         knowledge, _to(t["knowledge_unlimited"], self.device), t.get("extra", {}),
                                         packed))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state(), temporary)
        temporary.replace(path)  # never leave a half-written model behind a crash

    @classmethod
    def load(cls, path: Path, device: torch.device, weights: str | None = None, precision: str = "auto") -> "UcadModel":
        path = Path(path)
        if not path.is_file():
            raise UcadError(f"model file '{path}' does not exist (it is written by --save_patchcore_model)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise UcadError(f"cannot read model file '{path}': {error}") from None
        if not isinstance(state, dict) or state.get("format_version") != MODEL_FORMAT_VERSION:
            raise UcadError(f"'{path}' is not a UCAD model file of format {MODEL_FORMAT_VERSION}")
        config = ModelConfig(**{**state["config"], "layers": tuple(state["config"]["layers"])})
        if weights is not None:
            config.weights = weights
        model = cls(config, device, precision)
        model.load_tasks(state)
        return model


def _cpu(value):
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in value.items()}
    return value.detach().cpu()


def _to(value, device):
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return value.to(device)
