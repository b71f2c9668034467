"""The UCAD model: a frozen backbone plus, per learned task, its keys, prompt, knowledge and thresholds.

`UcadModel.score` is the one way images are scored (routing by keys, then the routed task's patch scores and
anomaly maps); it, the continual evaluator and threshold calibration all rest on one per-task primitive,
`score_patches`. The model file written by `save` is self-contained: the backbone's weights travel inside it
(safetensors), so a machine without network or weight packages loads it with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ucad.anomaly_map import anomaly_maps, image_scores
from ucad.backbones import FeatureExtractor
from ucad.config import ModelConfig, RunConfig, from_dict, to_dict
from ucad.device import OutOfMemoryRetry, autocast, autocast_dtype, keep_fp32_exact
from ucad.errors import UcadError
from ucad.knowledge import PackedKnowledge
from ucad.nearest_neighbor import NearestNeighbourScorer
from ucad.patch_features import PatchEmbedder
from ucad.router import TaskKeyIndex, route
from ucad.thresholds import Threshold

MODEL_FORMAT = "ucad-model"
MODEL_FORMAT_VERSION = 2
KNOWLEDGE = "knowledge"
UNLIMITED = "knowledge_unlimited"
MAP_CHUNK = 64  # anomaly maps are upsampled this many at a time, to bound device memory


@dataclass
class TaskMemory:
    name: str
    keys: torch.Tensor | None  # (key_size, D) frozen features: task identity
    prompt_state: dict[str, torch.Tensor] | None  # None in PatchCore mode (no prompt)
    knowledge: torch.Tensor  # (memory_size, D) prompted features: what normal looks like
    knowledge_unlimited: torch.Tensor | None = None  # (basic_size, D) the larger-memory variant
    extra: dict = field(default_factory=dict)
    thresholds: dict[str, Threshold] = field(default_factory=dict)  # bank name -> its thresholds
    packed: PackedKnowledge | None = None  # how `knowledge` is stored (fp32 / fp16 / PQ codes); None = fp32

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this task keeps for routing and scoring (the unlimited variant is a reference, not counted)."""
        def size(tensors):
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)
        knowledge = self.packed.nbytes if self.packed is not None else size([self.knowledge])
        return {"keys": size([self.keys]), "prompt": size((self.prompt_state or {}).values()),
                "knowledge": knowledge}


@dataclass
class ScoredImages:
    """What `UcadModel.score` returns for N images (all on the CPU)."""

    routed_task: torch.Tensor  # (N,) long: the task each image was scored as
    key_distances: torch.Tensor  # (N, T) mean nearest-key distance to every task (routing compares these)
    patch_scores: torch.Tensor  # (N, P) each patch's distance to the routed task's knowledge
    image_scores: torch.Tensor  # (N,) the largest patch score
    anomaly_maps: torch.Tensor  # (N, S, S) upsampled, smoothed patch scores


