#!/usr/bin/env python3
"""Routing stress test: how well each way of routing sends test images to their task, without training anything.

Routing depends only on the frozen backbone, the keys and (for --routing other than mean) a few statistics of each
task's normal images, so every combination of key sampler, routing rule, key storage and seed is compared without
training a prompt: routing accuracy and mean relative margin per task, the worst task, and bytes per task. Each
step is the run's own: the split of `dataset --train_val_split` with the run's --seed, keys and statistics as a
task learns them (`ucad.model.keys.task_keys`, `UcadModel.routing_statistics`), test images routed as the model
routes them (`UcadModel.frozen_features`, `ucad.model.router.task_distances`), so the figures are the routing of a
run's last phase. Misrouted test images are listed at the end, with how many runs sent them astray (and in --json).
Example (look-alike demo products):

    python3 -m ucad.demo /tmp/look --image_size 224 --categories weave,pcb_chip,weave_b,pcb_chip_b
    python3 benchmarks/routing_check.py --data /tmp/look -d weave -d pcb_chip -d weave_b -d pcb_chip_b \
        --backbone efficientnet_lite0 -le 2 -le 3 --patchsize 3 --routings mean,calibrated --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ucad.config import LearningConfig, ModelConfig  # noqa: E402
from ucad.data.layouts import list_tasks  # noqa: E402
from ucad.runtime.device import select_device  # noqa: E402
from ucad.data.decode import load_images  # noqa: E402
from ucad.config import KEY_SAMPLERS, KNOWLEDGE_STORAGES, ROUTINGS  # noqa: E402
from ucad.model.anomaly_map import image_scores  # noqa: E402
from ucad.model.coreset import CoresetSampler  # noqa: E402
from ucad.model.keys import task_keys  # noqa: E402
from ucad.model.ucad_model import UcadModel  # noqa: E402
from ucad.model.router import (TaskKeyIndex, route, route_trust_threshold, routing_margin,  # noqa: E402
                               task_distances)

MODEL, LEARNING = ModelConfig(), LearningConfig()  # a run's defaults
BATCH_SIZE = LEARNING.feature_batch_size  # images per forward


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
                        help="as run_ucad.py dataset --resize_mode")
    parser.add_argument("--key_size", type=int, default=LEARNING.key_size, help="as run_ucad.py --key_size")
    parser.add_argument("--key_storage", default=LEARNING.key_storage, choices=KNOWLEDGE_STORAGES,
                        help="as run_ucad.py ucad --key_storage")
    parser.add_argument("--samplers", default=LEARNING.key_sampler,
                        help=f"comma-separated key samplers to compare (of {', '.join(KEY_SAMPLERS)})")
    parser.add_argument("--routings", default="mean",
                        help=f"comma-separated routing rules to compare (of {', '.join(ROUTINGS)})")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, each as run_ucad.py --seed (of the "
                                                     "split and the key samplers)")
    parser.add_argument("--train_val_split", type=float, default=0.9,
                        help="as run_ucad.py dataset --train_val_split: the fraction of each task's training images "
                             "the keys are chosen from; the rest calibrate the routing rules that measure normal "
                             "images (1.0: they measure the training images themselves)")
    parser.add_argument("--auroc_cost", action="store_true",
                        help="also the image AUROC routing costs (task-agnostic minus task given) when each task's "
                             "knowledge is a coreset of --memory_size frozen training patches, as a --no_scl run "
                             "scores")
    parser.add_argument("--memory_size", type=int, default=LEARNING.memory_size,
                        help="as run_ucad.py --memory_size (with --auroc_cost)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is visible")
    parser.add_argument("--json", help="write every result here")
    args = parser.parse_args()
    if not 0 < args.train_val_split <= 1:
        parser.error(f"--train_val_split {args.train_val_split} is not a fraction in (0, 1]: give e.g. 0.9")

    device = select_device([0], args.cpu, warn=print)
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.manual_seed(seeds[0])  # a run seeds torch before it builds the model: --weights random draws alike
    model = UcadModel(ModelConfig(backbone=args.backbone, layers=tuple(args.layers), weights=args.weights,
                                  patchsize=args.patchsize, imagesize=args.imagesize, resize=args.imagesize,
                                  resize_mode=args.resize_mode), device)
    listed = list_tasks(args.dataset, args.data, args.categories)
    names = [t.category for t in listed]
    started = time.perf_counter()
    test = [model.frozen_features(load_images(task.test, model.config.geometry, 4, show=False), BATCH_SIZE,
                                  f"[{task.category}] test") for task in listed]
    print(f"frozen features of {len(listed)} test sets in {time.perf_counter() - started:.1f} s "
          f"({model.extractor.describe(prompts=False)})")

    results = []
    for seed in seeds:
        tasks = list_tasks(args.dataset, args.data, args.categories, args.train_val_split, seed)
        train = [model.features(load_images(task.train, model.config.geometry, 4, show=False), None, BATCH_SIZE,
                                f"[{task.category}] key features") for task in tasks]
        held_out = [load_images(task.validation, model.config.geometry, 4, show=False) if task.validation else None
                    for task in tasks]
        held_out_frozen = [model.frozen_features(images, BATCH_SIZE) if images is not None else None
                           for images in held_out]
        task_seeds = [LearningConfig(seed=seed).task_seed(i) for i in range(len(tasks))]
        # (test set, task) -> image scores of the test set under that task's knowledge, as a --no_scl run scores
        scores_under = _scores_under_every_task(model, train, test, seed, args.memory_size) if args.auroc_cost else None
        for sampler in args.samplers.split(","):
            learned = [task_keys(features.reshape(-1, features.shape[-1]), args.key_size, sampler, args.key_storage,
                                 task_seed) for features, task_seed in zip(train, task_seeds)]
            index = TaskKeyIndex([keys for keys, _ in learned], model.config.patch_distance, device)
            for routing in args.routings.split(","):
                statistics_per_task = [model.routing_statistics(keys, features, images, BATCH_SIZE, routing)
                                       for (keys, _), features, images in zip(learned, train, held_out)]
                # as a run keeps them: each task's held-out margins among the tasks learned up to it
                held_out_margins = [routing_margin(task_distances(
                    TaskKeyIndex([keys for keys, _ in learned[:t + 1]], model.config.patch_distance, device),
                    features, statistics_per_task[:t + 1], routing)) for t, features in enumerate(held_out_frozen)
                    if features is not None]
                trust_threshold = route_trust_threshold(held_out_margins, MODEL.route_trust_quantile)
                per_task = {}
                for j, features in enumerate(test):
                    scores = task_distances(index, features, statistics_per_task, routing)
                    routes = route(scores).cpu()
                    if trust_threshold is not None:
                        trusted = (routing_margin(scores) >= trust_threshold).cpu()
                        trust = {"untrusted": int((~trusted).sum()),
                                 "trusted_correct": int((routes[trusted] == j).sum())}
                    if scores_under is not None:
                        labels = [sample.is_anomalous for sample in listed[j].test]
                        routed = torch.stack([scores_under[j][k][i] for i, k in enumerate(routes.tolist())])
                        oracle = roc_auc_score(labels, scores_under[j][j])
                        auroc = {"oracle_image_auroc": oracle, "auroc_cost": oracle - roc_auc_score(labels, routed)}
                    per_task[names[j]] = {"routing_accuracy": float((routes == j).float().mean()),
                                          "images": len(routes),
                                          **(auroc if scores_under is not None else {}),
                                          **(trust if trust_threshold is not None else {}),
                                          "routing_margin": float(routing_margin(scores).mean()),
                                          "misrouted": {str(listed[j].test[i].image_path): names[k]
                                                        for i, k in enumerate(routes.tolist()) if k != j}}
                keys, packed = learned[0]
                key_bytes = packed.nbytes if packed is not None else keys.numel() * keys.element_size()
                extra = sum(v.numel() * v.element_size() for v in statistics_per_task[0].values())
                results.append({"seed": seed, "sampler": sampler, "routing": routing,
                                "key_size": int(learned[0][0].shape[0]), "key_storage": args.key_storage,
                                "bytes_per_task": key_bytes + extra,
                                "per_task": per_task})
    _print_summary(results, names)
    _print_trust(results)
    _print_misrouted(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _scores_under_every_task(model: UcadModel, train: list[torch.Tensor], test: list[torch.Tensor], seed: int,
                             memory_size: int) -> list[list[torch.Tensor]]:
    """[test set][task] -> (N,) image scores (largest patch distance) against the task's knowledge: a coreset of its
    frozen training patches, chosen as a run chooses it (the run's sampler and seed)."""
    sampler = CoresetSampler(LEARNING.sampler, LEARNING.sampler_percentage, seed)
    knowledge = [sampler.subsample(features.flatten(0, 1).float(), memory_size) for features in train]
    return [[image_scores(model.scorer.distances(features.flatten(0, 1).float(), bank).reshape(features.shape[:2]))
             .cpu() for bank in knowledge] for features in test]


def _print_summary(results: list[dict], names: list[str]) -> None:
    """Per (sampler, routing): per task, mean over tasks and the worst task, mean ± std over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["sampler"], r["routing"]), []).append(r)
    width = max(len(n) for n in names + ["mean", "worst"])
    metrics = ["routing_accuracy", "routing_margin"] + (["auroc_cost"] if "auroc_cost" in
                                                         next(iter(results[0]["per_task"].values())) else [])
    print(f"\n{len(next(iter(groups.values())))} seed(s); routing accuracy, mean margin and (--auroc_cost) the image "
          "AUROC routing costs, mean ± std over seeds")
    print(f"{'sampler / routing':<32} | {'task':<{width}} | " + " | ".join(f"{m.split('_')[-1]:>15}" for m in metrics)
          + " | bytes/task")
    # the worst task has the lowest accuracy and margin, and the highest cost
    worst = {"routing_accuracy": min, "routing_margin": min, "auroc_cost": max}
    for (sampler, routing), runs in groups.items():
        label = f"{sampler} / {routing}"
        for name in names + ["mean", "worst"]:
            cells = []
            for metric in metrics:
                per_run = [[row[metric] for row in run["per_task"].values()] for run in runs]
                values = ([statistics.mean(v) for v in per_run] if name == "mean" else
                          [worst[metric](v) for v in per_run] if name == "worst" else
                          [run["per_task"][name][metric] for run in runs])
                cells.append(f"{_mean_std(values):>15}")
            print(f"{label:<32} | {name:<{width}} | " + " | ".join(cells) + f" | {runs[0]['bytes_per_task']:,}")
            label = ""


def _print_trust(results: list[dict]) -> None:
    """Per run: test images whose route is not trusted (margin below the run's threshold from held-out images, at
    the default --route_trust_quantile) and the routing accuracy of the others."""
    for r in results:
        rows = r["per_task"].values()
        if rows and all("untrusted" in row for row in rows):
            images = sum(row["images"] for row in rows)
            untrusted = sum(row["untrusted"] for row in rows)
            correct = sum(row["trusted_correct"] for row in rows)
            accuracy = f"{correct / (images - untrusted):.3f}" if images > untrusted else "-"
            print(f"seed {r['seed']} {r['sampler']} / {r['routing']}: routes not trusted {untrusted} of {images}; "
                  f"routing accuracy on the trusted {accuracy}")


def _print_misrouted(results: list[dict]) -> None:
    """Each misrouted test image, with the task it went to and under how many of the runs (seed x sampler x
    routing): images that every rule sends astray are the ones to look at."""
    counts: dict[tuple[str, str], int] = {}
    for r in results:
        for rows in r["per_task"].values():
            for image, task in rows["misrouted"].items():
                counts[image, task] = counts.get((image, task), 0) + 1
    if counts:
        print(f"\nmisrouted test images (of {len(results)} runs: seeds x samplers x routings)")
        for (image, task), n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
            print(f"  {n:>3} x -> {task}: {image}")


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


if __name__ == "__main__":
    sys.exit(main())
