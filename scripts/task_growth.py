"""Cost as tasks grow, recorded per task while scripts/benchmark.py runs an experiment.

For each task t (counting from 1): seconds to learn it; seconds of the evaluation after it (every test set
seen so far); seconds to write the results and checkpoint after it, and the checkpoint's size; milliseconds to
route one image among the t tasks (its frozen features, then the one search over all tasks' keys, and for
comparison the former loop of one search per task; on the CPU timed on one thread); the bytes the task keeps (keys + prompt + knowledge,
the unlimited knowledge apart) and the bytes the evaluation caches for its test set.

It wraps ucad.experiment.learn_task, ContinualEvaluator.evaluate_phase, ucad.experiment._write_result_files and
_write_checkpoint
for the duration of one run, so the experiment code carries no benchmark hooks.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

import torch


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _clock() -> float:
    _synchronize()
    return time.perf_counter()


def _nbytes(value) -> int:
    if value is None:
        return 0
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 0


def task_bytes(memory) -> dict:
    """What one learned task keeps (ucad.model.TaskMemory), in bytes."""
    sizes = {"keys": _nbytes(memory.keys), "prompt": _nbytes(memory.prompt_state),
             "knowledge": _nbytes(memory.knowledge), "knowledge_unlimited": _nbytes(memory.knowledge_unlimited)}
    sizes["keys_prompt_knowledge"] = sizes["keys"] + sizes["prompt"] + sizes["knowledge"]
    return sizes


def evaluation_cache_bytes(test_set) -> int:
    """What the evaluator keeps for one test set: decoded images and masks, frozen features, patch scores."""
    return (_nbytes(test_set.images) + _nbytes(test_set.masks) + _nbytes(test_set.frozen)
            + sum(_nbytes(v) for v in test_set.key_distance.values())
            + sum(_nbytes(v) for v in test_set.patch_scores.values()))


def _median_ms(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = _clock()
        action()
        times.append((_clock() - started) * 1000.0)
    return statistics.median(times)


class GrowthRecorder:
    def __init__(self, repeats: int = 5, progress_path: str | Path | None = None):
        self.repeats = repeats
        self.rows: dict[int, dict] = {}
        # rewritten after every task, so a run stopped early still leaves its curve behind
        self.progress_path = Path(progress_path) if progress_path else None

    def _row(self, task_index: int) -> dict:
        return self.rows.setdefault(task_index, {"tasks": task_index + 1})

    def _route_one_image(self, evaluator, phase: int) -> dict:
        model = evaluator.model
        if model.device.type == "cpu":
            # one image is a small product: on a shared CPU, multi-threaded timings of it measure the other
            # processes' load more than the search, so both ways are timed on one thread
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return self._time_routing(evaluator, phase, faiss_threads=1)
            finally:
                torch.set_num_threads(threads)
        return self._time_routing(evaluator, phase, faiss_threads=evaluator.model.scorer.faiss_num_workers)

    def _time_routing(self, evaluator, phase: int, faiss_threads: int) -> dict:
        from ucad.nearest_neighbor import NearestNeighbourScorer
        from ucad.router import TaskKeyIndex, key_distances

        model = evaluator.model
        image = evaluator.test_sets[phase].images[:1]
        tasks = model.tasks[: phase + 1]
        distance = evaluator.model.scorer.patch_distance
        index = TaskKeyIndex.from_tasks(tasks, distance, model.device)  # built once per model, as predict does
        frozen = model.features(image, None, 1)
        features_ms = _median_ms(lambda: model.features(image, None, 1), self.repeats)
        search_ms = _median_ms(lambda: index.distances(frozen), self.repeats)
        per_task = NearestNeighbourScorer(1, evaluator.model.scorer.backend, model.device, faiss_num_workers=faiss_threads,
                                          patch_distance=distance)
        loop_ms = _median_ms(lambda: [key_distances(frozen, task.keys, per_task) for task in tasks], self.repeats)
        return {"route_features_ms": round(features_ms, 3), "route_search_ms": round(search_ms, 3),
                "route_loop_ms": round(loop_ms, 3), "route_one_image_ms": round(features_ms + search_ms, 3)}

    @contextlib.contextmanager
    def installed(self):
        import ucad.experiment as experiment
        from ucad.evaluation import ContinualEvaluator

        original_learn = experiment.learn_task
        original_files, original_checkpoint = experiment._write_result_files, experiment._write_checkpoint
        original_evaluate = ContinualEvaluator.evaluate_phase
        recorder = self

        def learn(model, task_index, *args, **kwargs):
            started = _clock()
            memory, history = original_learn(model, task_index, *args, **kwargs)
            row = recorder._row(task_index)
            row["learn_seconds"] = round(_clock() - started, 4)
            row["task_bytes"] = task_bytes(memory)
            return memory, history

        def evaluate(evaluator, phase, *args, **kwargs):
            started = _clock()
            records = original_evaluate(evaluator, phase, *args, **kwargs)
            row = recorder._row(phase)
            row["evaluation_seconds"] = round(_clock() - started, 4)
            row["evaluation_cache_bytes"] = evaluation_cache_bytes(evaluator.test_sets[phase])
            row["evaluation_cache_bytes_all"] = sum(evaluation_cache_bytes(t) for t in evaluator.test_sets[: phase + 1])
            row.update(recorder._route_one_image(evaluator, phase))
            return records

        def write_files(run_dir, records, *args, **kwargs):
            started = _clock()
            original_files(run_dir, records, *args, **kwargs)
            row = recorder._row(max(r["phase"] for r in records))
            row["write_results_seconds"] = round(_clock() - started, 4)

        def write_checkpoint(run_dir, records, *args, **kwargs):
            started = _clock()
            original_checkpoint(run_dir, records, *args, **kwargs)
            row = recorder._row(max(r["phase"] for r in records))
            row["write_results_seconds"] = round(row.get("write_results_seconds", 0.0) + _clock() - started, 4)
            checkpoint = Path(run_dir) / experiment.CHECKPOINT
            row["checkpoint_bytes"] = checkpoint.stat().st_size if checkpoint.is_file() else None
            if recorder.progress_path:
                recorder.progress_path.write_text(json.dumps(recorder.as_dict(), indent=1))

        experiment.learn_task = learn
        experiment._write_result_files, experiment._write_checkpoint = write_files, write_checkpoint
        ContinualEvaluator.evaluate_phase = evaluate
        try:
            yield self
        finally:
            experiment.learn_task = original_learn
            experiment._write_result_files, experiment._write_checkpoint = original_files, original_checkpoint
            ContinualEvaluator.evaluate_phase = original_evaluate

    def as_dict(self) -> list[dict]:
        return [self.rows[k] for k in sorted(self.rows)]

    def table(self, task_counts: list[int]) -> str:
        rows = [r for r in self.as_dict() if r["tasks"] in task_counts] or self.as_dict()[-1:]
        if not rows:
            return "cost as tasks grow: no task finished"
        header = ("t", "learn s", "route ms/img", "(features", "search", "old loop)", "eval s after t",
                  "write s", "checkpoint MB", "task bytes", "eval cache B/task")
        lines = ["cost as tasks grow (t = tasks learned; route = frozen features of one image + search over t tasks;"
                 " task bytes = keys + prompt + knowledge)",
                 " | ".join(header)]
        for r in rows:
            task = r.get("task_bytes", {})
            checkpoint = r.get("checkpoint_bytes")
            lines.append(" | ".join(str(v) for v in (
                r["tasks"], f"{r.get('learn_seconds', float('nan')):.2f}", f"{r.get('route_one_image_ms', float('nan')):.1f}",
                f"{r.get('route_features_ms', float('nan')):.1f}", f"{r.get('route_search_ms', float('nan')):.2f}",
                f"{r.get('route_loop_ms', float('nan')):.2f}", f"{r.get('evaluation_seconds', float('nan')):.2f}",
                f"{r.get('write_results_seconds', float('nan')):.2f}",
                f"{checkpoint / 2 ** 20:.1f}" if checkpoint else "-",
                task.get("keys_prompt_knowledge", "-"), r.get("evaluation_cache_bytes", "-"))))
        return "\n".join(lines)