class UcadModel:
    BANKS = (KNOWLEDGE, UNLIMITED)

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
        # without a scorer from the run, the run's default nearest-neighbour settings (so a loaded model scores
        # as the run that made it did)
        self.scorer = scorer or NearestNeighbourScorer(config.anomaly_scorer_num_nn, RunConfig.nn_backend, device,
                                                       RunConfig.faiss_on_gpu, RunConfig.faiss_num_workers,
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

    # ------------------------------------------------------------------ features
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
        features, _ = self.embedder([m.float() for m in maps])
        return features

    def scl_features(self, images_uint8: torch.Tensor, prompt: torch.nn.Module) -> tuple[torch.Tensor, tuple[int, int]]:
        """What the structure-contrastive loss sees, as in the released code: the extractor's raw features of the
        deepest extracted layer (ViT: that block's patch tokens, 768-d for ViT-B; CNN: that stage's map resized to
        the patch grid), not the pooled PatchCore embedding. Returns (B, P, C) float32 and the grid."""
        raw, grid, _ = self.training_features(images_uint8, prompt, "raw", embedded=False)
        return raw, grid

    def training_features(self, images_uint8: torch.Tensor, prompt: torch.nn.Module, scl_features: str = "raw",
                          embedded: bool = False) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor | None]:
        """One prompted forward for prompt training: (what SCL sees, its grid, and with `embedded` the (B, P, D)
        embedding the memory stores, for --prompt_anchor). scl_features "embedded" makes SCL see that embedding."""
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
        halves what callers cache at no cost; in PatchCore mode these are also the features scored against the
        memory bank and stay fp32."""
        dtype = torch.float32 if self.config.mode == "patchcore" else torch.float16
        return self.features(images_uint8, None, batch_size, description, out_dtype=dtype)

    # ------------------------------------------------------------------ scoring
    def key_index(self, tasks=None) -> TaskKeyIndex:
        """The keys of `tasks` (default: all), searched together: routing's one search over every task."""
        tasks = range(len(self.tasks)) if tasks is None else tasks
        return TaskKeyIndex([self.tasks[k].keys for k in tasks], self.config.patch_distance, self.device)

    def key_distances(self, frozen: torch.Tensor, tasks=None) -> torch.Tensor:
        """(N, P, D) frozen features -> (N, len(tasks)) mean nearest-key distance to each task (default: all)."""
        return self.key_index(tasks).distances(frozen)

    @torch.no_grad()
    def patch_scores(self, images_uint8: torch.Tensor, prompt: torch.nn.Module | None,
                     banks: dict[str, torch.Tensor | None], frozen: torch.Tensor | None = None,
                     batch_size: int = 32) -> dict[str, torch.Tensor]:
        """The scoring primitive: the images' features under `prompt` (None: the frozen backbone), each patch's
        distance to its nearest vectors of each knowledge bank given. Returns bank -> (N, P) float32 on the CPU.

        `frozen`, the images' unprompted features as `frozen_features` gives them, saves recomputing them in
        PatchCore mode, where they are the features that are scored (kept in fp32 there)."""
        if self.config.mode == "patchcore" and frozen is not None:
            features = frozen.to(self.device).float()
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
              description: str | None = None) -> ScoredImages:
        """Score (N,3,S,S) uint8 images: each is routed to the task with the nearest keys (or, with `task`, scored
        as that task) and scored against that task's knowledge."""
        if not self.tasks:
            raise UcadError("the model holds no learned task: nothing to score against")
        parts = []
        key_index = self.key_index()
        starts = range(0, images_uint8.shape[0], batch_size)
        for start in tqdm(starts, desc=description, disable=description is None, unit="batch"):
            batch = images_uint8[start:start + batch_size]
            frozen = self.frozen_features(batch, batch_size)
            distances = key_index.distances(frozen).cpu()
            routes = route(distances) if task is None else torch.full((batch.shape[0],), task, dtype=torch.long)
            patch_scores = torch.empty(batch.shape[0], self.patches)
            for chosen in routes.unique().tolist():
                members = routes == chosen
                patch_scores[members] = self.score_patches(batch[members], chosen,
                                                           frozen=frozen[members.to(frozen.device)],
                                                           batch_size=batch_size)[KNOWLEDGE]
            parts.append((routes, distances, patch_scores, self.anomaly_maps(patch_scores).cpu()))
        routes, distances, patch_scores, maps = (torch.cat(column) for column in zip(*parts))
        return ScoredImages(routes, distances, patch_scores, image_scores(patch_scores), maps)

    # ------------------------------------------------------------------ persistence
    def state(self, banks: tuple[str, ...] = BANKS) -> dict:
        """The learned tasks as tensors and plain values (what checkpoints hold; loads with weights_only)."""
        return {"format_version": MODEL_FORMAT_VERSION, "config": to_dict(self.config), "grid": list(self.grid),
                "tasks": [_task_state(t, banks) for t in self.tasks]}

    def load_tasks(self, state: dict) -> None:
        self.tasks = []
        for t in state["tasks"]:
            packed = PackedKnowledge.from_state(t["knowledge_packed"], self.device) if t.get("knowledge_packed") \
                else None
            knowledge = packed.decode() if packed is not None else _to(t["knowledge"], self.device)
            thresholds = {bank: Threshold.from_dict(v) for bank, v in (t.get("thresholds") or {}).items()}
            self.tasks.append(TaskMemory(t["name"], _to(t["keys"], self.device), _to(t["prompt_state"], self.device),
                                         knowledge, _to(t.get("knowledge_unlimited"), self.device),
                                         t.get("extra", {}), thresholds, packed))

    def save(self, path: Path, run_configuration: dict | None = None, full: bool = False) -> None:
        """One self-contained file: backbone weights (safetensors), tasks, thresholds, configuration. Without
        `full`, what scoring never uses stays out: the unlimited knowledge and the backbone beyond the deepest
        extracted layer (classifier included)."""
        from safetensors.torch import save as safetensors_bytes

        weights = (self.extractor.model.state_dict() if full
                   else self.extractor.scoring_state_dict(self.config.imagesize))
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
        banks = self.BANKS if full else (KNOWLEDGE,)
        state = {
            **self.state(banks),
            "format": MODEL_FORMAT,
            "backbone": {"safetensors": safetensors_bytes(weights), "complete": full,
                         "input_norm": self.extractor.input_norm, "mean": list(self.extractor.mean),
                         "std": list(self.extractor.std), "source": self.extractor.weights_description},
            "run_configuration": run_configuration or {},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(path.suffix + ".tmp")
        torch.save(state, temporary)
        temporary.replace(path)  # never leave a half-written model behind a crash

    @classmethod
    def load(cls, path: Path, device: torch.device, weights: str | None = None, precision: str | None = None,
             scorer: NearestNeighbourScorer | None = None) -> "UcadModel":
        """A model written by `save`. The backbone is built without pretrained weights (no hub, no package) and
        given the stored ones; `weights` (auto | hub | random | PATH) takes them from elsewhere instead. Without
        `precision`, the arithmetic the model was trained with (its thresholds were computed with it)."""
        path = Path(path)
        if not path.is_file():
            raise UcadError(f"model file '{path}' does not exist (it is written by --save_patchcore_model)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UcadError(f"cannot read model file '{path}' ({first}); models saved before format "
                            f"{MODEL_FORMAT_VERSION} need the run again with --save_patchcore_model") from None
        if (not isinstance(state, dict) or state.get("format") != MODEL_FORMAT
                or state.get("format_version") != MODEL_FORMAT_VERSION):
            raise UcadError(f"'{path}' is not a UCAD model file of format {MODEL_FORMAT_VERSION} (written by "
                            "--save_patchcore_model); rerun the experiment to save one")
        config = from_dict(ModelConfig, state["config"])
        stored = state["backbone"]
        if weights is None:
            from safetensors.torch import load as safetensors_load

            config.weights = "random"  # the architecture only: its weights come from the file
            extractor = FeatureExtractor(config.backbone, config.layers, "random", config.imagesize,
                                         stored["input_norm"])
            extractor.mean, extractor.std = tuple(stored["mean"]), tuple(stored["std"])
            try:
                extractor.load_scoring_state_dict(safetensors_load(stored["safetensors"]), config.imagesize,
                                                  f"model file '{path}'")
            except RuntimeError as error:  # shapes that do not fit
                raise UcadError(f"model file '{path}': its backbone weights do not fit {config.backbone} "
                                f"({str(error).splitlines()[0]})") from None
            extractor.weights_description = f"{stored['source']} (stored in {path.name})"
        else:
            config.weights = weights
            extractor = None
        if precision is None:
            precision = state.get("run_configuration", {}).get("run", {}).get("precision", "fp32")
        model = cls(config, device, precision, extractor, scorer)
        if tuple(state["grid"]) != model.grid:
            raise UcadError(f"model file '{path}': stored patch grid {tuple(state['grid'])} differs from the "
                            f"rebuilt backbone's {model.grid}")
        model.load_tasks(state)
        model.run_configuration = state.get("run_configuration", {})
        return model


def _task_state(task: TaskMemory, banks: tuple[str, ...]) -> dict:
    return {"name": task.name, "keys": _cpu(task.keys), "prompt_state": _cpu(task.prompt_state),
            # packed knowledge is stored as packed (its bytes are the point); scoring uses its decoded vectors
            "knowledge": None if task.packed is not None else _cpu(task.knowledge),
            "knowledge_packed": _cpu(task.packed.state()) if task.packed is not None else None,
            "knowledge_unlimited": _cpu(task.knowledge_unlimited) if UNLIMITED in banks else None,
            "thresholds": {bank: t.as_dict() for bank, t in task.thresholds.items() if bank in banks},
            "extra": task.extra}


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
