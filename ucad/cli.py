"""The chained command line: `run_ucad.py [global options] RESULTS_PATH ucad ... sampler ... dataset ...`.

Option names and defaults follow the released UCAD/PatchCore command line so published commands run
as written; options that are new here say so in their help.
"""
from __future__ import annotations

import math
import sys

import click

from ucad.coreset import SAMPLER_NAMES
from ucad.errors import RunInterrupted, UcadError
from ucad.backbones import INPUT_NORMS
from ucad.epoch_selection import EPOCH_SELECTIONS
from ucad.keys import KEY_SAMPLERS
from ucad.knowledge import KNOWLEDGE_STORAGES
from ucad.loss import LABEL_SAMPLING
from ucad.nearest_neighbor import BACKENDS, PATCH_DISTANCES
from ucad.training import SCL_FEATURES


@click.group(chain=True)
@click.argument("results_path", type=click.Path(file_okay=False))
@click.option("--gpu", type=int, default=[0], multiple=True, show_default=True,
              help="GPU index among those CUDA_VISIBLE_DEVICES shows; without a GPU the run falls back to the CPU.")
@click.option("--cpu", is_flag=True, help="Run on the CPU even when a GPU is visible (new).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random choice (prompts, coresets, shuffles).")
@click.option("--log_group", type=str, default="group", show_default=True, help="Run folder name; _N is appended, counting up.")
@click.option("--log_project", type=str, default="project", show_default=True, help="Folder under RESULTS_PATH grouping runs.")
@click.option("--save_segmentation_images", is_flag=True, help="Write image | ground truth | anomaly map pictures per test image.")
@click.option("--save_patchcore_model", is_flag=True, help="Save keys, prompts and knowledge to models/ucad_model.pt for ucad.predict.")
@click.option("--memory_size", type=int, default=196, show_default=True, help="Knowledge vectors kept per task (coreset size).")
@click.option("--epochs_num", type=int, default=25, show_default=True, help="Prompt training epochs per task (fixed; never chosen on test data).")
@click.option("--key_size", type=int, default=196, show_default=True, help="Key vectors per task used to route test images.")
@click.option("--basic_size", type=int, default=1960, show_default=True, help="Knowledge size of the 'unlimited' variant reported beside (0 = off).")
@click.option("--resume", is_flag=True, help="Continue the last run of this log group after its last finished task (new).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Autocast for the backbone: auto = bf16 on GPU, fp32 on CPU (new).")
@click.option("--reference_evaluation", is_flag=True, hidden=True,
              help="Recompute every test feature and score in every phase (slow reference for checking the caches).")
def main(**kwargs):
    """UCAD: unsupervised continual anomaly detection with contrastively-learned prompts."""


@main.command("ucad")
@click.option("-b", "--backbone_names", multiple=True, default=["vit_base_patch16_224"], show_default=True,
              help="timm backbone actually used (ViT: prefix prompts; CNN e.g. wideresnet50, efficientnet_lite0: channel prompts).")
@click.option("-le", "--layers_to_extract_from", multiple=True, default=[],
              help="Layers to read: ViT block index (5 or blocks.5), CNN module (layer2) or feature-stage index (2). Default 5 / 2,3.")
@click.option("--weights", default="auto", show_default=True,
              help="auto | hub | random | PATH to a .pth/.safetensors/.npz checkpoint (new; auto = offline package for efficientnet_lite0, else timm hub).")
@click.option("--input_norm", type=click.Choice(INPUT_NORMS), default="auto", show_default=True,
              help="Input mean/std: imagenet (as released, for every backbone), backbone (the weights' own config); "
                   "auto = imagenet, except the offline EfficientNet-Lite0 weights, trained on [-1, 1] (new).")
@click.option("--mode", type=click.Choice(["ucad", "patchcore"]), default="ucad", show_default=True,
              help="ucad = the continual method; patchcore = one PatchCore bank per task, no prompts (oracle baseline) (new).")
