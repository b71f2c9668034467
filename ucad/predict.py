"""Score new images with a saved UCAD model, without knowing which product (task) they show.

    python -m ucad.predict results/.../models/ucad_model.pt IMAGE_FOLDER OUTPUT_FOLDER

Writes predictions.csv (image, routed task, image score) and, per image, a picture of the image with
its anomaly map and the raw map as .npy.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import click
import numpy as np
import torch

from ucad.anomaly_map import anomaly_maps, image_scores
from ucad.datasets import IMAGE_SUFFIXES, Sample
from ucad.device import select_device
from ucad.errors import UcadError
from ucad.images import ImageGeometry, load_images
from ucad.model import UcadModel
from ucad.nearest_neighbor import NearestNeighbourScorer
from ucad.router import TaskKeyIndex, route
from ucad.visualize import side_by_side


def predict_folder(model: UcadModel, image_paths: list[Path], batch_size: int = 16, workers: int = 4,
                   nn_backend: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """Routed task index (N,), image scores (N,), anomaly maps (N,S,S) and the decoded images."""
    config = model.config
    geometry = ImageGeometry(config.resize, config.imagesize, config.resize_mode)
    images = load_images([Sample(p, None, False, "good") for p in image_paths], geometry, workers)
    scorer = NearestNeighbourScorer(config.anomaly_scorer_num_nn, nn_backend, model.device,
                                    patch_distance=config.patch_distance)
    key_index = TaskKeyIndex.from_tasks(model.tasks, config.patch_distance, model.device)
    routes, scores, maps = [], [], []
    for start in range(0, len(image_paths), batch_size):
        batch = images[start:start + batch_size]
        frozen = model.features(batch, None, batch_size)
        distances = key_index.distances(frozen)
        chosen = route(distances)
        patch_scores = torch.empty(frozen.shape[:2])
        for task in chosen.unique().tolist():
            members = (chosen == task).cpu()
            prompt = model.prompt_for(task)
            features = frozen[members.to(frozen.device)] if prompt is None else model.features(batch[members], prompt)
            n, p, d = features.shape
            patch_scores[members] = scorer.distances(features.reshape(n * p, d),
                                                     model.tasks[task].knowledge).reshape(n, p).float().cpu()
        routes.append(chosen.cpu())
        scores.append(image_scores(patch_scores))
        maps.append(anomaly_maps(patch_scores, model.grid, config.imagesize, config.smoothing_sigma))
    return torch.cat(routes).numpy(), torch.cat(scores).numpy(), torch.cat(maps).numpy(), images


@click.command()
@click.argument("model_path", type=click.Path())
@click.argument("image_folder", type=click.Path())
@click.argument("output_folder", type=click.Path(file_okay=False))
@click.option("--gpu", type=int, default=[0], multiple=True, show_default=True, help="GPU index; CPU fallback when none.")
@click.option("--cpu", is_flag=True, help="Run on the CPU.")
@click.option("--weights", default=None, help="Override where backbone weights come from (auto | hub | random | PATH).")
@click.option("--batch_size", type=int, default=16, show_default=True, help="Images per batch.")
@click.option("--no_pictures", is_flag=True, help="Only write predictions.csv and the .npy maps.")
def main(model_path, image_folder, output_folder, gpu, cpu, weights, batch_size, no_pictures):
    """Score every image under IMAGE_FOLDER (recursively) with a saved model."""
    try:
        device = select_device(gpu, cpu, warn=lambda m: click.echo(m, err=True))
        folder = Path(image_folder)
        if not folder.is_dir():
            raise UcadError(f"image folder '{folder}' does not exist")
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise UcadError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under '{folder}'")
        model = UcadModel.load(Path(model_path), device, weights)
        routes, scores, maps, images = predict_folder(model, paths, batch_size)
    except UcadError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    out = Path(output_folder)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    low, high = float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9))
    with open(out / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "task", "score"])
        for i, path in enumerate(paths):
            relative = path.relative_to(folder)
            stem = "__".join(relative.with_suffix("").parts)
            task = model.tasks[int(routes[i])].name
            writer.writerow([str(relative), task, f"{scores[i]:.6f}"])
            np.save(out / "maps" / f"{stem}.npy", maps[i].astype(np.float32))
            if not no_pictures:
                side_by_side(images[i].numpy(), np.zeros(maps[i].shape, np.uint8), maps[i], low, high,
                             f"{task} {scores[i]:.3f}").save(out / "maps" / f"{stem}.png")
    click.echo(f"scored {len(paths)} images with {len(model.tasks)} task(s); results in {out / 'predictions.csv'}")


if __name__ == "__main__":
    main()
