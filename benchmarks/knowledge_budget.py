#!/usr/bin/env python3
"""Knowledge per byte: how well each way of storing a task's knowledge scores in the paper's bytes, without training.

A `--no_scl` run scores each task against a coreset of its frozen training patches, so every storage is compared on
the same cached features: per task the coreset of the run's sampler (`CoresetSampler` with the run's --seed, as
`learn_task` draws it), packed by each storage (`ucad.model.knowledge.pack_knowledge` with the task's seed), test
images scored as their own task (the oracle variant) exactly as the model scores (`UcadModel.patch_scores` on the
decoded vectors, `image_scores`, `UcadModel.anomaly_maps`, `compute_task_metrics`). Printed per storage: image AUROC,
pixel AP (mean over tasks, mean ± std over seeds), bytes and vectors per task, the quantisation error (squared
reconstruction error of the kept vectors over their squared spread around their mean), seconds to build (coreset +
packing) and to score (patch scores + maps), summed over tasks.

A storage is NAME (as many vectors as fit in the paper's bytes, 196 fp32 vectors, as `--memory_size 0` keeps) or
NAME:SIZE (SIZE vectors, `all` patches, or another NAME: as many vectors as that storage keeps). Beside the run's
storages, pca_pq holds the coefficients in PQ codes and pca_fp32 unquantised, which separates where a gap to the
larger memory comes from, on the same coreset: too few vectors (fp32:196 against fp32:1960 and fp32:N), the
projection (pca_fp32:N against fp32:N), quantisation (NAME:N against pca_fp32:N, or pq against fp32:2176), the
coreset's choice (fp32:N against fp32:all, every training patch). Example:

    python3 benchmarks/knowledge_budget.py --data /tmp/demo_data -d weave -d granite -d washer -d pcb_chip \
        --backbone efficientnet_lite0 -le 2 -le 3 --patchsize 3 --imagesize 224 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ucad.config import KNOWLEDGE_STORAGES, LearningConfig, ModelConfig, RunConfig  # noqa: E402
from ucad.data.decode import load_images, load_masks  # noqa: E402
from ucad.data.layouts import list_tasks  # noqa: E402
from ucad.model.anomaly_map import image_scores  # noqa: E402
from ucad.model.coreset import CoresetSampler  # noqa: E402
from ucad.model.knowledge import PCA_DIM, pack_knowledge, vectors_in_budget  # noqa: E402
from ucad.model.ucad_model import UcadModel  # noqa: E402
from ucad.results.metrics import PixelGroundTruth, compute_task_metrics  # noqa: E402
from ucad.runtime.device import select_device  # noqa: E402
from ucad.runtime.errors import UcadError  # noqa: E402

MODEL, LEARNING = ModelConfig(), LearningConfig()  # a run's defaults
BATCH_SIZE = LEARNING.feature_batch_size
FPR_LIMIT = RunConfig.fpr_limit  # the run's AUPRO limit
# the paper's knowledge, the run's larger reference, every storage at the paper's bytes, and on the vectors pca_sq8
# keeps, the separation of its gap: those vectors exact (fp32) and projected but unquantised (pca_fp32)
DEFAULT_STORAGES = ",".join(["fp32:196", f"fp32:{LEARNING.basic_size}", *KNOWLEDGE_STORAGES[1:], "fp32:pca_sq8",
                             "pca_fp32:pca_sq8"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="data set root (MVTec layout)")
    parser.add_argument("-d", dest="categories", action="append", required=True, help="task, in order (repeat)")
    parser.add_argument("--dataset", default="mvtec", choices=["mvtec", "visa"], help="layout of --data")
    parser.add_argument("--backbone", default=MODEL.backbone, help="as run_ucad.py ucad -b")
    parser.add_argument("-le", dest="layers", action="append", default=[],
                        help="as run_ucad.py ucad -le (repeat; default: the backbone's)")
    parser.add_argument("--weights", default=MODEL.weights, help="as run_ucad.py ucad --weights")
    parser.add_argument("--patchsize", type=int, default=MODEL.patchsize, help="as run_ucad.py ucad --patchsize")
    parser.add_argument("--imagesize", type=int, default=MODEL.imagesize,
                        help="network input size (square), as run_ucad.py dataset --imagesize and --resize")
    parser.add_argument("--resize_mode", default="square", choices=["crop", "square"],
                        help="as run_ucad.py dataset --resize_mode (square, as the recipes' runs)")
    parser.add_argument("--sampler", default=LEARNING.sampler, help="as run_ucad.py sampler NAME")
    parser.add_argument("--storages", default=DEFAULT_STORAGES,
                        help=f"comma-separated NAME or NAME:SIZE (NAME: {', '.join(KNOWLEDGE_STORAGES)}, pca_pq, "
                             "pca_fp32; SIZE: vectors per task, 'all', or a NAME: as many as that storage keeps; "
                             "without SIZE: as many as fit in the paper's bytes)")
    parser.add_argument("--pca_dims", default=str(PCA_DIM),
                        help="comma-separated principal directions kept; each pca_ storage is measured with each")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, each as run_ucad.py --seed")
    parser.add_argument("--train_val_split", type=float, default=1.0,
                        help="as run_ucad.py dataset --train_val_split: the fraction of each task's training images "
                             "the knowledge is chosen from")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is visible")
    parser.add_argument("--json", help="write every result here")
    args = parser.parse_args()

    device = select_device([0], args.cpu, warn=print)
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.manual_seed(seeds[0])  # a run seeds torch before it builds the model: --weights random draws alike
    config = ModelConfig(backbone=args.backbone, layers=tuple(args.layers), weights=args.weights,
                         patchsize=args.patchsize, imagesize=args.imagesize, resize=args.imagesize,
                         resize_mode=args.resize_mode)
    rows = _rows(parser, args.storages, [int(r) for r in args.pca_dims.split(",")], config.target_embed_dimension)
    results = {label: [] for label, *_ in rows}
    model = UcadModel(config, device)
    geometry = config.geometry
    listed = list_tasks(args.dataset, args.data, args.categories)
    for index, task in enumerate(listed):
        started = time.perf_counter()
        test = model.features(load_images(task.test, geometry, 4, show=False), None, BATCH_SIZE)
        labels = [sample.is_anomalous for sample in task.test]
        truth = PixelGroundTruth(load_masks(task.test, geometry, 4), device=device)
        features, train_files = None, None
        print(f"[{task.category}] test features in {time.perf_counter() - started:.1f} s", flush=True)
        for seed in seeds:
            split = list_tasks(args.dataset, args.data, [task.category], args.train_val_split, seed)[0]
            if split.train != train_files:  # a split the seed does not change is extracted once
                train_files = split.train
                features = model.features(load_images(split.train, geometry, 4, show=False), None, BATCH_SIZE)
                features = features.flatten(0, 1)
            sampler, task_seed = CoresetSampler(args.sampler, seed=seed), LearningConfig(seed=seed).task_seed(index)
            coresets = {}  # size -> (selected vectors, seconds)
            for label, storage, size, reduced in rows:
                if size not in coresets:
                    started = time.perf_counter()
                    coresets[size] = (features if size is None else sampler.subsample(features, size),
                                      time.perf_counter() - started)
                selected, coreset_seconds = coresets[size]
                started = time.perf_counter()
                packed = pack_knowledge(selected, storage, training=features, seed=task_seed, reduced_dim=reduced)
                knowledge = packed.decode()
                build_seconds = coreset_seconds + time.perf_counter() - started
                centred = selected.float() - selected.float().mean(dim=0)
                quantisation_error = float(((knowledge - selected.float()) ** 2).sum() / (centred ** 2).sum())
                started = time.perf_counter()
                patch_scores = model.patch_scores(None, None, {"knowledge": knowledge}, test)["knowledge"]
                maps = model.anomaly_maps(patch_scores)
                score_seconds = time.perf_counter() - started
                metrics = compute_task_metrics(labels, image_scores(patch_scores).numpy(), None, maps,
                                               FPR_LIMIT, ground_truth=truth)
                results[label].append({"seed": seed, "task": task.category, "vectors": len(knowledge),
                                       "bytes": packed.nbytes, "quantisation_error": quantisation_error,
                                       "build_s": build_seconds, "score_s": score_seconds,
                                       **{key: metrics[key] for key in ("image_auroc", "pixel_ap", "aupro")}})
                print(f"[{task.category}] seed {seed} {label:<16} image AUROC {metrics['image_auroc']:.3f} pixel AP "
                      f"{metrics['pixel_ap']:.3f} ({len(knowledge)} vectors, {packed.nbytes:,} B, error "
                      f"{quantisation_error:.3f}, build {build_seconds:.1f} s, score {score_seconds:.1f} s)",
                      flush=True)
        del test, truth, features
    _print_summary(results, seeds)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _rows(parser, storages: str, pca_dims: list[int], dim: int) -> list[tuple[str, str, int | None, int]]:
    """(label, storage, vectors per task or None for all patches, principal directions kept) of each measured row."""
    known, rows = (*KNOWLEDGE_STORAGES, "pca_pq", "pca_fp32"), []
    for entry in storages.split(","):
        name, _, size = entry.partition(":")
        if name not in known or not (size in ("", "all") or size.isdigit() or size in known):
            parser.error(f"--storages: '{entry}' is not NAME or NAME:SIZE (NAME: {', '.join(known)}; SIZE: a number, "
                         "'all' or a NAME, for as many vectors as that storage keeps)")
        for reduced in pca_dims if name.startswith("pca_") else [PCA_DIM]:
            vectors = None if size == "all" else int(size) if size.isdigit() else vectors_in_budget(
                size or name, dim, reduced_dim=reduced)
            label = name + (f"@{reduced}" if name.startswith("pca_") and len(pca_dims) > 1 else "")
            rows.append((f"{label}:{vectors or 'all'}", name, vectors, reduced))
    return list({row[0]: row for row in rows}.values())  # a row asked for twice is measured once


def _print_summary(results: dict[str, list[dict]], seeds: list[int]) -> None:
    """Per storage: mean over tasks of each seed, then mean ± std over seeds; bytes and vectors per task (mean over
    tasks where they differ), seconds summed over tasks."""
    print(f"\n{len(seeds)} seed(s); mean over tasks, mean ± std over seeds")
    print(f"{'storage:vectors':<18} | {'image AUROC':>13} | {'pixel AP':>13} | {'AUPRO':>13} | {'bytes/task':>11} | "
          f"{'vectors/task':>12} | {'quant. error':>13} | {'build s':>11} | {'score s':>11}")
    for label, records in results.items():
        per_seed = {key: [statistics.mean(r[key] for r in records if r["seed"] == seed) for seed in seeds]
                    for key in ("image_auroc", "pixel_ap", "aupro", "quantisation_error")}
        sums = {key: [sum(r[key] for r in records if r["seed"] == seed) for seed in seeds]
                for key in ("build_s", "score_s")}
        print(f"{label:<18} | {_mean_std(per_seed['image_auroc']):>13} | {_mean_std(per_seed['pixel_ap']):>13} | "
              f"{_mean_std(per_seed['aupro']):>13} | {statistics.mean(r['bytes'] for r in records):>11,.0f} | "
              f"{statistics.mean(r['vectors'] for r in records):>12,.0f} | "
              f"{_mean_std(per_seed['quantisation_error']):>13} | "
              f"{_mean_std(sums['build_s'], 1):>11} | "
              f"{_mean_std(sums['score_s'], 1):>11}")


def _mean_std(values: list[float], digits: int = 3) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UcadError as error:
        sys.exit(f"error: {error}")
