"""Route and score, `UcadModel.score`: the one path of `ucad.predict` and of the continual evaluator, which keeps a
`ScoreCache` per test set."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ucad.model.anomaly_map import image_scores
from ucad.model.router import route, routing_margin, task_distances
from ucad.runtime.errors import UcadError
from ucad.runtime.timing import PhaseTimer

KNOWLEDGE = "knowledge"
UNLIMITED = "knowledge_unlimited"
BANKS = (KNOWLEDGE, UNLIMITED)  # the task's knowledge, and the larger-memory reference variant


@dataclass
class ScoredImages:
    """What `UcadModel.score` returns for N images (all on the CPU)."""

    routed_task: torch.Tensor  # (N,) long: the task each image was scored as
    key_distances: torch.Tensor  # (N, T) mean nearest-key distance to every task (routing compares these)
    routing_margins: torch.Tensor  # (N,) relative gap between the best and the runner-up task (inf: one task)
    route_trusted: torch.Tensor | None  # (N,) bool: margin at least the model's trust threshold; None: it has none
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


@torch.no_grad()
def score_images(model, images_uint8: torch.Tensor, task: int | None = None, batch_size: int = 32,
                 description: str | None = None, bank: str = KNOWLEDGE, tasks: int | None = None,
                 cache: ScoreCache | None = None, maps: bool = True) -> ScoredImages:
    """`UcadModel.score`: score (N,3,S,S) uint8 images, each routed to the task with the nearest keys among the first
    `tasks` (default: all) or, with `task`, scored as that task, against that task's knowledge `bank`.

    Without a cache the images are taken `batch_size` at a time (bounded memory, nothing kept). With one, the
    images must be the ones the cache was made for, and everything it already holds is reused."""
    if not model.tasks:
        raise UcadError("the model holds no learned task: nothing to score against")
    tasks = len(model.tasks) if tasks is None else tasks
    if cache is not None:
        return _score(model, images_uint8, task, bank, tasks, cache, batch_size, maps)
    starts = range(0, images_uint8.shape[0], batch_size)
    parts = [_score(model, images_uint8[start:start + batch_size], task, bank, tasks, ScoreCache(), batch_size, maps)
             for start in tqdm(starts, desc=description, disable=description is None, unit="batch")]
    columns = [[getattr(part, name) for part in parts] for name in ScoredImages.__dataclass_fields__]
    return ScoredImages(*(torch.cat(column) if column[0] is not None else None for column in columns))


def _score(model, images_uint8: torch.Tensor, task: int | None, bank: str, tasks: int, cache: ScoreCache,
           batch_size: int, maps: bool) -> ScoredImages:
    distances = key_distances(model, images_uint8, tasks, cache, batch_size)
    routes = route(distances) if task is None else torch.full((images_uint8.shape[0],), task, dtype=torch.long)
    patch_scores = torch.empty(images_uint8.shape[0], model.patches)
    for chosen in routes.unique().tolist():
        members = routes == chosen
        patch_scores[members] = _patch_scores(model, images_uint8, chosen, bank, members, cache, batch_size)[members]
    margins, trust_threshold = routing_margin(distances), model.route_trust_threshold(tasks)
    trusted = margins >= trust_threshold if trust_threshold is not None else None
    return ScoredImages(routes, distances, margins, trusted, patch_scores, image_scores(patch_scores),
                        model.anomaly_maps(patch_scores).cpu() if maps else None)


def key_distances(model, images_uint8: torch.Tensor, tasks: int, cache: ScoreCache, batch_size: int) -> torch.Tensor:
    """(N, tasks) what routing compares, on the CPU; only tasks the cache has not met are searched."""
    if missing := [k for k in range(tasks) if k not in cache.key_distance]:
        if cache.frozen is None:
            with cache.phase("test_frozen_features", images_uint8.shape[0]):
                cache.frozen = model.frozen_features(images_uint8, batch_size)
        with cache.phase("routing", images_uint8.shape[0]):
            distances = task_distances(model.key_index(missing), cache.frozen,
                                       [model.tasks[k].routing for k in missing], model.config.routing)
            cache.key_distance.update(zip(missing, distances.cpu().unbind(1)))
    return torch.stack([cache.key_distance[k] for k in range(tasks)], dim=1)


def held_out_margins(model, normal_images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """(N,) routing margins of a task's held-out normal images among the tasks learned so far, as a test image's are
    measured: what `UcadModel.route_trust_threshold` goes by."""
    return routing_margin(key_distances(model, normal_images, len(model.tasks), ScoreCache(), batch_size))


def _patch_scores(model, images_uint8: torch.Tensor, task: int, bank: str, needed: torch.Tensor, cache: ScoreCache,
                  batch_size: int) -> torch.Tensor:
    """(N, P) patch scores under `task` and `bank`; rows of `needed` the cache lacks are computed."""
    banks = tuple(dict.fromkeys((*cache.banks, bank)))
    if (task, bank) not in cache.patch_scores:
        for name in banks:
            cache.patch_scores[(task, name)] = torch.full((images_uint8.shape[0], model.patches), float("nan"))
    missing = needed & torch.isnan(cache.patch_scores[(task, bank)][:, 0])
    if missing.any():
        index = torch.nonzero(missing).flatten()
        frozen = cache.frozen[index.to(cache.frozen.device)] if cache.frozen is not None else None
        with cache.phase("scoring", len(index)):
            scores = model.score_patches(images_uint8[index], task, banks, frozen, batch_size)
        for name, values in scores.items():
            cache.patch_scores[(task, name)][index] = values
    return cache.patch_scores[(task, bank)]
