"""Continual evaluation: after each task, every task seen so far is scored with task-agnostic routing
(and with the task given, the oracle).

Everything that cannot change between phases is computed once: frozen test features (routing),
each image's distance to each task's keys (the tasks a test set has not met yet are searched together in
one TaskKeyIndex: all tasks for a new test set, the newest task for the others), and each image's patch
scores under each task's prompt and knowledge (a task's prompt and knowledge are fixed once it is
learned). A phase then only re-routes and recomputes metrics for test sets whose routing changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ucad.anomaly_map import anomaly_maps, image_scores
from ucad.metrics import PixelGroundTruth, compute_task_metrics
from ucad.model import UcadModel
from ucad.nearest_neighbor import NearestNeighbourScorer
from ucad.keys import routing_margin
from ucad.router import TaskKeyIndex, route
from ucad.timing import PhaseTimer

VARIANTS = ("task_agnostic", "task_agnostic_unlimited", "oracle")
ROUTING_GROUP_BYTES = 256 * 2 ** 20  # frozen features searched together when routing several test sets at once


@dataclass
class TestSet:
    index: int
    name: str
    images: torch.Tensor  # (N,3,S,S) uint8, CPU
    masks: torch.Tensor  # (N,S,S) uint8 {0,1}, CPU
    labels: np.ndarray  # (N,) 0 normal / 1 anomalous
    paths: list
    frozen: torch.Tensor | None = None  # (N,P,D) on the device
    key_distance: dict = field(default_factory=dict)  # task k -> (N,) mean nearest-key distance
    patch_scores: dict = field(default_factory=dict)  # (task k, bank) -> (N,P) float, nan rows = not computed
    metric_cache: dict = field(default_factory=dict)
    ground_truth: PixelGroundTruth | None = None  # pixel labels and AUPRO regions, built once on the device


class ContinualEvaluator:
    def __init__(self, model: UcadModel, scorer: NearestNeighbourScorer, timer: PhaseTimer,
                 batch_size: int = 32, fpr_limit: float = 0.3, reuse: bool = True):
        self.model = model
        self.scorer = scorer
        self.timer = timer
        self.batch_size = batch_size
        self.fpr_limit = fpr_limit
        self.reuse = reuse  # False recomputes everything every phase, as the released code does (reference)
        self.test_sets: list[TestSet] = []

    def add_test_set(self, test_set: TestSet) -> None:
        self.test_sets.append(test_set)

    # ------------------------------------------------------------------ cached pieces
    def _frozen(self, test_set: TestSet) -> torch.Tensor:
        if test_set.frozen is None:
            with self.timer.phase("test_frozen_features", len(test_set.labels)):
                # routing only compares means of key distances, so fp16 halves the cache at no cost; in
                # PatchCore mode these features are also scored against the memory bank and stay fp32
                dtype = torch.float32 if self.model.config.mode == "patchcore" else torch.float16
                test_set.frozen = self.model.features(test_set.images, None, self.batch_size,
                                                      f"[{test_set.name}] test features", out_dtype=dtype)
        return test_set.frozen

    def _fill_key_distances(self, phase: int) -> None:
        """The key distances every test set still lacks, in few searches: test sets that lack the same tasks
        (after task t every earlier test set lacks only task t) are searched together, in groups of at most
        ROUTING_GROUP_BYTES of features, instead of one small search per test set."""
        lacking: dict[tuple[int, ...], list[TestSet]] = {}
        for test_set in self.test_sets[: phase + 1]:
            unseen = tuple(k for k in range(phase + 1) if k not in test_set.key_distance)
            if unseen:
                lacking.setdefault(unseen, []).append(test_set)
        for unseen, test_sets in lacking.items():
            index = None
            group, size = [], 0
            for test_set in test_sets + [None]:
                frozen = self._frozen(test_set) if test_set is not None else None
                if group and (frozen is None or size + frozen.numel() * frozen.element_size() > ROUTING_GROUP_BYTES):
                    with self.timer.phase("routing", sum(len(t.labels) for t in group)):
                        if index is None:
                            index = TaskKeyIndex([self.model.tasks[k].keys for k in unseen],
                                                 self.scorer.patch_distance, self.model.device)
                        distances = index.distances(torch.cat([t.frozen for t in group]))
                        for part, member in zip(distances.split([t.frozen.shape[0] for t in group]), group):
                            for column, k in enumerate(unseen):
                                member.key_distance[k] = part[:, column]
                    group, size = [], 0
                if test_set is not None:
                    group.append(test_set)
                    size += frozen.numel() * frozen.element_size()

    def _routing(self, test_set: TestSet, phase: int) -> torch.Tensor:
        return route(self._key_distances(test_set, phase)).cpu()

    def _key_distances(self, test_set: TestSet, phase: int) -> torch.Tensor:
        """(N, phase + 1) mean nearest-key distance of each test image to each task learned so far."""
        unseen = [k for k in range(phase + 1) if k not in test_set.key_distance]
        if unseen:
            frozen = self._frozen(test_set)
            with self.timer.phase("routing", len(test_set.labels)):
                index = TaskKeyIndex([self.model.tasks[k].keys for k in unseen], self.scorer.patch_distance,
                                     self.model.device)
                distances = index.distances(frozen)
                for column, k in enumerate(unseen):
                    test_set.key_distance[k] = distances[:, column]
        return torch.stack([test_set.key_distance[k] for k in range(phase + 1)], dim=1)

    def _scores(self, test_set: TestSet, task: int, bank: str, needed: torch.Tensor) -> torch.Tensor:
        """(N,P) patch scores of test_set under `task`'s prompt and `bank`, computing missing rows of `needed`."""
        memory = self.model.tasks[task]
        banks = {"memory": memory.knowledge, "unlimited": memory.knowledge_unlimited}
        key = (task, bank)
        if key not in test_set.patch_scores:
            patches = self.model.grid[0] * self.model.grid[1]
            for name in banks:
                test_set.patch_scores[(task, name)] = torch.full((len(test_set.labels), patches), float("nan"))
        missing = needed & torch.isnan(test_set.patch_scores[key][:, 0])
        if missing.any():
            index = torch.nonzero(missing).flatten()
            with self.timer.phase("scoring", len(index)):
                if self.model.config.mode == "patchcore":  # the cached frozen features are the features
                    features = self._frozen(test_set)[index.to(self.model.device)].float()
                else:
                    features = self.model.features(test_set.images[index], self.model.prompt_for(task),
                                                   self.batch_size)
                n, p, d = features.shape
                for name, knowledge in banks.items():
                    if knowledge is None:
                        continue
                    distances = self.scorer.distances(features.reshape(n * p, d), knowledge).reshape(n, p)
                    test_set.patch_scores[(task, name)][index] = distances.float().cpu()
        return test_set.patch_scores[key]

    def _assemble(self, test_set: TestSet, routes: torch.Tensor, bank: str) -> torch.Tensor:
        scores = torch.empty(len(test_set.labels), self.model.grid[0] * self.model.grid[1])
        for task in routes.unique().tolist():
            chosen = routes == task
            scores[chosen] = self._scores(test_set, task, bank, chosen)[chosen]
        return scores

    def maps(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """(N,P) patch scores -> (N,S,S) anomaly maps on the model's device."""
        parts = [anomaly_maps(patch_scores[s:s + 64].to(self.model.device), self.model.grid,
                              self.model.config.imagesize, self.model.config.smoothing_sigma)
                 for s in range(0, patch_scores.shape[0], 64)]
        return torch.cat(parts)

    def _metrics(self, test_set: TestSet, variant: str, routes: torch.Tensor, patch_scores: torch.Tensor) -> dict:
        cache_key = (variant, routes.numpy().tobytes())
        if cache_key not in test_set.metric_cache:
            with self.timer.phase("metrics", len(test_set.labels)):
                if test_set.ground_truth is None:
                    test_set.ground_truth = PixelGroundTruth(test_set.masks, device=self.model.device)
                test_set.metric_cache[cache_key] = compute_task_metrics(
                    test_set.labels, image_scores(patch_scores).numpy(), None, self.maps(patch_scores),
                    self.fpr_limit, ground_truth=test_set.ground_truth)
        return test_set.metric_cache[cache_key]

    # ------------------------------------------------------------------ one phase
    def evaluate_phase(self, phase: int, variants=VARIANTS) -> list[dict]:
        """Metrics of every test set j <= phase after learning task `phase`: one record per (j, variant)."""
        records = []
        if self.reuse:
            self._fill_key_distances(phase)
        for test_set in self.test_sets[: phase + 1]:
            if not self.reuse:
                test_set.frozen, test_set.key_distance, test_set.patch_scores, test_set.metric_cache = None, {}, {}, {}
                test_set.ground_truth = None
            routes = self._routing(test_set, phase)
            # how clearly images were routed: mean relative gap to the runner-up task (none with a single task)
            margin = float(routing_margin(self._key_distances(test_set, phase)).mean()) if phase else float("nan")
            oracle_routes = torch.full_like(routes, test_set.index)
            routing_accuracy = float((routes == test_set.index).float().mean())
            for variant in variants:
                variant_routes = oracle_routes if variant == "oracle" else routes
                bank = "unlimited" if variant.endswith("unlimited") else "memory"
                if bank == "unlimited" and self.model.tasks[test_set.index].knowledge_unlimited is None:
                    continue
                scores = self._assemble(test_set, variant_routes, bank)
                metrics = self._metrics(test_set, variant, variant_routes, scores)
                records.append({"phase": phase, "phase_task": self.model.tasks[phase].name,
                                "task_index": test_set.index, "task": test_set.name, "variant": variant,
                                **metrics,
                                "routing_accuracy": 1.0 if variant == "oracle" else routing_accuracy,
                                "routing_margin": margin})
        return records

    def final_maps(self, test_set: TestSet, phase: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routes, image scores and anomaly maps of the task-agnostic variant (for pictures and predictions)."""
        routes = self._routing(test_set, phase)
        scores = self._assemble(test_set, routes, "memory")
        return routes, image_scores(scores), self.maps(scores).cpu()