@click.option("--pretrain_embed_dimension", type=int, default=1024, show_default=True, help="Per-layer feature size after pooling.")
@click.option("--target_embed_dimension", type=int, default=1024, show_default=True, help="Patch feature size after merging layers.")
@click.option("--preprocessing", type=click.Choice(["mean"]), default="mean", show_default=True, help="Per-layer projection: adaptive average pooling.")
@click.option("--aggregation", type=click.Choice(["mean"]), default="mean", show_default=True, help="Layer merging: adaptive average pooling.")
@click.option("--anomaly_scorer_num_nn", type=int, default=1, show_default=True, help="k nearest knowledge vectors averaged for a patch score.")
@click.option("--patchsize", type=int, default=3, show_default=True, help="Neighbourhood (p x p) aggregated into each patch feature.")
@click.option("--patchscore", type=click.Choice(["max"]), default="max", show_default=True, help="Image score from patch scores.")
@click.option("--patchoverlap", type=float, default=0.0, show_default=True, help="Accepted for compatibility; patches always use stride 1.")
@click.option("--patchsize_aggregate", type=int, multiple=True, default=[], help="Accepted for compatibility (unused, as in PatchCore).")
@click.option("--faiss_on_gpu", is_flag=True, help="Use a faiss GPU index when faiss has GPU support (else torch on the GPU).")
@click.option("--faiss_num_workers", type=int, default=8, show_default=True, help="faiss CPU threads.")
@click.option("--nn_backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="Nearest-neighbour search: auto = faiss on CPU, torch on GPU (new).")
@click.option("--patch_distance", type=click.Choice(PATCH_DISTANCES), default="squared", show_default=True,
              help="Patch score and key distance: squared L2 as the released faiss IndexFlatL2, or euclidean (new).")
@click.option("--key_sampler", type=click.Choice(KEY_SAMPLERS), default="kmeans", show_default=True,
              help="How a task's keys are chosen from its frozen patches: kmeans centroids cover typical patches "
                   "(routes best); approx_greedy_coreset is the released code's choice (new).")
@click.option("--epoch_selection", type=click.Choice(EPOCH_SELECTIONS), default="last", show_default=True,
              help="last: the prompt after --epochs_num epochs; validation: the best epoch (or none) on held-out "
                   "normal images with synthetic defects (needs dataset --train_val_split < 1; never the test set) (new).")
@click.option("--knowledge_storage", type=click.Choice(KNOWLEDGE_STORAGES), default="fp32", show_default=True,
              help="How knowledge is stored: fp32 (released), fp16 or pq (product quantisation); pair with "
                   "--memory_size 392 (fp16) or 2176 (pq) for the paper's 784 KiB per task (new).")
@click.option("--no_scl", is_flag=True, help="Train without structure maps: prompts stay at their initialisation (new).")
@click.option("--scl_features", type=click.Choice(SCL_FEATURES), default="raw", show_default=True,
              help="What SCL sees: raw extractor tokens at the grid (as released) or the pooled PatchCore embedding (new).")
@click.option("--label_sampling", type=click.Choice(sorted(LABEL_SAMPLING)), default="centre", show_default=True,
              help="Region id of a patch: at its centre pixel (as released) or its top-left pixel (new).")
@click.option("--prompt_length", type=int, default=1, show_default=True, help="Prefix key/value tokens per layer (new).")
@click.option("--lr", type=float, default=5e-4, show_default=True, help="Adam learning rate of the prompt (new).")
@click.option("--smoothing_sigma", type=float, default=4.0, show_default=True, help="Gaussian sigma of the anomaly map (new).")
@click.option("--feature_batch_size", type=int, default=32, show_default=True, help="Images per batch when extracting features (new).")
def ucad_command(**kwargs):
    """The model: backbone, layers, patch features, scoring."""
    return "ucad", kwargs


@main.command("sampler")
@click.argument("name", type=click.Choice(SAMPLER_NAMES))
@click.option("-p", "--percentage", type=float, default=0.1, show_default=True,
              help="Fraction kept in patchcore mode; ucad mode uses the fixed --key_size/--memory_size.")
def sampler_command(name, percentage):
    """Coreset sampler for keys and knowledge."""
    return "sampler", {"name": name, "percentage": percentage}


@main.command("dataset")
@click.argument("name", type=click.Choice(["mvtec", "visa"]))
@click.argument("data_path", type=click.Path())
@click.option("-d", "--subdatasets", multiple=True, help="Category (task), repeat in task order; default: all found.")
@click.option("--train_val_split", type=float, default=1.0, show_default=True,
              help="Fraction of training images used (seeded); the rest is held out (validation for --epoch_selection).")
@click.option("--batch_size", type=int, default=8, show_default=True, help="Prompt-training batch size.")
@click.option("--num_workers", type=int, default=8, show_default=True, help="Threads decoding images.")
@click.option("--resize", type=int, default=224, show_default=True, help="Shorter image side before the centre crop.")
@click.option("--imagesize", type=int, default=224, show_default=True, help="Network input size (square).")
@click.option("--resize_mode", type=click.Choice(["crop", "square"]), default="crop", show_default=True,
              help="crop: resize + centre crop; square: squash to imagesize, nothing cut (non-square data) (new).")
@click.option("--augment", is_flag=True, help="Random flips of training images during prompt training.")
@click.option("--structure_path", type=click.Path(), default=None,
              help="Structure-map tree (default DATA_PATH-sam-b), made by segment_anything_prep (new).")
def dataset_command(**kwargs):
    """Data: MVTec-layout folder or VisA, tasks in the order of -d."""
    return "dataset", kwargs


@main.result_callback()
def run(methods, results_path, gpu, cpu, seed, log_group, log_project, save_segmentation_images, save_patchcore_model,
        memory_size, epochs_num, key_size, basic_size, resume, precision, reference_evaluation):
    parts = dict(methods)
    order = [name for name, _ in methods]
    if "dataset" not in parts:
        _fail("the 'dataset NAME DATA_PATH' sub-command is missing (e.g. ... dataset mvtec /data/mvtec)")
    if order != sorted(order, key=["ucad", "sampler", "dataset"].index):
        _fail(f"sub-commands must come in the order ucad, sampler, dataset (got {', '.join(order)})")
    # an omitted sub-command means its defaults
    model = parts["ucad"] if "ucad" in parts else ucad_command.make_context("ucad", []).params
    sampler = parts.get("sampler", {"name": "approx_greedy_coreset", "percentage": 0.1})
    data = parts["dataset"]
    if len(model["backbone_names"]) != 1:
        _fail(f"-b/--backbone_names: one backbone per run, got {list(model['backbone_names'])}")
    config = {
        "results_path": results_path, "log_project": log_project, "log_group": log_group, "seed": seed,
        "gpu": list(gpu), "cpu": cpu, "resume": resume, "precision": precision,
        "reference_evaluation": reference_evaluation,
        "save_segmentation_images": save_segmentation_images, "save_patchcore_model": save_patchcore_model,
        "faiss_on_gpu": model["faiss_on_gpu"], "faiss_num_workers": model["faiss_num_workers"],
        "nn_backend": model["nn_backend"],
        "model": {
            "backbone": model["backbone_names"][0], "layers": list(model["layers_to_extract_from"]),
            "weights": model["weights"], "input_norm": model["input_norm"], "patchsize": model["patchsize"],
            "pretrain_embed_dimension": model["pretrain_embed_dimension"],
            "target_embed_dimension": model["target_embed_dimension"], "prompt_length": model["prompt_length"],
            "imagesize": data["imagesize"], "resize": data["resize"], "resize_mode": data["resize_mode"],
            "anomaly_scorer_num_nn": model["anomaly_scorer_num_nn"], "patch_distance": model["patch_distance"],
            "smoothing_sigma": model["smoothing_sigma"],
            "mode": model["mode"],
        },
        "learning": {
            "key_size": key_size, "key_sampler": model["key_sampler"], "memory_size": memory_size,
            "knowledge_storage": model["knowledge_storage"], "epoch_selection": model["epoch_selection"],
            "basic_size": basic_size, "epochs_num": epochs_num,
            "lr": model["lr"], "batch_size": data["batch_size"], "train_prompt": not model["no_scl"],
            "scl_features": model["scl_features"], "label_sampling": model["label_sampling"],
            "augment": data["augment"], "feature_batch_size": model["feature_batch_size"], "seed": seed,
        },
        "sampler": sampler,
        "dataset_name": data["name"], "data_path": data["data_path"], "categories": list(data["subdatasets"]),
        "train_val_split": data["train_val_split"], "num_workers": data["num_workers"],
        "structure_path": data["structure_path"],
        "geometry": {"resize": data["resize"], "imagesize": data["imagesize"], "resize_mode": data["resize_mode"]},
    }
    # every number is checked here, before anything is loaded: a bad value must be one line, not a traceback
    # from deep inside torch (or a silent nonsense run)
    for name, value, minimum in (("--memory_size", memory_size, 1), ("--key_size", key_size, 1),
                                 ("--basic_size", basic_size, 0), ("--epochs_num", epochs_num, 0),
                                 ("--batch_size", data["batch_size"], 1), ("--imagesize", data["imagesize"], 16),
                                 ("--resize", data["resize"], 16), ("--gpu", min(gpu, default=0), 0),
                                 ("--seed", seed, 0), ("--patchsize", model["patchsize"], 1),
                                 ("--pretrain_embed_dimension", model["pretrain_embed_dimension"], 1),
                                 ("--target_embed_dimension", model["target_embed_dimension"], 1),
                                 ("--anomaly_scorer_num_nn", model["anomaly_scorer_num_nn"], 1),
                                 ("--patchsize_aggregate", min(model["patchsize_aggregate"], default=1), 1),
                                 ("--faiss_num_workers", model["faiss_num_workers"], 0),
                                 ("--prompt_length", model["prompt_length"], 1),
                                 ("--feature_batch_size", model["feature_batch_size"], 1),
                                 ("--num_workers", data["num_workers"], 0),
                                 ("--smoothing_sigma", model["smoothing_sigma"], 0)):
        if not math.isfinite(value) or value < minimum:
            _fail(f"{name} must be at least {minimum}, got {value}")
    for name, value, valid, expected in (
            ("--seed", seed, seed < 2 ** 32, "below 2**32 (numpy's limit)"),
            ("--lr", model["lr"], model["lr"] > 0, "above 0"),
            ("sampler -p/--percentage", sampler["percentage"], 0 < sampler["percentage"] <= 1, "in (0, 1]"),
            ("--train_val_split", data["train_val_split"], 0 < data["train_val_split"] <= 1, "in (0, 1]"),
            ("--patchoverlap", model["patchoverlap"], 0 <= model["patchoverlap"] < 1, "in [0, 1)")):
        if not (math.isfinite(value) and valid):
            _fail(f"{name} must be {expected}, got {value}")
    if model["epoch_selection"] == "validation" and data["train_val_split"] >= 1.0:
        _fail("--epoch_selection validation scores each epoch on held-out normal training images: keep some aside "
              "with `dataset --train_val_split 0.9`")
    try:
        from ucad.experiment import run_experiment  # heavy imports only once the command line is valid

        run_experiment(config)
    except UcadError as error:
        _fail(str(error))
    except RunInterrupted as interrupted:
        _interrupted(str(interrupted))
    except KeyboardInterrupt:  # while importing torch: nothing was written yet
        _interrupted("interrupted before the run started; nothing was written")


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _interrupted(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(130)  # what shells report for a program ended by Ctrl-C


def entry() -> None:
    """Console entry point; user-fixable problems print one line, not a traceback."""
    try:
        main()
    except UcadError as error:
        _fail(str(error))


if __name__ == "__main__":
    entry()
