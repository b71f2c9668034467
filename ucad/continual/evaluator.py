"""Continual evaluation: after each task, every task seen so far is scored, task-agnostic and as its task (oracle).

Images are routed and scored by `UcadModel.score`, the path `ucad.predict` takes too. What this module adds is a
`ScoreCache` per test set, kept from phase to phase, and the metrics of each variant, kept while the routes that
produced them stay the same."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ucad.data.decode import ImageGeometry, load_images, load_masks
from ucad.data.layouts import TaskSamples
from ucad.results.metrics import PixelGroundTruth, compute_task_metrics, one_class_note
from ucad.model.ucad_model import BANKS, KNOWLEDGE, UNLIMITED, ScoreCache, ScoredImages, UcadModel
from ucad.learning.thresholds import metrics_at_threshold, per_image
from ucad.runtime.timing import PhaseTimer

VARIANTS = ("task_agnostic", "task_agnostic_unlimited", "oracle")
VARIANT_BANK = {"task_agnostic": KNOWLEDGE, "task_agnostic_unlimited": UNLIMITED, "oracle": KNOWLEDGE}
# per-image score columns of the variants beside the main (task-agnostic) one
SCORE_COLUMNS = {"oracle": "oracle_image_score", "task_agnostic_unlimited": "unlimited_image_score"}


@dataclass
class TestSet:
    index: int  # the task these images belong to
    name: str
    images: torch.Tensor  # (N,3,S,S) uint8, CPU
    masks: torch.Tensor  # (N,S,S) uint8 {0,1}, CPU
    labels: np.ndarray  # (N,) 0 normal / 1 anomalous
    paths: list
    defect_types: list[str] = field(default_factory=list)
    cache: ScoreCache = field(default_factory=ScoreCache)
    metric_cache: dict = field(default_factory=dict)  # (variant, routes) -> metrics
    ground_truth: PixelGroundTruth | None = None  # pixel labels and AUPRO regions, built once on the device


def load_test_set(index: int, task: TaskSamples, geometry: ImageGeometry, workers: int) -> TestSet:
    images = load_images(task.test, geometry, workers, description=f"[{task.category}] decode test")
    return TestSet(index, task.category, images, load_masks(task.test, geometry, workers),
                   np.array([int(s.is_anomalous) for s in task.test]), [s.image_path for s in task.test],
                   [s.defect_type for s in task.test])


class ContinualEvaluator:
    def __init__(self, model: UcadModel, timer: PhaseTimer, batch_size: int, fpr_limit: float, reuse: bool = True):
        self.model, self.timer, self.batch_size, self.fpr_limit = model, timer, batch_size, fpr_limit
        self.reuse = reuse  # False recomputes everything every phase, as the released code does (reference)
        self.test_sets: list[TestSet] = []

    def add_test_set(self, test_set: TestSet) -> None:
        test_set.cache = ScoreCache(BANKS, self.timer)
        self.test_sets.append(test_set)

    def _seen(self, phase: int) -> list[TestSet]:
        return [t for t in self.test_sets if t.index <= phase]

    def _score(self, test_set: TestSet, phase: int, variant: str = "task_agnostic", maps: bool = False) -> ScoredImages:
        """The test set scored after learning task `phase`, routed among tasks 0..phase (oracle: given its task)."""
        return self.model.score(test_set.images, task=test_set.index if variant == "oracle" else None,
                                batch_size=self.batch_size, bank=VARIANT_BANK[variant], tasks=phase + 1,
                                cache=test_set.cache, maps=maps)

    def _variants(self, test_set: TestSet) -> list[str]:
        """The variants this test set's own task can be scored in (no unlimited bank, no unlimited variant)."""
        memory = self.model.tasks[test_set.index]
        return [v for v in VARIANTS if getattr(memory, VARIANT_BANK[v]) is not None]

    def _metrics(self, test_set: TestSet, variant: str, scored: ScoredImages) -> dict:
        cache_key = (variant, scored.routed_task.numpy().tobytes())
        if cache_key not in test_set.metric_cache:
            with self.timer.phase("metrics", len(test_set.labels)):
                if test_set.ground_truth is None:
                    test_set.ground_truth = PixelGroundTruth(test_set.masks, device=self.model.device)
                maps = self.model.anomaly_maps(scored.patch_scores)
                metrics = compute_task_metrics(test_set.labels, scored.image_scores.numpy(), None, maps,
                                               self.fpr_limit, ground_truth=test_set.ground_truth)
                thresholds = per_image(self.model.tasks, scored.routed_task, VARIANT_BANK[variant])
                metrics.update(metrics_at_threshold(test_set.labels, scored.image_scores, maps,
                                                    test_set.ground_truth.labels, thresholds))
                anomalous = int(test_set.labels.sum())
                note = one_class_note(len(test_set.labels) - anomalous, anomalous, test_set.ground_truth.num_defect)
                if note:  # the metrics it names are nan, written as empty cells
                    metrics["note"] = note
                test_set.metric_cache[cache_key] = metrics
        return test_set.metric_cache[cache_key]

    def evaluate_phase(self, phase: int) -> list[dict]:
        """Metrics of every test set of a task <= phase after learning task `phase`: one record per (set, variant)."""
        records = []
        for test_set in self._seen(phase):
            if not self.reuse:
                test_set.cache, test_set.metric_cache, test_set.ground_truth = ScoreCache(BANKS, self.timer), {}, None
            routed = self._score(test_set, phase)
            # how clearly images were routed: mean relative gap to the runner-up task (none with a single task)
            margin = float(routed.routing_margins.mean()) if phase else float("nan")
            correct = routed.routed_task == test_set.index
            routing_accuracy = float(correct.float().mean())
            trusted = routed.route_trusted
            trust = {"untrusted_routes": int((~trusted).sum()) if trusted is not None else None,
                     "trusted_routing_accuracy": float(correct[trusted].float().mean())
                     if trusted is not None and trusted.any() else float("nan")}
            for variant in self._variants(test_set):
                scored = routed if variant == "task_agnostic" else self._score(test_set, phase, variant)
                records.append({"phase": phase, "phase_task": self.model.tasks[phase].name,
                                "task_index": test_set.index, "task": test_set.name, "variant": variant,
                                **self._metrics(test_set, variant, scored),
                                "routing_accuracy": 1.0 if variant == "oracle" else routing_accuracy,
                                "routing_margin": margin, **trust})
        return records

    def image_rows(self, phase: int) -> list[dict]:
        """One row per test image of every task <= phase, from the caches `evaluate_phase` filled."""
        names = [t.name for t in self.model.tasks[: phase + 1]]
        rows = []
        for test_set in self._seen(phase):
            scored = {variant: self._score(test_set, phase, variant) for variant in self._variants(test_set)}
            agnostic = scored["task_agnostic"]
            routes, distances, scores = agnostic.routed_task, agnostic.key_distances, agnostic.image_scores
            thresholds = per_image(self.model.tasks, routes, KNOWLEDGE)
            margins = agnostic.routing_margins
            for i, path in enumerate(test_set.paths):
                routed = int(routes[i])
                row = {"phase": phase, "phase_task": names[phase], "test_set": test_set.name, "image": str(path),
                       "label": int(test_set.labels[i]),
                       "defect_type": test_set.defect_types[i] if test_set.defect_types else "",
                       "true_task": test_set.name, "routed_task": names[routed],
                       "key_distance": float(distances[i, routed]),
                       "routing_margin": float(margins[i]) if phase else None,
                       "route_trusted": int(agnostic.route_trusted[i]) if agnostic.route_trusted is not None else None,
                       "image_score": float(scores[i]),
                       "image_threshold": float(thresholds[0][i]) if thresholds else None,
                       "is_anomalous": int(scores[i] > thresholds[0][i]) if thresholds else None}
                row.update({c: float(scored[v].image_scores[i]) for v, c in SCORE_COLUMNS.items() if v in scored})
                row.update({f"key_distance_{name}": float(distances[i, k]) for k, name in enumerate(names)})
                rows.append(row)
        return rows

    def task_agnostic_scoring(self, test_set: TestSet, phase: int) -> ScoredImages:
        """The task-agnostic variant with its anomaly maps (pictures, saved maps)."""
        return self._score(test_set, phase, maps=True)
