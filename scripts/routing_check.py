#!/usr/bin/env python3
"""Routing stress test: how well each key sampler routes test images to their task, without training anything.

Routing depends only on the frozen backbone and the keys, so the frozen features of every task are extracted once
and every --key_sampler is compared on them: routing accuracy and mean relative margin per task (as the run
reports them). Example (look-alike demo products):

    python3 -m ucad.demo_data /tmp/look --image_size 224 --categories weave,pcb_chip,weave_b,pcb_chip_b
    python3 scripts/routing_check.py --data /tmp/look -d weave -d pcb_chip -d weave_b -d pcb_chip_b \
        --backbone efficientnet_lite0 -le 2 -le 3 --patchsize 3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ucad.datasets import list_tasks  # noqa: E402
from ucad.device import select_device  # noqa: E402
from ucad.images import ImageGeometry, load_images  # noqa: E402
from ucad.keys import KEY_SAMPLERS, routing_margin, select_keys  # noqa: E402
from ucad.model import ModelConfig, UcadModel  # noqa: E402
from ucad.router import TaskKeyIndex, route  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="data set root (MVTec layout)")
    parser.add_argument("-d", dest="categories", action="append", required=True, help="task, in order (repeat)")
    parser.add_argument("--dataset", default="mvtec", choices=["mvtec", "visa"])
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("-le", dest="layers", action="append", default=[])
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--patchsize", type=int, default=1)
    parser.add_argument("--imagesize", type=int, default=224)
    parser.add_argument("--resize_mode", default="square", choices=["crop", "square"])
    parser.add_argument("--key_size", type=int, default=196)
    parser.add_argument("--samplers", default=",".join(KEY_SAMPLERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    device = select_device([0], args.cpu, warn=print)
    model = UcadModel(ModelConfig(backbone=args.backbone, layers=tuple(args.layers), weights=args.weights,
                                  patchsize=args.patchsize, imagesize=args.imagesize, resize=args.imagesize,
                                  resize_mode=args.resize_mode), device)
    geometry = ImageGeometry(args.imagesize, args.imagesize, args.resize_mode)
    tasks = list_tasks(args.dataset, args.data, args.categories)
    started = time.perf_counter()
    train, test = [], []
    for task in tasks:
        frozen = model.features(load_images(task.train, geometry, 4, show=False), None, 32, f"[{task.category}] train")
        train.append(frozen.reshape(-1, frozen.shape[-1]))
        test.append(model.features(load_images(task.test, geometry, 4, show=False), None, 32,
                                   f"[{task.category}] test"))
    print(f"frozen features of {len(tasks)} tasks in {time.perf_counter() - started:.1f} s "
          f"({model.extractor.describe(prompts=False)})")
    results = {}
    names = [t.category for t in tasks]
    for sampler in args.samplers.split(","):
        keys = [select_keys(features, args.key_size, sampler, seed=args.seed * 1000 + i)
                for i, features in enumerate(train)]
        per_task = {}
        for j, features in enumerate(test):
            distances = TaskKeyIndex(keys, model.config.patch_distance, device).distances(features)
            routes = route(distances).cpu()
            per_task[names[j]] = {"routing_accuracy": float((routes == j).float().mean()),
                                  "routing_margin": float(routing_margin(distances).mean()),
                                  "routed_to": {names[t]: int((routes == t).sum()) for t in routes.unique().tolist()}}
        results[sampler] = per_task
    width = max(len(n) for n in names + ["mean"])
    print(f"\n{'task':<{width}} | " + " | ".join(f"{s:>21}" for s in results))
    print(f"{'':<{width}} | " + " | ".join(f"{'routing  margin':>21}" for _ in results))
    for name in names + ["mean"]:
        cells = []
        for per_task in results.values():
            rows = list(per_task.values()) if name == "mean" else [per_task[name]]
            accuracy = sum(r["routing_accuracy"] for r in rows) / len(rows)
            margin = sum(r["routing_margin"] for r in rows) / len(rows)
            cells.append(f"{accuracy:>12.3f} {margin:>8.3f}")
        print(f"{name:<{width}} | " + " | ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
