"""Score new images with a saved UCAD model, without knowing which product (task) they show:

    python -m ucad.predict results/.../models/ucad_model.pt IMAGE_FOLDER OUTPUT_FOLDER [--cpu | --gpu N]

Input and output only: the scoring is `UcadModel.score`, the path the run's own evaluation takes. Writes
predictions.csv (image, routed task, key distances, routing margin and whether the route is trusted, score, the
routed task's threshold, is_anomalous, anomalous area, output name) and per image maps/<name>.npy, masks/<name>.png
(pixels above the routed task's pixel threshold, 0/255) and pictures/<name>.png, where <name> is the image's path
under IMAGE_FOLDER with '__' between folders. Maps and masks are at the model's input geometry (after its resize
and crop)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

from ucad.cli.options import one_line_errors, shared_options
from ucad.data.layouts import IMAGE_SUFFIXES, Sample
from ucad.runtime.device import select_device
from ucad.runtime.errors import UcadError
from ucad.data.decode import load_images
from ucad.model.ucad_model import KNOWLEDGE, UcadModel
from ucad.persistence.model_file import load_model
from ucad.persistence.run_folder import prepare_output_folder
from ucad.results.tables import write_csv
from ucad.results.pictures import prediction_picture


def find_images(folder: Path, output: Path) -> list[Path]:
    """The images under `folder`, recursively; nothing under `output` (an output folder inside the image folder
    holds the pictures of an earlier run, which are no input)."""
    if not folder.is_dir():
        raise UcadError(f"image folder '{folder}' does not exist")
    skipped = output.resolve()
    found = [p for p in folder.rglob("*") if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
             and not p.resolve().is_relative_to(skipped)]
    if (dangling := next((p for p in found if p.is_symlink() and not p.exists()), None)) is not None:
        raise UcadError(f"image '{dangling}' is a symbolic link to '{dangling.readlink()}', which does not exist: "
                        "fix or remove the link")
    paths = sorted(p for p in found if p.is_file())
    if not paths:
        raise UcadError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under '{folder}' outside the output "
                        f"folder '{output}'")
    return paths


def output_names(relative_paths: list[Path]) -> list[str]:
    """The name each image's outputs are saved under: its path under the image folder without suffix, '__' between
    folders; images that would share one ('a.png', 'a.jpg') keep their suffix, a name still taken gets a number."""
    plain = ["__".join(path.with_suffix("").parts) for path in relative_paths]
    shared = Counter(plain)
    names = [name if shared[name] == 1 else "__".join(path.parts) for name, path in zip(plain, relative_paths)]
    taken: Counter[str] = Counter()
    for index, name in enumerate(names):
        taken[name] += 1
        names[index] = name if taken[name] == 1 else f"{name}__{taken[name]}"
    return names


@click.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.argument("image_folder", type=click.Path(path_type=Path))
@click.argument("output_folder", type=click.Path(file_okay=False, path_type=Path))
@shared_options("gpu", "cpu")
@click.option("--weights", default=None,
              help="Take the backbone weights from here (auto | hub | random | PATH) instead of the model file.")
@shared_options("feature_batch_size", "num_workers", renamed={"feature_batch_size": "--batch_size"})
@click.option("--no_pictures", is_flag=True, help="Only write predictions.csv, the .npy maps and the masks.")
@one_line_errors("interrupted; predictions.csv is written once every image is scored: run the same command again")
def main(model_path, image_folder, output_folder, gpu, cpu, weights, feature_batch_size, num_workers, no_pictures):
    """Score every image under IMAGE_FOLDER (recursively) with a saved model."""
    device = select_device(gpu, cpu, warn=lambda m: click.echo(m, err=True))
    paths = find_images(image_folder, output_folder)
    prepare_output_folder(output_folder, "OUTPUT_FOLDER")
    model = load_model(model_path, device, weights)
    _predict(model, image_folder, paths, output_folder, feature_batch_size, num_workers, not no_pictures)


def _predict(model: UcadModel, folder: Path, paths: list[Path], out: Path, batch_size: int, workers: int,
             pictures: bool) -> None:
    names = [t.name for t in model.tasks]
    thresholds = [t.thresholds.get(KNOWLEDGE) for t in model.tasks]
    if not all(thresholds):
        click.echo("note: the model holds no thresholds (it was trained with dataset --train_val_split 1.0, so no "
                   "normal images were held out): is_anomalous and masks are left empty", err=True)
    for sub in ("maps", "masks", "pictures") if pictures else ("maps", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    relative = [path.relative_to(folder) for path in paths]
    outputs = output_names(relative)
    colour_range = None  # without thresholds: one colour scale for every picture, from the first batch
    rows = []
    with tqdm(total=len(paths), desc="scoring", unit="img") as progress:
        for start in range(0, len(paths), batch_size):
            batch = range(start, min(start + batch_size, len(paths)))
            images = load_images([Sample(paths[j], None, False, "good") for j in batch], model.config.geometry,
                                 workers, show=False)
            scored = model.score(images, batch_size=batch_size)
            maps, distances = scored.anomaly_maps.numpy(), scored.key_distances.tolist()
            trusted = scored.route_trusted.tolist() if scored.route_trusted is not None else [None] * len(batch)
            colour_range = colour_range or (float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9)))
            for i, j in enumerate(batch):
                task, score, name = int(scored.routed_task[i]), float(scored.image_scores[i]), outputs[j]
                threshold = thresholds[task]
                np.save(out / "maps" / f"{name}.npy", maps[i].astype(np.float32))
                row = {"image": str(relative[j]), "task": names[task], "key_distance": distances[i][task],
                       "score": score, "image_threshold": "", "is_anomalous": "", "anomalous_area": "",
                       "routing_margin": float(scored.routing_margins[i]),
                       "route_trusted": "" if trusted[i] is None else int(trusted[i]), "output_name": name}
                mask, verdict = None, ": no threshold"
                if threshold:
                    mask = maps[i] > threshold.pixel
                    Image.fromarray((mask * 255).astype(np.uint8)).save(out / "masks" / f"{name}.png")
                    row.update(image_threshold=threshold.image, is_anomalous=int(score > threshold.image),
                               anomalous_area=float(mask.mean()))
                    verdict = f" vs threshold {threshold.image:.4g}: {'ANOMALOUS' if row['is_anomalous'] else 'normal'}"
                rows.append({**row, **{f"key_distance_{n}": distances[i][k] for k, n in enumerate(names)}})
                if pictures:
                    route = "" if trusted[i] is not False else ", NOT TRUSTED: too close to another task"
                    caption = (f"{row['image']}: routed to task '{row['task']}' (key distance "
                               f"{row['key_distance']:.4g}{route}); score {score:.4g}{verdict}")
                    prediction_picture(images[i].numpy(), maps[i], mask, threshold, colour_range, caption,
                                       out / "pictures" / f"{name}.png")
            progress.update(len(batch))
    write_csv(out / "predictions.csv", rows)
    flagged = sum(r["is_anomalous"] == 1 for r in rows)
    untrusted = sum(r["route_trusted"] == 0 for r in rows)
    click.echo(f"scored {len(paths)} images with {len(model.tasks)} task(s) on {model.device}"
               + (f"; {flagged} anomalous at the stored thresholds" if all(thresholds) else "")
               + (f"; {untrusted} with a route not trusted (route_trusted 0: send to a person)" if untrusted else "")
               + f"; results in {out / 'predictions.csv'}")


if __name__ == "__main__":
    main()
