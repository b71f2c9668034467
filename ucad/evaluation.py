"""Continual evaluation: after each task, every task seen so far is scored with task-agnostic routing
(and with the task given, the oracle).

Scoring goes through the model's own primitives (`UcadModel.frozen_features`, `key_index`,
`score_patches`, `anomaly_maps`), the ones `UcadModel.score` and so `ucad.predict` use. What this
module adds is caching: everything that cannot change between phases is computed once: frozen test
features (routing), each image's distance to each task's keys (the tasks a test set has not met yet are
searched together in one TaskKeyIndex: all tasks for a new test set, the newest task for the others, several
test sets at once), and each image's patch scores under each task's prompt and knowledge (a task's prompt and
knowledge are fixed once it is learned). A phase then only re-routes and recomputes metrics for test sets
whose routing changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ucad.anomaly_map import image_scores
from ucad.metrics import PixelGroundTruth, compute_task_metrics
from ucad.keys import routing_margin
from ucad.model import KNOWLEDGE, UNLIMITED, UcadModel
from ucad.router import route
from ucad.thresholds import metrics_at_threshold, per_image
from ucad.timing import PhaseTimer

VARIANTS = ("task_agnostic", "task_agnostic_unlimited", "oracle")
VARIANT_BANK = {"task_agnostic": KNOWLEDGE, "task_agnostic_unlimited": UNLIMITED, "oracle": KNOWLEDGE}
# per-image score columns of the variants beside the main (task-agnostic) one
SCORE_COLUMNS = {"oracle": "oracle_image_score", "task_agnostic_unlimited": "unlimited_image_score"}
ROUTING_GROUP_BYTES = 256 * 2 ** 20  # frozen features searched together when routing several test sets at once


@dataclass
class TestSet:
    index: int  # the task these images belong to
    name: str
    images: torch.Tensor  # (N,3,S,S) uint8, CPU
    masks: torch.Tensor  # (N,S,S) uint8 {0,1}, CPU
    labels: np.ndarray  # (N,) 0 normal / 1 anomalous
    paths: list
    defect_types: list[str] = field(default_factory=list)
    frozen: torch.Tensor | None = None  # (N,P,D) on the device
    key_distance: dict = field(default_factory=dict)  # task k -> (N,) mean nearest-key distance
    patch_scores: dict = field(default_factory=dict)  # (task k, bank) -> (N,P) float, nan rows = not computed
    metric_cache: dict = field(default_factory=dict)
    ground_truth: PixelGroundTruth | None = None  # pixel labels and AUPRO regions, built once on the device


class ContinualEvaluator:
    def __init__(self, model: UcadModel, timer: PhaseTimer, batch_size: int = 32, fpr_limit: float = 0.3,
                 reuse: bool = True):
        self.model = model
        self.timer = timer
        self.batch_size = batch_size
        self.fpr_limit = fpr_limit
        self.reuse = reuse  # False recomputes everything every phase, as the released code does (reference)
        self.test_sets: list[TestSet] = []

    def add_test_set(self, test_set: TestSet) -> None:
        self.test_sets.append(test_set)

    def _seen(self, phase: int) -> list[TestSet]:
        return [t for t in self.test_sets if t.index <= phase]

    # ------------------------------------------------------------------ cached pieces
    def _frozen(self, test_set: TestSet) -> torch.Tensor:
        if test_set.frozen is None:
            with self.timer.phase("test_frozen_features", len(test_set.labels)):
                test_set.frozen = self.model.frozen_features(test_set.images, self.batch_size,
                                                             f"[{test_set.name}] test features")
        return test_set.frozen

    def _fill_key_distances(self, phase: int) -> None:
        """The key distances every test set still lacks, in few searches: test sets that lack the same tasks
        (after task t every earlier test set lacks only task t) are searched together, in groups of at most
        ROUTING_GROUP_BYTES of features, instead of one small search per test set."""
        lacking: dict[tuple[int, ...], list[TestSet]] = {}
        for test_set in self._seen(phase):
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
                            index = self.model.key_index(unseen)
                        distances = index.distances(torch.cat([t.frozen for t in group]))
                        for part, member in zip(distances.split([t.frozen.shape[0] for t in group]), group):
                            for column, k in enumerate(unseen):
                                member.key_distance[k] = part[:, column].cpu()
                    group, size = [], 0
                if test_set is not None:
                    group.append(test_set)
                    size += frozen.numel() * frozen.element_size()

    def _routing(self, test_set: TestSet, phase: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) routed task and (N, phase+1) key distances, on the CPU."""
        unseen = [k for k in range(phase + 1) if k not in test_set.key_distance]
        if unseen:
            frozen = self._frozen(test_set)
            with self.timer.phase("routing", len(test_set.labels)):
                distances = self.model.key_distances(frozen, unseen).cpu()
            for column, k in enumerate(unseen):
                test_set.key_distance[k] = distances[:, column]
        distances = torch.stack([test_set.key_distance[k] for k in range(phase + 1)], dim=1)
        return route(distances), distances

    def _scores(self, test_set: TestSet, task: int, bank: str, needed: torch.Tensor) -> torch.Tensor:
        """(N,P) patch scores of test_set under `task`'s prompt and `bank`, computing missing rows of `needed`."""
        key = (task, bank)
        if key not in test_set.patch_scores:
            for name in self.model.BANKS:
                test_set.patch_scores[(task, name)] = torch.full((len(test_set.labels), self.model.patches),
                                                                 float("nan"))
        missing = needed & torch.isnan(test_set.patch_scores[key][:, 0])
        if missing.any():
            index = torch.nonzero(missing).flatten()
            frozen = None
            if self.model.config.mode == "patchcore":  # the cached frozen features are the features scored
                frozen = self._frozen(test_set)[index.to(self.model.device)]
            with self.timer.phase("scoring", len(index)):
                scores = self.model.score_patches(test_set.images[index], task, self.model.BANKS, frozen,
                                                  self.batch_size)
            for name, values in scores.items():
                test_set.patch_scores[(task, name)][index] = values
        return test_set.patch_scores[key]

    def _assemble(self, test_set: TestSet, routes: torch.Tensor, bank: str) -> torch.Tensor:
        scores = torch.empty(len(test_set.labels), self.model.patches)
        for task in routes.unique().tolist():
            chosen = routes == task
            scores[chosen] = self._scores(test_set, task, bank, chosen)[chosen]
        return scores

    def _metrics(self, test_set: TestSet, variant: str, routes: torch.Tensor, patch_scores: torch.Tensor) -> dict:
        cache_key = (variant, routes.numpy().tobytes())
        if cache_key not in test_set.metric_cache:
            with self.timer.phase("metrics", len(test_set.labels)):
                if test_set.ground_truth is None:
                    test_set.ground_truth = PixelGroundTruth(test_set.masks, device=self.model.device)
                scores = image_scores(patch_scores)
                maps = self.model.anomaly_maps(patch_scores)
                metrics = compute_task_metrics(test_set.labels, scores.numpy(), None, maps, self.fpr_limit,
                                               ground_truth=test_set.ground_truth)
                thresholds = per_image(self.model.tasks, routes, VARIANT_BANK[variant])
                metrics.update(metrics_at_threshold(test_set.labels, scores, maps, test_set.ground_truth.labels,
                                                    thresholds))
                test_set.metric_cache[cache_key] = metrics
        return test_set.metric_cache[cache_key]

    def _variants(self, test_set: TestSet, variants) -> list[str]:
        """The variants this test set's own task can be scored in (no unlimited bank, no unlimited variant)."""
        memory = self.model.tasks[test_set.index]
        return [v for v in variants if getattr(memory, VARIANT_BANK[v]) is not None]

    def _reset(self, test_set: TestSet) -> None:
        test_set.frozen, test_set.key_distance, test_set.patch_scores, test_set.metric_cache = None, {}, {}, {}
        test_set.ground_truth = None

    # ------------------------------------------------------------------ one phase
    def evaluate_phase(self, phase: int, variants=VARIANTS) -> list[dict]:
        """Metrics of every test set of a task <= phase after learning task `phase`: one record per (set, variant)."""
        records = []
        if self.reuse:
            self._fill_key_distances(phase)
        for test_set in self._seen(phase):
            if not self.reuse:
                self._reset(test_set)
            routes, distances = self._routing(test_set, phase)
            # how clearly images were routed: mean relative gap to the runner-up task (none with a single task)
            margin = float(routing_margin(distances).mean()) if phase else float("nan")
            routing_accuracy = float((routes == test_set.index).float().mean())
            for variant in self._variants(test_set, variants):
                variant_routes = torch.full_like(routes, test_set.index) if variant == "oracle" else routes
                scores = self._assemble(test_set, variant_routes, VARIANT_BANK[variant])
                metrics = self._metrics(test_set, variant, variant_routes, scores)
                records.append({"phase": phase, "phase_task": self.model.tasks[phase].name,
                                "task_index": test_set.index, "task": test_set.name, "variant": variant,
                                **metrics,
                                "routing_accuracy": 1.0 if variant == "oracle" else routing_accuracy,
                                "routing_margin": margin})
        return records

    def image_rows(self, phase: int, variants=VARIANTS) -> list[dict]:
        """One row per test image of every task <= phase: routing, key distances, scores, threshold decision
        (from the caches `evaluate_phase` filled)."""
        names = [t.name for t in self.model.tasks[: phase + 1]]
        rows = []
        for test_set in self._seen(phase):
            routes, distances = self._routing(test_set, phase)
            scores = {}
            for variant in self._variants(test_set, variants):
                variant_routes = torch.full_like(routes, test_set.index) if variant == "oracle" else routes
                scores[variant] = image_scores(self._assemble(test_set, variant_routes, VARIANT_BANK[variant]))
            thresholds = per_image(self.model.tasks, routes, KNOWLEDGE)
            margins = routing_margin(distances)
            agnostic = scores["task_agnostic"]
            for i, path in enumerate(test_set.paths):
                routed = int(routes[i])
                row = {"phase": phase, "phase_task": names[phase], "test_set": test_set.name, "image": str(path),
                       "label": int(test_set.labels[i]),
                       "defect_type": test_set.defect_types[i] if test_set.defect_types else "",
                       "true_task": test_set.name, "routed_task": names[routed],
                       "key_distance": float(distances[i, routed]),
                       "routing_margin": float(margins[i]) if phase else None, "image_score": float(agnostic[i]),
                       "image_threshold": float(thresholds[0][i]) if thresholds else None,
                       "is_anomalous": int(agnostic[i] > thresholds[0][i]) if thresholds else None}
                for variant, column in SCORE_COLUMNS.items():
                    if variant in scores:
                        row[column] = float(scores[variant][i])
                for k, name in enumerate(names):
                    row[f"key_distance_{name}"] = float(distances[i, k])
                rows.append(row)
        return rows

    def task_agnostic_scoring(self, test_set: TestSet, phase: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routes, image scores and anomaly maps (CPU) of the task-agnostic variant (pictures, saved maps)."""
        routes, _ = self._routing(test_set, phase)
        scores = self._assemble(test_set, routes, KNOWLEDGE)
        return routes, image_scores(scores), self.model.anomaly_maps(scores).cpu()
