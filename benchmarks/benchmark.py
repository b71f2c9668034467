#!/usr/bin/env python3
"""Time a whole continual experiment: seconds and items per second per phase, peak memory, and the cost of each
task as tasks grow.

    python3 benchmarks/benchmark.py                      # MVTec-sized: 15 tasks, 240 train / 115 test at 224 px
    python3 benchmarks/benchmark.py --tasks 3 --train 24 --test 12 --epochs 2     # a reduced CPU-sized run
    python3 benchmarks/benchmark.py --data /data/mvtec -d bottle -d cable         # real data
    python3 benchmarks/benchmark.py --profile prof                               # + a torch profiler trace
    python3 benchmarks/benchmark.py --cpu --tasks 100 --train 16 --test 4 --imagesize 64 --epochs 1 \\
        --backbone vit_tiny_patch16_224 --feature_batch_size 16 --basic_size 0   # cost as tasks grow, on a CPU

Synthetic work is random smooth images with random defect blobs and block-shaped structure maps: the numbers are
meaningless, the amount of work is MVTec's.

Cost as tasks grow, observed through ucad.continual.hooks.RunHooks, for each task t (counting from 1): seconds to
learn it, to evaluate every test set seen so far after it, and to write the results and checkpoint after it, and the
checkpoint's size; milliseconds to route one image among the t tasks (its frozen features, then the one search over
all tasks' keys; on a CPU timed on one thread); the bytes the task keeps (keys + prompt + knowledge) and the bytes
the evaluation caches for its test set. These rows are rewritten after every task to the --json path with the suffix
.growth.json, so a run stopped early still leaves its curve behind.

--profile DIR, before the timed run, learns the first task twice with one prompt-training epoch: once to warm up
(cuDNN autotuning, allocator growth and lazy initialisation stay out of the trace), once with its prompt training
under the torch profiler. Written: DIR/prompt_epoch_trace.json.gz (chrome://tracing or ui.perfetto.dev) and
DIR/prompt_epoch_ops.txt (operators by device time and by CPU time, and the epoch's wall time: a GPU waiting on the
Python side shows as much CPU time and little device time).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segment_anything_prep.label_maps import save_structure_map  # noqa: E402
from ucad.config import Configs, DataConfig, LearningConfig, ModelConfig, RunConfig  # noqa: E402
from ucad.continual.experiment import run_experiment  # noqa: E402
from ucad.continual.hooks import RunHooks  # noqa: E402
from ucad.persistence.model_file import CHECKPOINT, CHECKPOINT_TASKS  # noqa: E402
from ucad.runtime.timing import PhaseTimer  # noqa: E402


# ---------------------------------------------------------------------------------------------- synthetic work
def synthetic_dataset(root: Path, tasks: int, train: int, test: int, size: int, seed: int = 0) -> list[str]:
    """MVTec layout, structure maps in ROOT-sam-b; half the test images get a bright blob defect with its mask."""
    rng = np.random.default_rng(seed)
    names = []
    coarse = max(4, size // 16)
    for t in range(tasks):
        name = f"task{t:02d}"
        names.append(name)
        base = rng.uniform(0, 255, size=(3, 1, 1))
        for split, count in (("train", train), ("test", test)):
            for i in range(count):
                noise = rng.normal(0, 40, size=(coarse, coarse, 3))
                image = np.clip(np.asarray(Image.fromarray(noise.astype(np.int8).astype(np.uint8)).resize(
                    (size, size), Image.BILINEAR), dtype=np.float32) + base.transpose(1, 2, 0), 0, 255)
                defect = split == "test" and i % 2 == 1
                folder = root / name / split / ("defect" if defect else "good")
                folder.mkdir(parents=True, exist_ok=True)
                if defect:
                    yy, xx = np.mgrid[:size, :size]
                    cy, cx, r = rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size, rng.uniform(4, size / 8)
                    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
                    image[mask] = 255 - image[mask]
                    mask_dir = root / name / "ground_truth" / "defect"
                    mask_dir.mkdir(parents=True, exist_ok=True)
                    Image.fromarray((mask * 255).astype(np.uint8)).save(mask_dir / f"{i:03d}_mask.png")
                Image.fromarray(image.astype(np.uint8)).save(folder / f"{i:03d}.png", compress_level=1)
                if split == "train":
                    labels = (np.arange(size)[:, None] // (size // 4)) * 4 + np.arange(size)[None] // (size // 4) + 1
                    save_structure_map(Path(str(root) + "-sam-b") / name / "train" / "good" / f"{i:03d}.png", labels)
    return names


# ---------------------------------------------------------------------------------------------- cost as tasks grow
def _clock() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def _median_ms(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = _clock()
        action()
        times.append((_clock() - started) * 1000.0)
    return statistics.median(times)


class GrowthRecorder(RunHooks):
    """One row per task t of the figures described in this file's docstring."""

    def __init__(self, progress_path: Path | None = None, repeats: int = 5):
        self.repeats = repeats
        self.rows: dict[int, dict] = {}
        self.progress_path = progress_path

    def _row(self, index: int) -> dict:
        return self.rows.setdefault(index, {"tasks": index + 1})

    def task_learned(self, run, index: int, seconds: float) -> None:
        kept = run.model.tasks[index].memory_bytes()
        self._row(index).update(learn_seconds=round(seconds, 4),
                                task_bytes={**kept, "keys_prompt_knowledge": sum(kept.values())})

    def phase_evaluated(self, run, index: int, seconds: float) -> None:
        row, evaluator = self._row(index), run.evaluator
        row["evaluation_seconds"] = round(seconds, 4)
        # what the evaluator keeps between phases per test set: frozen features, key distances, patch scores
        cache_bytes = [test_set.cache.nbytes for test_set in evaluator.test_sets[:index + 1]]
        row["evaluation_cache_bytes"], row["evaluation_cache_bytes_all"] = cache_bytes[index], sum(cache_bytes)
        row.update(self.route_one_image(evaluator.model, evaluator.test_sets[index].images[:1], index + 1))

    def phase_kept(self, run, index: int, seconds: float) -> None:
        row = self._row(index)
        row["write_results_seconds"] = round(seconds, 4)
        # what this phase wrote to the checkpoint: checkpoint.pt and the newest task's own file
        written = [run.run_dir / CHECKPOINT, run.run_dir / CHECKPOINT_TASKS / f"task_{index:03d}.pt"]
        row["checkpoint_bytes"] = sum(p.stat().st_size for p in written if p.is_file()) or None
        if self.progress_path:
            self.progress_path.write_text(json.dumps(self.as_dict(), indent=1))

    def route_one_image(self, model, image: torch.Tensor, tasks: int) -> dict:
        """Milliseconds to route one image among the first `tasks` tasks, as ucad.predict routes it."""
        threads = torch.get_num_threads()
        if model.device.type == "cpu":
            # one image is a small product: on a shared CPU, multi-threaded timings of it measure the other
            # processes' load more than the routing itself
            torch.set_num_threads(1)
        try:
            index = model.key_index(range(tasks))  # built once per model, as predict does
            frozen = model.frozen_features(image, 1)
            features_ms = _median_ms(lambda: model.frozen_features(image, 1), self.repeats)
            search_ms = _median_ms(lambda: index.distances(frozen), self.repeats)
        finally:
            torch.set_num_threads(threads)
        return {"route_features_ms": round(features_ms, 3), "route_search_ms": round(search_ms, 3),
                "route_one_image_ms": round(features_ms + search_ms, 3)}

    def as_dict(self) -> list[dict]:
        return [self.rows[k] for k in sorted(self.rows)]

    def table(self, task_counts: list[int]) -> str:
        rows = [r for r in self.as_dict() if r["tasks"] in task_counts] or self.as_dict()[-1:]
        if not rows:
            return "cost as tasks grow: no task finished"
        nan = float("nan")
        lines = ["cost as tasks grow (t = tasks learned; route = frozen features of one image + search over t tasks;"
                 " task bytes = keys + prompt + knowledge)",
                 " | ".join(("t", "learn s", "route ms/img", "(features", "search)", "eval s after t", "write s",
                             "checkpoint MB", "task bytes", "eval cache B/task"))]
        for r in rows:
            checkpoint = r.get("checkpoint_bytes")
            lines.append(" | ".join(str(v) for v in (
                r["tasks"], f"{r.get('learn_seconds', nan):.2f}", f"{r.get('route_one_image_ms', nan):.1f}",
                f"{r.get('route_features_ms', nan):.1f}", f"{r.get('route_search_ms', nan):.2f}",
                f"{r.get('evaluation_seconds', nan):.2f}", f"{r.get('write_results_seconds', nan):.2f}",
                f"{checkpoint / 2 ** 20:.1f}" if checkpoint else "-",
                r.get("task_bytes", {}).get("keys_prompt_knowledge", "-"), r.get("evaluation_cache_bytes", "-"))))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- one profiled epoch
