#!/usr/bin/env python3
"""What the structure-contrastive loss gets to work with, per task: the structure maps' regions as the prompt
training sees them (each patch takes the region id at its centre pixel, ucad.learning.loss.labels_to_grid).

Per task: training images, mean regions per image at the patch grid, the share of images with fewer than 2 regions
(they contribute nothing to the loss), the mean share of an image's labelled patches in its largest region (near 1:
almost every pair is a "same region" pair, which pulls all patches of the image together), and the share of
unlabelled patches (label 0, left out of every pair). Example:

    python3 benchmarks/structure_map_stats.py --data /tmp/seq --structure_path /tmp/seq-sam-b -d weave \
        -d magnetic_tile --imagesize 224 --grid 28
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ucad.data.layouts import list_tasks  # noqa: E402
from ucad.continual.experiment import load_label_maps  # noqa: E402
from ucad.data.decode import ImageGeometry  # noqa: E402
from ucad.learning.loss import labels_to_grid  # noqa: E402


def region_statistics(labels: torch.Tensor) -> dict:
    """labels (N, P) region ids at the patch grid (0 = no region) -> the figures described above."""
    regions, largest, unlabelled = [], [], []
    for row in labels:
        labelled = row[row > 0]
        counts = torch.bincount(labelled) if labelled.numel() else torch.zeros(1, dtype=torch.long)
        regions.append(int((counts > 0).sum()))
        largest.append(float(counts.max()) / max(labelled.numel(), 1))
        unlabelled.append(1.0 - labelled.numel() / row.numel())
    regions_t = torch.tensor(regions, dtype=torch.float32)
    return {"images": len(regions), "mean_regions": float(regions_t.mean()),
            "share_fewer_than_2": float((regions_t < 2).float().mean()),
            "largest_region_share": sum(largest) / len(largest), "unlabelled_share": sum(unlabelled) / len(unlabelled)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="data set root (MVTec layout)")
    parser.add_argument("--structure_path", required=True, help="the structure maps' root (as dataset --structure_path)")
    parser.add_argument("-d", dest="categories", action="append", required=True, help="task (repeat)")
    parser.add_argument("--dataset", default="mvtec", choices=["mvtec", "visa"], help="layout of --data")
    parser.add_argument("--imagesize", type=int, default=224, help="network input size (square)")
    parser.add_argument("--resize_mode", default="square", choices=["crop", "square"],
                        help="as run_ucad.py dataset --resize_mode")
    parser.add_argument("--grid", type=int, default=14, help="patch grid side (the run prints it: 'patch grid')")
    args = parser.parse_args()
    geometry = ImageGeometry(args.imagesize, args.imagesize, args.resize_mode)
    print(f"{'task':<14} | images | regions | <2 regions | largest region | unlabelled")
    for task in list_tasks(args.dataset, args.data, args.categories):
        maps = load_label_maps(task, Path(args.structure_path), geometry)
        stats = region_statistics(labels_to_grid(maps, (args.grid, args.grid)))
        print(f"{task.category:<14} | {stats['images']:>6} | {stats['mean_regions']:>7.1f} | "
              f"{stats['share_fewer_than_2']:>10.3f} | {stats['largest_region_share']:>14.3f} | "
              f"{stats['unlabelled_share']:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
