"""The UCAD model: a frozen backbone plus, per learned task, its keys, prompt, knowledge and thresholds.

`UcadModel.score` is the one place where images are routed by keys and scored under the chosen task: `ucad.predict`
and the continual evaluator (with a `ScoreCache` per test set) both go through it. Saving and loading live in
`ucad.persistence.model_file`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ucad.model.anomaly_map import anomaly_maps, image_scores
from ucad.model.backbones import FeatureExtractor
from ucad.config import ModelConfig
from ucad.runtime.device import OutOfMemoryRetry, autocast, autocast_dtype, keep_fp32_exact
from ucad.runtime.errors import UcadError
from ucad.model.task_memory import TaskMemory
from ucad.model.nearest_neighbor import NearestNeighbourScorer
from ucad.model.patch_features import PatchEmbedder
from ucad.model.router import TaskKeyIndex, route, routing_scores
from ucad.runtime.timing import PhaseTimer

KNOWLEDGE = "knowledge"
UNLIMITED = "knowledge_unlimited"
BANKS = (KNOWLEDGE, UNLIMITED)  # the task's knowledge, and the larger-memory reference variant
MAP_CHUNK = 64  # anomaly maps are upsampled this many at a time, to bound device memory


@dataclass
class ScoredImages:
    """What `UcadModel.score` returns for N images (all on the CPU)."""

    routed_task: torch.Tensor  # (N,) long: the task each image was scored as
    key_distances: torch.Tensor  # (N, T) mean nearest-key distance to every task (routing compares these)
    patch_scores: torch.Tensor  # (N, P) each patch's distance to the routed task's knowledge
    image_scores: torch.Tensor  # (N,) the largest patch score
    anomaly_maps: torch.Tensor | None  # (N, S, S) upsampled, smoothed patch scores; None when not asked for


@dataclass
class ScoreCache:
    """What scoring one fixed set of images may reuse between calls of `UcadModel.score`: a learned task's keys,
    prompt and knowledge never change, so neither do the images' distances to its keys nor their patch scores under
    it. Patch scores of all `banks` are computed together, since they share the prompted features."""

    banks: tuple[str, ...] = (KNOWLEDGE,)
    timer: PhaseTimer | None = None  # charges feature extraction, routing and scoring to their phases
    frozen: torch.Tensor | None = None  # (N, P, D) unprompted features on the model's device
    key_distance: dict[int, torch.Tensor] = field(default_factory=dict)  # task -> (N,) on the CPU
    # (task, bank) -> (N, P) on the CPU; rows of nan are not computed yet
    patch_scores: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def phase(self, name: str, items: int):
        return self.timer.phase(name, items) if self.timer is not None else contextlib.nullcontext()

    @property
    def nbytes(self) -> int:
        tensors = [self.frozen, *self.key_distance.values(), *self.patch_scores.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class UcadModel:
    BANKS = BANKS

    def __init__(self, config: ModelConfig, device: torch.device, precision: str = "fp32",
                 extractor: FeatureExtractor | None = None, scorer: NearestNeighbourScorer | None = None):
        self.config = config
        self.device = device
        self.extractor = extractor or FeatureExtractor(config.backbone, config.layers, config.weights,
                                                       config.imagesize, config.input_norm)
        self.extractor.to(device)
        self.embedder = PatchEmbedder(config.patchsize, config.pretrain_embed_dimension,
                                      config.target_embed_dimension)
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
        generator = torch.Generator().manual_seed(seed)
        return self.extractor.new_prompt(self.config.prompt_length, generator).to(self.device)

    def prompt_for(self, task_index: int) -> torch.nn.Module | None:
        state = self.tasks[task_index].prompt_state
        if state is None:
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
            maps = self.extractor(images_uint8, prompt)
        maps = [m.float() for m in maps]
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

    def frozen_features(self, images_uint8: torch.Tensor, batch_size: int = 32,
                        description: str | None = None) -> torch.Tensor:
        """Unprompted features, as routing uses them. Routing only compares means of key distances, so fp16
        halves what callers cache at no cost; where tasks learn no prompt these are also the features scored
        against the knowledge, and stay fp32."""
        dtype = torch.float16 if self.config.learns_prompts else torch.float32
        return self.features(images_uint8, None, batch_size, description, out_dtype=dtype)

    def key_index(self, tasks=None) -> TaskKeyIndex:
        """The keys of `tasks` (default: all), searched together: routing's one search over every task."""
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
        if prompt is None and frozen is not None and frozen.dtype == torch.float32:
            features = frozen.to(self.device)
        else:
            features = self.features(images_uint8, prompt, batch_size)
        n, p, d = features.shape
        return {bank: self.scorer.distances(features.reshape(n * p, d), knowledge).reshape(n, p).float().cpu()
                for bank, knowledge in banks.items() if knowledge is not None}

    def score_patches(self, images_uint8: torch.Tensor, task: int, banks: tuple[str, ...] = (KNOWLEDGE,),
                      frozen: torch.Tensor | None = None, batch_size: int = 32) -> dict[str, torch.Tensor]:
        """Images scored as belonging to learned task `task`: under its prompt, against each of its knowledge banks
        named in `banks` that it holds (bank -> (N, P) patch scores on the CPU)."""
        memory = self.tasks[task]
        return self.patch_scores(images_uint8, self.prompt_for(task), {bank: getattr(memory, bank) for bank in banks},
                                 frozen, batch_size)

    def anomaly_maps(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """(N, P) patch scores -> (N, S, S) anomaly maps on the model's device."""
        if patch_scores.shape[0] == 0:
            return torch.empty(0, self.config.imagesize, self.config.imagesize, device=self.device)
        return torch.cat([anomaly_maps(patch_scores[s:s + MAP_CHUNK].to(self.device), self.grid,
                                       self.config.imagesize, self.config.smoothing_sigma)
                          for s in range(0, patch_scores.shape[0], MAP_CHUNK)])

    @torch.no_grad()
    def score(self, images_uint8: torch.Tensor, task: int | None = None, batch_size: int = 32,
              description: str | None = None, bank: str = KNOWLEDGE, tasks: int | None = None,
              cache: ScoreCache | None = None, maps: bool = True) -> ScoredImages:
        """Score (N,3,S,S) uint8 images: each is routed to the task with the nearest keys among the first `tasks`
        (default: all) or, with `task`, scored as that task; then scored against that task's knowledge `bank`.

        Without a cache the images are taken `batch_size` at a time (bounded memory, nothing kept). With one, the
        images must be the ones the cache was made for, and everything it already holds is reused."""
        if not self.tasks:
            raise UcadError("the model holds no learned task: nothing to score against")
        tasks = len(self.tasks) if tasks is None else tasks
        if cache is not None:
            return self._score(images_uint8, task, bank, tasks, cache, batch_size, maps)
        starts = range(0, images_uint8.shape[0], batch_size)
        parts = [self._score(images_uint8[start:start + batch_size], task, bank, tasks, ScoreCache(), batch_size, maps)
                 for start in tqdm(starts, desc=description, disable=description is None, unit="batch")]
        columns = [[getattr(part, name) for part in parts] for name in ScoredImages.__dataclass_fields__]
        return ScoredImages(*(torch.cat(column) if column[0] is not None else None for column in columns))

    def _score(self, images_uint8: torch.Tensor, task: int | None, bank: str, tasks: int, cache: ScoreCache,
               batch_size: int, maps: bool) -> ScoredImages:
        distances = self._key_distances(images_uint8, tasks, cache, batch_size)
        routes = route(distances) if task is None else torch.full((images_uint8.shape[0],), task, dtype=torch.long)
        patch_scores = torch.empty(images_uint8.shape[0], self.patches)
        for chosen in routes.unique().tolist():
            members = routes == chosen
            patch_scores[members] = self._patch_scores(images_uint8, chosen, bank, members, cache, batch_size)[members]
        return ScoredImages(routes, distances, patch_scores, image_scores(patch_scores),
                            self.anomaly_maps(patch_scores).cpu() if maps else None)

    def _key_distances(self, images_uint8: torch.Tensor, tasks: int, cache: ScoreCache,
                       batch_size: int) -> torch.Tensor:
        """(N, tasks) what routing compares (`ucad.model.router.routing_scores`) on the CPU; only tasks the cache has
        not met are searched."""
        missing = [k for k in range(tasks) if k not in cache.key_distance]
        if missing:
            if cache.frozen is None:
                with cache.phase("test_frozen_features", images_uint8.shape[0]):
                    cache.frozen = self.frozen_features(images_uint8, batch_size)
            with cache.phase("routing", images_uint8.shape[0]):
                distances = self.key_index(missing).distances(cache.frozen)
                for column, k in enumerate(missing):
                    cache.key_distance[k] = routing_scores(distances[:, column], cache.frozen, self.tasks[k].routing,
                                                           self.config.routing).cpu()
        return torch.stack([cache.key_distance[k] for k in range(tasks)], dim=1)

    def _patch_scores(self, images_uint8: torch.Tensor, task: int, bank: str, needed: torch.Tensor,
                      cache: ScoreCache, batch_size: int) -> torch.Tensor:
        """(N, P) patch scores under `task` and `bank`; rows of `needed` the cache lacks are computed."""
        banks = tuple(dict.fromkeys((*cache.banks, bank)))
        if (task, bank) not in cache.patch_scores:
            for name in banks:
                cache.patch_scores[(task, name)] = torch.full((images_uint8.shape[0], self.patches), float("nan"))
        missing = needed & torch.isnan(cache.patch_scores[(task, bank)][:, 0])
        if missing.any():
            index = torch.nonzero(missing).flatten()
            frozen = cache.frozen[index.to(cache.frozen.device)] if cache.frozen is not None else None
            with cache.phase("scoring", len(index)):
                scores = self.score_patches(images_uint8[index], task, banks, frozen, batch_size)
            for name, values in scores.items():
                cache.patch_scores[(task, name)][index] = values
        return cache.patch_scores[(task, bank)]
