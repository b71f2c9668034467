#!/usr/bin/env python3
"""Time the whole continual experiment, phase by phase.

    python3 scripts/benchmark.py                      # MVTec-sized: 15 tasks, 240 train / 115 test at 224 px
    python3 scripts/benchmark.py --tasks 3 --train 24 --test 12 --epochs 2      # a reduced CPU-sized run
    python3 scripts/benchmark.py --data /data/mvtec -d bottle -d cable          # real data
    python3 scripts/benchmark.py --profile prof                               # + a torch profiler trace
    python3 scripts/benchmark.py --cpu --tasks 100 --train 16 --test 4 --imagesize 64 --epochs 1 \
        --backbone vit_tiny_patch16_224 --feature_batch_size 16               # cost as tasks grow (CPU, minutes)

Synthetic work is random smooth images with random defect blobs and block-shaped structure maps: the
numbers are meaningless, the amount of work is MVTec's. Prints wall time, images per second per phase,
peak CPU and GPU memory, and writes them as JSON, together with the cost of each task as tasks grow
(see task_growth.py beside this file): seconds to learn task t, to route one image among t tasks, to
evaluate after task t and to write the results, and the bytes each task keeps.

--profile DIR runs the first task's prompt training as one warm-up epoch, one epoch under the torch
profiler, then the remaining epochs, and writes DIR/prompt_epoch_trace.json.gz (chrome://tracing or
Perfetto) and DIR/prompt_epoch_ops.txt (the operators by time). The profiled epoch runs slower than the
others, so time a run without --profile.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ucad.structure_maps import save_structure_map  # noqa: E402
from profile_epoch import profile_first_prompt_training  # noqa: E402
from task_growth import GrowthRecorder  # noqa: E402


def synthetic_dataset(root: Path, tasks: int, train: int, test: int, size: int, seed: int = 0) -> list[str]:
    """MVTec layout; half the test images get a bright blob defect with its mask."""
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=15)
    parser.add_argument("--train", type=int, default=240, help="training images per synthetic task")
    parser.add_argument("--test", type=int, default=115, help="test images per synthetic task")
    parser.add_argument("--imagesize", type=int, default=224)
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--layers", nargs="*", default=[])
    parser.add_argument("--patchsize", type=int, default=1)
    parser.add_argument("--weights", default="random", help="random is fine for timing")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--feature_batch_size", type=int, default=64)
    parser.add_argument("--key_size", type=int, default=196)
    parser.add_argument("--memory_size", type=int, default=196)
    parser.add_argument("--basic_size", type=int, default=1960, help="knowledge of the unlimited variant (0 = off)")
    parser.add_argument("--embed_dimension", type=int, default=1024, help="--pretrain/--target_embed_dimension")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--precision", default="fp32", help="as run_ucad.py --precision")
    parser.add_argument("--reference_evaluation", action="store_true", help="time the slow recompute-everything path")
    parser.add_argument("--data", default=None, help="a real MVTec-layout folder instead of synthetic work")
    parser.add_argument("-d", "--category", action="append", default=[])
    parser.add_argument("--workdir", default=None, help="where synthetic data and results go (default: a temp dir)")
    parser.add_argument("--json", default="benchmark.json", help="where the figures are written")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="profile one epoch of the first task's prompt training into DIR")
    parser.add_argument("--skip_heatmap", action="store_true",
                        help="do not redraw image_auroc_matrix.png after every task (its cost grows with tasks squared)")
    parser.add_argument("--growth_rows", default="10,25,50,100",
                        help="task counts t printed in the table of cost as tasks grow (every t is in the JSON)")
    args = parser.parse_args()

    import torch

    from ucad.config import Configs, DataConfig, LearningConfig, ModelConfig, RunConfig
    from ucad.experiment import run_experiment

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
    if torch.cuda.is_available() and not args.cpu:
        torch.cuda.reset_peak_memory_stats()
    if args.skip_heatmap:
        import ucad.results

        ucad.results.write_heatmap = lambda *a, **k: None
    growth = GrowthRecorder(progress_path=Path(args.json).with_suffix(".growth.json"))
    started = time.perf_counter()
    with growth.installed(), profile_first_prompt_training(args.profile):
        run_dir = run_experiment(configs)
    wall = time.perf_counter() - started
    timings = json.loads((run_dir / "timings.json").read_text())
    figures = {
        "wall_seconds": round(wall, 2), "data_generation_seconds": round(generation, 2),
        "tasks": len(categories), "backbone": args.backbone, "epochs": args.epochs, "imagesize": args.imagesize,
        "device": "cuda" if torch.cuda.is_available() and not args.cpu else "cpu",
        "gpu_name": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else None,
        "peak_cpu_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        if torch.cuda.is_available() and not args.cpu else None,
        "phases": timings, "run_dir": str(run_dir),
        "prompt_training_image_steps": None if args.data else len(categories) * args.train * args.epochs,
        "growth": growth.as_dict(), "profile_dir": args.profile, "heatmap_skipped": args.skip_heatmap,
    }
    print(f"\n{'phase':<22}{'seconds':>10}{'items':>9}{'items/s':>10}")
    for name, value in timings.items():
        rate = f"{value['items_per_second']:.1f}" if value["items_per_second"] else "-"
        print(f"{name:<22}{value['seconds']:>10.2f}{value['items']:>9}{rate:>10}")
    print(f"{'total (wall)':<22}{wall:>10.2f}")
    print(f"peak CPU memory {figures['peak_cpu_memory_gib']} GiB; peak GPU memory {figures['peak_gpu_memory_gib']} GiB")
    if figures["prompt_training_image_steps"] and "prompt_training" in timings:
        steps, seconds = figures["prompt_training_image_steps"], timings["prompt_training"]["seconds"]
        print(f"prompt training: {steps} image-steps in {seconds:.1f} s ({steps / max(seconds, 1e-9):.0f} per s)")
    print("\n" + growth.table([int(t) for t in args.growth_rows.split(",") if t.strip()]))
    Path(args.json).write_text(json.dumps(figures, indent=2))
    print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
