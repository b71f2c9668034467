"""Pictures of anomaly maps: the run's image | ground truth | map overlay, and ucad.predict's image | map with
colour bar | predicted mask; one PNG per image. And the maps themselves, as .npy files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ucad.data.layouts import output_name


def save_final_outputs(evaluator, run_dir: Path, phase: int, pictures: bool, maps: bool) -> list[str]:
    """Pictures (image | ground truth | map) and .npy anomaly maps of every test set of a ContinualEvaluator, scored
    task-agnostic after learning task `phase`; returns what was written, one line each."""
    if not (pictures or maps):
        return []
    task_names = [t.name for t in evaluator.model.tasks]
    for test_set in evaluator.test_sets:
        scored = evaluator.task_agnostic_scoring(test_set, phase)
        anomaly_maps = scored.anomaly_maps.numpy()
        names = [output_name(Path(p)) for p in test_set.paths]
        if pictures:
            captions = [f"{Path(p).parent.name} -> {task_names[int(r)]}"
                        for p, r in zip(test_set.paths, scored.routed_task)]
            save_segmentation_images(run_dir / "segmentation_images" / test_set.name, test_set.images,
                                     test_set.masks, anomaly_maps, scored.image_scores.numpy(), names, captions)
        if maps:
            folder = run_dir / "anomaly_maps" / test_set.name
            folder.mkdir(parents=True, exist_ok=True)
            for name, anomaly_map in zip(names, anomaly_maps):
                np.save(folder / f"{name}.npy", anomaly_map.astype(np.float32))
    count = sum(len(test_set.paths) for test_set in evaluator.test_sets)
    written = [f"segmentation images: {count} in {run_dir / 'segmentation_images'}"] if pictures else []
    return written + ([f"anomaly maps (.npy): {count} in {run_dir / 'anomaly_maps'}"] if maps else [])


def save_segmentation_images(folder: Path, images, masks, maps, scores, names: list[str], captions: list[str]):
    """images (N,3,S,S) uint8, masks (N,S,S) {0,1}, maps (N,S,S); the colour scale is shared by all images of a
    task, so normal images look calm next to defects."""
    import matplotlib  # imported on use, so that commands which draw nothing do not wait for it

    folder.mkdir(parents=True, exist_ok=True)
    maps = np.asarray(maps, dtype=np.float32)
    low, high = float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9))
    for i, name in enumerate(names):
        rgb = np.asarray(images[i]).transpose(1, 2, 0)
        scaled = np.clip((maps[i] - low) / max(high - low, 1e-12), 0.0, 1.0)
        heat = (matplotlib.colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8)
        overlay = (0.5 * rgb + 0.5 * heat).astype(np.uint8)
        truth = np.repeat((np.asarray(masks[i]) > 0)[..., None] * 255, 3, axis=2).astype(np.uint8)
        picture = Image.fromarray(np.concatenate([rgb, truth, overlay], axis=1))
        ImageDraw.Draw(picture).text((4, 4), f"{captions[i]} score {float(scores[i]):.3f}", fill=(255, 255, 0))
        picture.save(folder / f"{name}.png")


def prediction_picture(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None, threshold,
                       colour_range: tuple[float, float], caption: str, path: Path) -> None:
    """image (3,S,S) uint8 | anomaly map over it, its colour bar marking the pixel threshold | predicted mask; without
    `threshold` (the routed task's ucad.learning.thresholds.Threshold), the colours span `colour_range`."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    # the colour bar runs from 0 to twice the pixel threshold, so its middle is where the task's "normal" ends
    low, high = (0.0, 2.0 * threshold.pixel) if threshold else colour_range
    rgb = image.transpose(1, 2, 0)
    figure = Figure(figsize=(10.5, 3.9))
    axes = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.08, 1]})
    for axis, title in zip(axes, ("image", "anomaly map")):
        axis.imshow(rgb)
        axis.set_title(title, fontsize=9)
    heat = axes[1].imshow(anomaly_map, cmap="jet", vmin=low, vmax=high, alpha=0.5)
    bar = figure.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.02)
    bar.ax.tick_params(labelsize=7)
    if threshold:
        bar.ax.axhline(threshold.pixel, color="white", linewidth=2)
        bar.ax.axhline(threshold.pixel, color="black", linewidth=0.8)
        axes[2].imshow(mask, cmap="gray", vmin=0, vmax=1)
        axes[2].set_title("predicted mask (map > pixel threshold)", fontsize=9)
    else:
        axes[2].text(0.5, 0.5, "no pixel threshold\nin this model", ha="center", va="center", fontsize=9)
    for axis in axes:
        axis.set(xticks=[], yticks=[])
    figure.suptitle(caption, fontsize=8.5, wrap=True)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
