"""Score new images with a saved UCAD model, without knowing which product (task) they show.

    python -m ucad.predict results/.../models/ucad_model.pt IMAGE_FOLDER OUTPUT_FOLDER [--cpu | --gpu N]

Input and output only: the scoring is `UcadModel.score`, the path the run's own evaluation takes. Writes
predictions.csv (image, routed task, key distances, image score, the routed task's threshold, is_anomalous,
anomalous area) and per image: maps/<name>.npy (the anomaly map), masks/<name>.png (pixels above the routed
task's pixel threshold, 0/255) and pictures/<name>.png (image | map overlay with colour bar | predicted mask).
Maps and masks are at the model's input geometry (after its resize and crop).
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

from ucad.datasets import IMAGE_SUFFIXES, Sample
from ucad.device import select_device
from ucad.errors import UcadError
from ucad.images import load_images
from ucad.model import KNOWLEDGE, UcadModel
from ucad.visualize import prediction_picture


def find_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UcadError(f"image folder '{folder}' does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UcadError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under '{folder}'")
    return paths


def _output_name(path: Path, folder: Path) -> str:
    return "__".join(path.relative_to(folder).with_suffix("").parts)


@click.command()
@click.argument("model_path", type=click.Path())
@click.argument("image_folder", type=click.Path())
@click.argument("output_folder", type=click.Path(file_okay=False))
@click.option("--gpu", type=int, default=[0], multiple=True, show_default=True, help="GPU index; CPU fallback when none.")
@click.option("--cpu", is_flag=True, help="Run on the CPU.")
@click.option("--weights", default=None,
              help="Take the backbone weights from here (auto | hub | random | PATH) instead of the model file.")
@click.option("--batch_size", type=int, default=16, show_default=True, help="Images per batch.")
@click.option("--num_workers", type=int, default=4, show_default=True, help="Threads decoding images.")
@click.option("--no_pictures", is_flag=True, help="Only write predictions.csv, the .npy maps and the masks.")
def main(model_path, image_folder, output_folder, gpu, cpu, weights, batch_size, num_workers, no_pictures):
    """Score every image under IMAGE_FOLDER (recursively) with a saved model."""
    try:
        device = select_device(gpu, cpu, warn=lambda m: click.echo(m, err=True))
        folder = Path(image_folder)
        paths = find_images(folder)
        model = UcadModel.load(Path(model_path), device, weights)
        _predict(model, folder, paths, Path(output_folder), batch_size, num_workers, not no_pictures)
    except UcadError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)


def _predict(model: UcadModel, folder: Path, paths: list[Path], out: Path, batch_size: int, workers: int,
             pictures: bool) -> None:
    names = [t.name for t in model.tasks]
    thresholds = [t.thresholds.get(KNOWLEDGE) for t in model.tasks]
    if not all(thresholds):
        click.echo("note: the model holds no thresholds (it was trained with dataset --train_val_split 1.0, so no "
                   "normal images were held out): is_anomalous and masks are left empty", err=True)
    for sub in ("maps", "masks", "pictures") if pictures else ("maps", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    geometry = model.config.geometry
    colour_range = None  # without thresholds: one colour scale for every picture, from the first batch
    rows = []
    progress = tqdm(total=len(paths), desc="scoring", unit="img")
    for start in range(0, len(paths), batch_size):
        batch_paths = paths[start:start + batch_size]
        images = load_images([Sample(p, None, False, "good") for p in batch_paths], geometry, workers, show=False)
        scored = model.score(images, batch_size=batch_size)
        maps = scored.anomaly_maps.numpy()
        if colour_range is None:
            colour_range = (float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9)))
        for i, path in enumerate(batch_paths):
            task = int(scored.routed_task[i])
            threshold = thresholds[task]
            score = float(scored.image_scores[i])
            mask = maps[i] > threshold.pixel if threshold else None
            name = _output_name(path, folder)
            rows.append({"image": str(path.relative_to(folder)), "task": names[task],
                         "key_distance": float(scored.key_distances[i, task]), "score": score,
                         "image_threshold": threshold.image if threshold else "",
                         "is_anomalous": int(score > threshold.image) if threshold else "",
                         "anomalous_area": float(mask.mean()) if mask is not None else "",
                         **{f"key_distance_{n}": float(scored.key_distances[i, k]) for k, n in enumerate(names)}})
            np.save(out / "maps" / f"{name}.npy", maps[i].astype(np.float32))
            if mask is not None:
                Image.fromarray((mask * 255).astype(np.uint8)).save(out / "masks" / f"{name}.png")
            if pictures:
                # with thresholds the colour bar runs from 0 to twice the routed task's pixel threshold, so the
                # middle of the bar is where that task's "normal" ends
                low, high = (0.0, 2.0 * threshold.pixel) if threshold else colour_range
                verdict = ("ANOMALOUS" if score > threshold.image else "normal") if threshold else "no threshold"
                caption = (f"{path.relative_to(folder)}: routed to task '{names[task]}' (key distance "
                           f"{float(scored.key_distances[i, task]):.4g}); score {score:.4g}"
                           + (f" vs threshold {threshold.image:.4g}" if threshold else "") + f": {verdict}")
                prediction_picture(images[i].numpy(), maps[i], mask, low, high,
                                   threshold.pixel if threshold else None, caption, out / "pictures" / f"{name}.png")
        progress.update(len(batch_paths))
    progress.close()
    with open(out / "predictions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    flagged = sum(r["is_anomalous"] == 1 for r in rows)
    click.echo(f"scored {len(paths)} images with {len(model.tasks)} task(s) on {model.device}"
               + (f"; {flagged} anomalous at the stored thresholds" if all(thresholds) else "")
               + f"; results in {out / 'predictions.csv'}")


if __name__ == "__main__":
    main()