class ProfilingTimer(PhaseTimer):
    """A PhaseTimer that also records one phase, by name, under the torch profiler."""

    def __init__(self, profiled: str):
        super().__init__()
        self.profiled = profiled
        self.profiler = None

    @contextlib.contextmanager
    def phase(self, name: str, items: int = 0):
        if name != self.profiled:
            with super().phase(name, items):
                yield
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
            with super().phase(name, items):
                yield
        self.profiler = profiler


def _operator_table(profiler, sort_keys: tuple[str, ...], rows: int = 40) -> str:
    averages = profiler.key_averages()
    for key in sort_keys:  # the device-time column is named differently across torch versions
        try:
            return averages.table(sort_by=key, row_limit=rows)
        except (KeyError, AttributeError, ValueError, RuntimeError):
            continue
    return averages.table(row_limit=rows)


def write_profile(profiler, out_dir: Path, seconds: float, images: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = out_dir / "prompt_epoch_trace.json"
    profiler.export_chrome_trace(str(trace))
    with open(trace, "rb") as source, gzip.open(str(trace) + ".gz", "wb") as target:
        shutil.copyfileobj(source, target)
    trace.unlink()
    parts = [f"one epoch of prompt training: {seconds:.3f} s wall, {images} images ({images / max(seconds, 1e-9):.1f}/s)"]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        parts += ["", "== by self device time",
                  _operator_table(profiler, ("self_device_time_total", "self_cuda_time_total"))]
    parts += ["", "== by self CPU time", _operator_table(profiler, ("self_cpu_time_total",))]
    (out_dir / "prompt_epoch_ops.txt").write_text("\n".join(parts) + "\n")


def profile_prompt_epoch(configs: Configs, out_dir: Path) -> None:
    """Learn the first task twice with one prompt-training epoch; profile the second one's prompt training."""
    from ucad.model.coreset import CoresetSampler
    from ucad.data.layouts import list_tasks
    from ucad.runtime.device import select_device
    from ucad.continual.experiment import load_label_maps, structure_root_for
    from ucad.data.decode import load_images
    from ucad.learning.task import learn_task
    from ucad.model.ucad_model import UcadModel

    model_config, data, run = configs.model, configs.data, configs.run
    learning = dataclasses.replace(configs.learning, epochs_num=1)
    device = select_device(run.gpu, run.cpu, warn=print)
    model = UcadModel(model_config, device, run.precision)
    task = list_tasks(data.name, data.data_path, list(data.categories[:1]))[0]
    images = load_images(task.train, model_config.geometry, data.num_workers, show=False).to(device)
    label_maps = load_label_maps(task, structure_root_for(data), model_config.geometry).to(device)
    sampler = CoresetSampler(learning.sampler, learning.sampler_percentage, learning.seed)
    learn_task(model, 0, task.category, images, label_maps, sampler, learning, PhaseTimer())
    timer = ProfilingTimer("prompt_training")
    learn_task(model, 0, task.category, images, label_maps, sampler, learning, timer)
    if timer.profiler is None:
        print("note: --profile: the first task trained no prompt, nothing profiled", flush=True)
        return
    write_profile(timer.profiler, out_dir, timer.seconds["prompt_training"], images.shape[0])
    print(f"profile of one prompt-training epoch written to {out_dir}", flush=True)


# ---------------------------------------------------------------------------------------------- main
def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=15, help="synthetic tasks")
    parser.add_argument("--train", type=int, default=240, help="training images per synthetic task")
    parser.add_argument("--test", type=int, default=115, help="test images per synthetic task")
    parser.add_argument("--imagesize", type=int, default=224, help="image side in pixels (synthetic and network)")
    parser.add_argument("--backbone", default="vit_base_patch16_224", help="as run_ucad.py ucad -b")
    parser.add_argument("--layers", nargs="*", default=[], help="as run_ucad.py ucad -le (default: the backbone's)")
    parser.add_argument("--patchsize", type=int, default=1, help="as run_ucad.py ucad --patchsize")
    parser.add_argument("--weights", default="random", help="as run_ucad.py ucad --weights; random is fine for timing")
    parser.add_argument("--epochs", type=int, default=25, help="prompt-training epochs per task")
    parser.add_argument("--batch_size", type=int, default=8, help="prompt-training batch size")
    parser.add_argument("--feature_batch_size", type=int, default=64, help="images per feature-extraction batch")
    parser.add_argument("--key_size", type=int, default=196, help="keys per task")
    parser.add_argument("--memory_size", type=int, default=196, help="knowledge vectors per task")
    parser.add_argument("--basic_size", type=int, default=1960, help="knowledge of the unlimited variant (0 = off)")
    parser.add_argument("--embed_dimension", type=int, default=1024,
                        help="as run_ucad.py --pretrain_embed_dimension and --target_embed_dimension")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is visible")
    parser.add_argument("--precision", default="fp32", help="as run_ucad.py --precision")
    parser.add_argument("--reference_evaluation", action="store_true", help="time the slow recompute-everything path")
    parser.add_argument("--data", default=None, help="a real MVTec-layout folder instead of synthetic work")
    parser.add_argument("-d", "--category", action="append", default=[], help="a task of --data (repeat)")
    parser.add_argument("--workdir", default=None, help="where synthetic data and results go (default: a temp dir)")
    parser.add_argument("--json", default="benchmark.json", help="where the figures are written")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="first profile one epoch of the first task's prompt training into DIR")
    parser.add_argument("--growth_rows", default="10,25,50,100",
                        help="task counts t printed in the table of cost as tasks grow (every t is in the JSON)")
    return parser.parse_args()


