"""The UCAD model: a frozen backbone plus, per learned task, its keys, prompt, knowledge and thresholds. It extracts
features and scores patches; routing and scoring images (`score`) are `ucad.model.scoring`, saving and loading
`ucad.persistence.model_file`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ucad.model.anomaly_map import anomaly_maps
from ucad.model.backbones import FeatureExtractor
from ucad.config import ModelConfig
from ucad.runtime.device import OutOfMemoryRetry, autocast, autocast_dtype, keep_fp32_exact
from ucad.model.task_memory import TaskMemory
from ucad.model.nearest_neighbor import NearestNeighbourScorer
from ucad.model.patch_features import PatchEmbedder
from ucad.model.router import TaskKeyIndex, route_trust_threshold, routing_statistics
from ucad.model.scoring import BANKS, KNOWLEDGE, UNLIMITED, ScoreCache, ScoredImages, score_images  # noqa: F401


class UcadModel:
    def __init__(self, config: ModelConfig, device: torch.device, precision: str = "fp32",
                 extractor: FeatureExtractor | None = None, scorer: NearestNeighbourScorer | None = None):
        self.config, self.device = config, device
        self.extractor = (extractor or FeatureExtractor(config.backbone, config.layers, config.weights,
                                                        config.imagesize, config.input_norm)).to(device)
        self.embedder = PatchEmbedder(config.patchsize, config.pretrain_embed_dimension, config.target_embed_dimension)
        self.amp_dtype = autocast_dtype(device, precision)
        keep_fp32_exact(device)
        self.scorer = scorer or NearestNeighbourScorer(config.anomaly_scorer_num_nn, device=device,
                                                       patch_distance=config.patch_distance)
        self.tasks: list[TaskMemory] = []
        self.run_configuration: dict = {}  # the configuration of the run that made a loaded model
        # per requested --feature_batch_size: once halved after running out of GPU memory, it stays halved
        self.feature_batches: dict[int, OutOfMemoryRetry] = {}
        maps = self.extractor.feature_maps_of_size(config.imagesize)
        self.grid: tuple[int, int] = self.embedder.grid_of(tuple(max(m.shape[d] for m in maps) for d in (2, 3)))

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def new_prompt(self, seed: int) -> torch.nn.Module:
        return self.extractor.new_prompt(self.config.prompt_length, torch.Generator().manual_seed(seed)).to(self.device)

    def prompt_for(self, task_index: int) -> torch.nn.Module | None:
        if (state := self.tasks[task_index].prompt_state) is None:
            return None
        prompt = self.extractor.new_prompt(self.config.prompt_length).to(self.device)
        prompt.load_state_dict(state)
        return prompt.requires_grad_(False)

    def embed(self, images_uint8: torch.Tensor, prompt: torch.nn.Module | None = None) -> torch.Tensor:
        """(B,3,S,S) uint8 on the device -> (B, P, D) float32 patch features (with grad if the prompt has)."""
        with autocast(self.device, self.amp_dtype):
            maps = self.extractor(images_uint8, prompt)
        return self.embedder([m.float() for m in maps])[0]

    def training_features(self, images_uint8: torch.Tensor, prompt: torch.nn.Module, scl_features: str = "raw",
                          embedded: bool = False) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor | None]:
        """One prompted forward for prompt training: (what SCL sees, its grid, and with `embedded` the (B, P, D)
        embedding the memory stores, for --prompt_anchor). With scl_features "raw", SCL sees what the released code
        gives it: the extractor's raw features of the deepest extracted layer (ViT: that block's patch tokens; CNN:
        that stage's map resized to the patch grid); "embedded" makes it see the stored embedding."""
        with autocast(self.device, self.amp_dtype):
            maps = [m.float() for m in self.extractor(images_uint8, prompt)]
        stored = self.embedder(maps)[0] if embedded or scl_features == "embedded" else None
        if scl_features == "embedded":
            return stored, self.grid, stored if embedded else None
        grid = self.embedder.grid_of(tuple(max(m.shape[d] for m in maps) for d in (2, 3)))
        deepest = maps[-1]  # layers are kept in network order
        if tuple(deepest.shape[2:]) != grid:
            deepest = F.interpolate(deepest, size=grid, mode="bilinear", align_corners=False)
        return deepest.flatten(2).transpose(1, 2), grid, stored

    @torch.no_grad()
    def features(self, images_uint8: torch.Tensor, prompt: torch.nn.Module | None = None, batch_size: int = 32,
                 description: str | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
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

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The one precision of routing's features, test images' and those --routing's statistics measure: routing
        compares means of key distances, so fp16 halves what callers cache at no cost; where tasks learn no prompt
        these are also the features scored against the knowledge, and stay fp32."""
        return torch.float16 if self.config.learns_prompts else torch.float32

    def frozen_features(self, images_uint8: torch.Tensor, batch_size: int = 32,
                        description: str | None = None) -> torch.Tensor:
        return self.features(images_uint8, None, batch_size, description, out_dtype=self.frozen_dtype)

    def routing_statistics(self, keys: torch.Tensor, training: torch.Tensor, held_out_images: torch.Tensor | None,
                           batch_size: int = 32, routing: str | None = None) -> dict[str, torch.Tensor]:
        """What `routing` (default: --routing) needs of a task beyond its `keys`, measured on its held-out normal
        images (uint8) where there are, whose distances to the keys are those of unseen images, else on `training`,
        the (N, P, D) frozen features the keys were chosen from; either at `frozen_dtype`, as test images are."""
        routing = routing or self.config.routing
        if routing == "mean":
            return {}
        held_out = held_out_images is not None and held_out_images.shape[0] > 0
        normal = self.frozen_features(held_out_images, batch_size) if held_out else training.to(self.frozen_dtype)
        return routing_statistics(normal, keys, routing, self.config.patch_distance)

    def route_trust_threshold(self, tasks: int | None = None) -> float | None:
        """The margin below which a route among the first `tasks` learned tasks (default: all) is not trusted."""
        held_out = [t.routing["held_out_margins"] for t in self.tasks[:tasks] if "held_out_margins" in t.routing]
        return route_trust_threshold(held_out, self.config.route_trust_quantile)

    def key_index(self, tasks=None) -> TaskKeyIndex:
        tasks = range(len(self.tasks)) if tasks is None else tasks
        return TaskKeyIndex([self.tasks[k].keys for k in tasks], self.config.patch_distance, self.device)

    @torch.no_grad()
    def patch_scores(self, images_uint8: torch.Tensor, prompt: torch.nn.Module | None,
                     banks: dict[str, torch.Tensor | None], frozen: torch.Tensor | None = None,
                     batch_size: int = 32) -> dict[str, torch.Tensor]:
        """The scoring primitive: the images' features under `prompt` (None: the frozen backbone), each patch's
        distance to its nearest vectors of each knowledge bank given. Returns bank -> (N, P) float32 on the CPU.

        `frozen`, the images' unprompted features as `frozen_features` gives them, is scored as it is when there
        is no prompt and it is kept at full precision, instead of computing the same features again."""
        reuse = prompt is None and frozen is not None and frozen.dtype == torch.float32
        features = frozen.to(self.device) if reuse else self.features(images_uint8, prompt, batch_size)
        return {bank: self.scorer.distances(features.flatten(0, 1), knowledge).reshape(features.shape[:2]).float().cpu()
                for bank, knowledge in banks.items() if knowledge is not None}

    def score_patches(self, images_uint8: torch.Tensor, task: int, banks: tuple[str, ...] = (KNOWLEDGE,),
                      frozen: torch.Tensor | None = None, batch_size: int = 32) -> dict[str, torch.Tensor]:
        """Images scored as belonging to learned task `task`: under its prompt, against each of its knowledge banks
        named in `banks` that it holds (bank -> (N, P) patch scores on the CPU)."""
        memory = self.tasks[task]
        return self.patch_scores(images_uint8, self.prompt_for(task), {bank: getattr(memory, bank) for bank in banks},
                                 frozen, batch_size)

    def anomaly_maps(self, patch_scores: torch.Tensor) -> torch.Tensor:
        return anomaly_maps(patch_scores, self.grid, self.config.imagesize, self.config.smoothing_sigma, self.device)

    score = score_images  # routing and scoring many images: ucad.model.scoring