def print_figures(figures: dict, growth: GrowthRecorder, growth_rows: str) -> None:
    timings = figures["phases"]
    print(f"\n{'phase':<22}{'seconds':>10}{'items':>9}{'items/s':>10}")
    for name, value in timings.items():
        rate = f"{value['items_per_second']:.1f}" if value["items_per_second"] else "-"
        print(f"{name:<22}{value['seconds']:>10.2f}{value['items']:>9}{rate:>10}")
    print(f"{'total (wall)':<22}{figures['wall_seconds']:>10.2f}")
    print(f"peak CPU memory {figures['peak_cpu_memory_gib']} GiB; peak GPU memory {figures['peak_gpu_memory_gib']} GiB")
    if figures["prompt_training_image_steps"] and "prompt_training" in timings:
        steps, seconds = figures["prompt_training_image_steps"], timings["prompt_training"]["seconds"]
        print(f"prompt training: {steps} image-steps in {seconds:.1f} s ({steps / max(seconds, 1e-9):.0f} per s)")
    print("\n" + growth.table([int(t) for t in growth_rows.split(",") if t.strip()]))


def main() -> int:
    args = parse_arguments()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ucad_bench_"))
    started = time.perf_counter()
    if args.data:
        data, categories = Path(args.data), args.category
    else:
        data = workdir / "synthetic"
        categories = synthetic_dataset(data, args.tasks, args.train, args.test, args.imagesize)
    generation = time.perf_counter() - started
    configs = Configs(
        model=ModelConfig(backbone=args.backbone, layers=tuple(args.layers), weights=args.weights,
                          patchsize=args.patchsize, pretrain_embed_dimension=args.embed_dimension,
                          target_embed_dimension=args.embed_dimension, imagesize=args.imagesize,
                          resize=args.imagesize),
        learning=LearningConfig(key_size=args.key_size, memory_size=args.memory_size, basic_size=args.basic_size,
                                epochs_num=args.epochs, batch_size=args.batch_size,
                                feature_batch_size=args.feature_batch_size),
        data=DataConfig(name="mvtec", data_path=str(data), categories=tuple(categories)),
        run=RunConfig(results_path=str(workdir / "results"), log_project="benchmark", log_group="run", cpu=args.cpu,
                      precision=args.precision, reference_evaluation=args.reference_evaluation),
    )
    on_gpu = torch.cuda.is_available() and not args.cpu
    if args.profile:
        profile_prompt_epoch(configs, Path(args.profile))
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    growth = GrowthRecorder(progress_path=Path(args.json).with_suffix(".growth.json"))
    started = time.perf_counter()
    run_dir = run_experiment(configs, hooks=growth)
    wall = time.perf_counter() - started
    figures = {
        "wall_seconds": round(wall, 2), "data_generation_seconds": round(generation, 2),
        "tasks": len(categories), "backbone": args.backbone, "epochs": args.epochs, "imagesize": args.imagesize,
        "device": "cuda" if on_gpu else "cpu", "gpu_name": torch.cuda.get_device_name() if on_gpu else None,
        "peak_cpu_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if on_gpu else None,
        "phases": json.loads((run_dir / "timings.json").read_text()), "run_dir": str(run_dir),
        "prompt_training_image_steps": None if args.data else len(categories) * args.train * args.epochs,
        "growth": growth.as_dict(), "profile_dir": args.profile,
    }
    print_figures(figures, growth, args.growth_rows)
    Path(args.json).write_text(json.dumps(figures, indent=2))
    print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
