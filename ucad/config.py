"""The typed configuration of a run: the model, how each task is learned, the data, and how the run executes.

Every default lives here and nowhere else. A field that the command line sets carries its sub-command, option and
help in its metadata: `ucad.cli` builds the options from them, and `--resume` names a differing field by its option."""
from __future__ import annotations

import json
import math
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, Callable

from ucad.model.backbones import INPUT_NORMS
from ucad.model.coreset import SAMPLER_NAMES
from ucad.data.layouts import LAYOUTS
from ucad.learning.epoch_selection import EPOCH_SELECTIONS
from ucad.runtime.errors import UcadError
from ucad.data.decode import ImageGeometry
from ucad.model.keys import KEY_SAMPLERS
from ucad.model.knowledge import KNOWLEDGE_STORAGES
from ucad.learning.loss import LABEL_SAMPLING
from ucad.model.nearest_neighbor import BACKENDS, PATCH_DISTANCES
from ucad.model.router import ROUTINGS
from ucad.learning.prompt_training import SCL_FEATURES


@dataclass(frozen=True)
class CliParameter:
    command: str  # "main" (global options), "ucad", "sampler" or "dataset"
    declarations: tuple[str, ...]  # ("-b", "--backbone_names"); empty for a positional argument
    help: str = ""
    metavar: str | None = None  # the name of a positional argument (NAME, DATA_PATH)
    # click's keywords; "type" may also be a tuple of choices or "path" / "folder", so this module needs no click
    click: dict = field(default_factory=dict)
    minimum: float | None = None  # smallest accepted value
    greater_than: float | None = None  # values must exceed this
    maximum: float | None = None  # largest accepted value
    less_than: float | None = None  # values must stay below this
    parse: Callable[[Any], Any] | None = None  # click's value -> the field's value
    resume_may_differ: bool = False  # how the run executes, not what it computes: --resume accepts a change

    @property
    def typed(self) -> str:
        """The parameter as the user types it: --epochs_num, or 'dataset DATA_PATH' for an argument."""
        if not self.declarations:
            return self.metavar if self.command == "main" else f"{self.command} {self.metavar}"
        return max(self.declarations, key=len)


def option(default, command: str, *declarations: str, help: str, minimum=None, greater_than=None, maximum=None,
           less_than=None, parse=None, resume_may_differ: bool = False, **click_kwargs):
    parameter = CliParameter(command, declarations, help, None, click_kwargs, minimum, greater_than, maximum,
                             less_than, parse, resume_may_differ)
    return field(default=default, metadata={"cli": parameter})


def argument(command: str, metavar: str, default=MISSING, **click_kwargs):
    return field(default=default, metadata={"cli": CliParameter(command, (), metavar=metavar, click=click_kwargs)})


def cli_parameter(config_field: Field) -> CliParameter | None:
    return config_field.metadata.get("cli")


def _one_backbone(names: tuple[str, ...]) -> str:
    if len(names) != 1:
        raise UcadError(f"-b/--backbone_names: one backbone per run, got {list(names)}")
    return names[0]


@dataclass
class ModelConfig:
    """What the model is: backbone, patch features, scoring, input geometry. Stored in the model file."""

    backbone: str = option("vit_base_patch16_224", "ucad", "-b", "--backbone_names", multiple=True, parse=_one_backbone,
                           help="timm backbone actually used (ViT: prefix prompts; CNN e.g. wideresnet50, "
                                "efficientnet_lite0: channel prompts).")
    layers: tuple[str, ...] = option((), "ucad", "-le", "--layers_to_extract_from", multiple=True, help=(
        "Layers to read: ViT block index (5 or blocks.5), CNN module (layer2) or feature-stage index (2). "
        "Default 5 / 2,3."))
    weights: str = option("auto", "ucad", "--weights", help=(
        "auto | hub | random | PATH to a .pth/.safetensors/.npz checkpoint; auto = the offline package for "
        "efficientnet_lite0, else the timm hub."))
    input_norm: str = option("auto", "ucad", "--input_norm", type=INPUT_NORMS, help=(
        "Input mean/std: imagenet (as released, for every backbone) or backbone (the weights' own config); auto = "
        "imagenet, except [-1, 1] for the offline EfficientNet-Lite0 weights, which were trained on that range."))
    mode: str = option("ucad", "ucad", "--mode", type=("ucad", "patchcore"), help=(
        "ucad = the continual method; patchcore = one PatchCore bank per task, no prompts (oracle baseline)."))
    pretrain_embed_dimension: int = option(1024, "ucad", "--pretrain_embed_dimension", minimum=1, help=(
        "Per-layer feature size after pooling."))
    target_embed_dimension: int = option(1024, "ucad", "--target_embed_dimension", minimum=1, help=(
        "Patch feature size after merging layers."))
    # the next five options exist so that PatchCore command lines parse; each has the one value this code implements
    preprocessing: str = option("mean", "ucad", "--preprocessing", type=("mean",), hidden=True, help=(
        "Per-layer projection: adaptive average pooling."))
    aggregation: str = option("mean", "ucad", "--aggregation", type=("mean",), hidden=True, help=(
        "Layer merging: adaptive average pooling."))
    anomaly_scorer_num_nn: int = option(1, "ucad", "--anomaly_scorer_num_nn", minimum=1, help=(
        "k nearest knowledge vectors averaged for a patch score."))
    patchsize: int = option(3, "ucad", "--patchsize", minimum=1, help="p x p neighbourhood aggregated per patch.")
    patchscore: str = option("max", "ucad", "--patchscore", type=("max",), hidden=True, help=(
        "Image score from patch scores: their maximum."))
    patchoverlap: float = option(0.0, "ucad", "--patchoverlap", minimum=0, less_than=1, hidden=True, help=(
        "Ignored: patches always use stride 1."))
    patchsize_aggregate: tuple[int, ...] = option((), "ucad", "--patchsize_aggregate", multiple=True, type=int,
                                                  minimum=1, hidden=True, help="Ignored, as in PatchCore.")
    patch_distance: str = option("squared", "ucad", "--patch_distance", type=PATCH_DISTANCES, help=(
        "Patch and key distance: squared L2 (the released IndexFlatL2) or euclidean."))
    routing: str = option("mean", "ucad", "--routing", type=ROUTINGS, help=(
        "What routing compares across tasks: mean (as released) = mean nearest-key distance; calibrated = that "
        "distance over its mean on the task's own normal images; gaussian = an image-level diagonal Gaussian of "
        "frozen features, calibrated alike; calibrated_gaussian = the mean of the two."))
    prompt_length: int = option(1, "ucad", "--prompt_length", minimum=1, help="Prefix key/value tokens per layer.")
    smoothing_sigma: float = option(4.0, "ucad", "--smoothing_sigma", minimum=0, help="Gaussian sigma of anomaly maps.")
    resize: int = option(224, "dataset", "--resize", minimum=16, help="Shorter image side before the centre crop.")
    imagesize: int = option(224, "dataset", "--imagesize", minimum=16, help="Network input size (square).")
    resize_mode: str = option("crop", "dataset", "--resize_mode", type=("crop", "square"), help=(
        "crop: resize + centre crop; square: squash to imagesize, nothing cut (non-square data)."))

    @property
    def geometry(self) -> ImageGeometry:
        return ImageGeometry(self.resize, self.imagesize, self.resize_mode)

    @property
    def learns_prompts(self) -> bool:
        """patchcore mode keeps a coreset of the frozen features: no prompt, no structure maps."""
        return self.mode == "ucad"


@dataclass
class LearningConfig:
    """How each task is learned: keys, prompt training, knowledge, thresholds."""

    seed: int = option(0, "main", "--seed", minimum=0, less_than=2 ** 32, help=(
        "Seed of every random choice (prompts, coresets, shuffles, splits)."))
    memory_size: int = option(196, "main", "--memory_size", minimum=1, help="Knowledge vectors per task (the coreset).")
    epochs_num: int = option(25, "main", "--epochs_num", minimum=0, help=(
        "Prompt training epochs per task (fixed; never chosen on test data)."))
    key_size: int = option(196, "main", "--key_size", minimum=1, help="Key vectors per task used to route test images.")
    key_sampler: str = option("kmeans", "ucad", "--key_sampler", type=KEY_SAMPLERS, help=(
        "How a task's keys are chosen from its frozen patches: kmeans centroids or random patches cover the typical "
        "ones; approx_greedy_coreset (as released) and greedy_coreset pick the most outlying."))
    key_storage: str = option("fp32", "ucad", "--key_storage", type=KNOWLEDGE_STORAGES, help=(
        "How keys are stored: fp32 (as released), fp16 or pq (product quantisation, as knowledge); --key_size 392 "
        "(fp16) or 2176 (pq) keeps the paper's 784 KiB of keys per task."))
    epoch_selection: str = option("last", "ucad", "--epoch_selection", type=EPOCH_SELECTIONS, help=(
        "last: the prompt after --epochs_num epochs; validation: the best epoch (or none) on held-out normal images "
        "with synthetic defects, never the test set (needs dataset --train_val_split < 1)."))
    knowledge_storage: str = option("fp32", "ucad", "--knowledge_storage", type=KNOWLEDGE_STORAGES, help=(
        "Knowledge storage: fp32 (as released), fp16 or pq (product quantisation); --memory_size 392 (fp16) or "
        "2176 (pq) keeps the paper's 784 KiB per task."))
    basic_size: int = option(1960, "main", "--basic_size", minimum=0, help=(
        "Knowledge size of the 'unlimited' variant reported beside (0 = off)."))
    threshold_quantile: float = option(0.99, "main", "--threshold_quantile", greater_than=0.0, maximum=1.0, help=(
        "Per-task image and pixel thresholds: this quantile of the scores of the held-out normal training images "
        "(dataset --train_val_split)."))
    sampler: str = argument("sampler", "NAME", default="approx_greedy_coreset", type=SAMPLER_NAMES)
    sampler_percentage: float = option(0.1, "sampler", "-p", "--percentage", greater_than=0, maximum=1, help=(
        "Fraction kept in patchcore mode (ucad mode: --key_size/--memory_size)."))
    train_prompt: bool = option(True, "ucad", "--no_scl", is_flag=True, flag_value=False, help=(
        "Train without structure maps: prompts stay at their initialisation."))
    scl_features: str = option("raw", "ucad", "--scl_features", type=SCL_FEATURES, help=(
        "What SCL sees: raw extractor tokens at the patch grid (as released) or the pooled PatchCore embedding."))
    label_sampling: str = option("centre", "ucad", "--label_sampling", type=tuple(sorted(LABEL_SAMPLING)), help=(
        "Region id of a patch: at its centre pixel (as released) or its top-left pixel."))
    prompt_anchor: float = option(0.0, "ucad", "--prompt_anchor", minimum=0.0, help=(
        "Weight of a term that keeps the prompted embedding of normal training images near the frozen one (relative "
        "squared drift); 0 = off, as released."))
    lr: float = option(5e-4, "ucad", "--lr", greater_than=0, help="Adam learning rate of the prompt.")
    feature_batch_size: int = option(32, "ucad", "--feature_batch_size", minimum=1, resume_may_differ=True, help=(
        "Images per batch when extracting features."))
    batch_size: int = option(8, "dataset", "--batch_size", minimum=1, help="Prompt-training batch size.")
    augment: bool = option(False, "dataset", "--augment", is_flag=True, help="Random image flips in prompt training.")
    grad_clip: float = 1.0
    temperature: float = 0.5

    def task_seed(self, task_index: int) -> int:
        """The seed of task `task_index`'s random choices (keys, prompt, coreset, codebook): distinct per task and
        seed, and within what every library takes as a seed (faiss wants a C int)."""
        return (self.seed * 1000 + task_index) % 2 ** 31


@dataclass
class DataConfig:
    """Which data: the layout, the folder, the tasks in order, the held-out split."""

    name: str = argument("dataset", "NAME", type=tuple(LAYOUTS))
    data_path: str = argument("dataset", "DATA_PATH", type="path")
    categories: tuple[str, ...] = option((), "dataset", "-d", "--subdatasets", multiple=True, help=(
        "Category (task), repeat in task order; default: all found."))
    train_val_split: float = option(1.0, "dataset", "--train_val_split", greater_than=0.0, maximum=1.0, help=(
        "Fraction of each task's training images used for learning (seeded); the rest is held out as normal images "
        "that set the thresholds."))
    num_workers: int = option(8, "dataset", "--num_workers", minimum=0, resume_may_differ=True, help=(
        "Threads decoding images (0 or 1: in the main thread)."))
    structure_path: str | None = option(None, "dataset", "--structure_path", type="path", help=(
        "Structure-map tree (default DATA_PATH-sam-b), made by segment_anything_prep."))


@dataclass
class RunConfig:
    """How and where the run executes; none of it changes what is learned (so --resume accepts changes)."""

    results_path: str = argument("main", "RESULTS_PATH", type="folder")
    gpu: tuple[int, ...] = option((0,), "main", "--gpu", multiple=True, type=int, minimum=0, help=(
        "GPU index among those CUDA_VISIBLE_DEVICES shows; without a GPU, the CPU is used (with a warning)."))
    cpu: bool = option(False, "main", "--cpu", is_flag=True, help="Run on the CPU even when a GPU is visible.")
    log_group: str = option("group", "main", "--log_group", help="Run folder name; _N is appended, counting up.")
    log_project: str = option("project", "main", "--log_project", help="Folder under RESULTS_PATH grouping runs.")
    save_segmentation_images: bool = option(False, "main", "--save_segmentation_images", is_flag=True, help=(
        "Write image | ground truth | anomaly map pictures per test image."))
    save_anomaly_maps: bool = option(False, "main", "--save_anomaly_maps", is_flag=True, help=(
        "Write each test image's anomaly map (final phase) as .npy."))
    save_patchcore_model: bool = option(False, "main", "--save_patchcore_model", is_flag=True, help=(
        "Save a self-contained model (backbone weights, keys, prompts, knowledge, thresholds) to "
        "models/ucad_model.pt for ucad.predict / ucad.evaluate."))
    save_full_model: bool = option(False, "main", "--save_full_model", is_flag=True, help=(
        "With --save_patchcore_model, also keep what scoring never uses: the unlimited knowledge and the backbone "
        "layers after the deepest extracted one."))
    resume: bool = option(False, "main", "--resume", is_flag=True, help=(
        "Continue the last run of this log group after its last finished task."))
    precision: str = option("fp32", "main", "--precision", type=("auto", "fp32", "bf16", "fp16"), help=(
        "Backbone arithmetic: fp32 (as released; a GPU gives the CPU's numbers), bf16 / fp16 autocast (metrics move "
        "slightly, see the README), or auto = bf16 if the GPU has it."))
    reference_evaluation: bool = option(False, "main", "--reference_evaluation", is_flag=True, hidden=True, help=(
        "Recompute every test feature and score in every phase (slow reference for checking the caches)."))
    faiss_on_gpu: bool = option(False, "ucad", "--faiss_on_gpu", is_flag=True, help=(
        "Use a faiss GPU index when faiss has GPU support (else torch on the GPU)."))
    faiss_num_workers: int = option(8, "ucad", "--faiss_num_workers", minimum=0, help=(
        "faiss CPU threads (0: faiss's own choice of one)."))
    nn_backend: str = option("auto", "ucad", "--nn_backend", type=BACKENDS, help=(
        "Nearest-neighbour search: auto = faiss on CPU, torch on GPU."))
    fpr_limit: float = 0.3  # AUPRO integrates the PRO curve up to this false-positive rate


CONFIG_CLASSES = {"model": ModelConfig, "learning": LearningConfig, "data": DataConfig, "run": RunConfig}


@dataclass
class Configs:
    model: ModelConfig
    learning: LearningConfig
    data: DataConfig
    run: RunConfig

    def as_dict(self) -> dict:
        """JSON-compatible: what config.json, checkpoints and model files record."""
        return {name: to_dict(getattr(self, name)) for name in CONFIG_CLASSES}

    def check(self) -> None:
        for name in CONFIG_CLASSES:
            check_bounds(getattr(self, name))
        self.model.geometry.check()
        if self.learning.epoch_selection == "validation" and self.data.train_val_split >= 1.0:
            raise UcadError("--epoch_selection validation scores each epoch on held-out normal training images: "
                            "keep some aside with `dataset --train_val_split 0.9`")


def to_dict(config) -> dict:
    return json.loads(json.dumps(asdict(config)))


def from_dict(cls, values: dict):
    """The inverse of to_dict (JSON lists back to tuples); unknown keys are ignored, missing ones take defaults."""
    known = {f.name for f in fields(cls)}
    return cls(**{name: tuple(value) if isinstance(value, list) else value
                  for name, value in values.items() if name in known})


def check_bounds(config) -> None:
    """The limits and choices declared on the fields, as one-line errors naming the option (every value of a
    repeated one). The modules below take their arguments as checked here."""
    for config_field in fields(config):
        parameter, value = cli_parameter(config_field), getattr(config, config_field.name)
        problem = bounds_problem(parameter, value) if parameter else None
        choices = parameter.click.get("type") if parameter else None
        if isinstance(choices, tuple) and value not in choices:
            problem = f"'{value}' is not one of {', '.join(choices)}"
        if problem:
            raise UcadError(f"{parameter.typed} {problem}")


def bounds_problem(parameter: CliParameter, value) -> str | None:
    """'must be at least 1, got 0' when a value (any value of a repeated option) breaks the parameter's limits;
    nan and infinity always do."""
    low_open, high_open = parameter.greater_than is not None, parameter.less_than is not None
    low = parameter.greater_than if low_open else parameter.minimum
    high = parameter.less_than if high_open else parameter.maximum
    for one in value if isinstance(value, tuple) else (value,):
        if isinstance(one, bool) or not isinstance(one, (int, float)):
            continue
        too_low = low is not None and (one <= low if low_open else one < low)
        too_high = high is not None and (one >= high if high_open else one > high)
        if too_low or too_high or not math.isfinite(one):
            return f"must be {_interval(low, high, low_open, high_open)}, got {one}"
    return None


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return "a finite number"
    if high is None:
        return f"{'above' if low_open else 'at least'} {_number(low)}"
    if low is None:
        return f"{'below' if high_open else 'at most'} {_number(high)}"
    return f"in {'(' if low_open else '['}{_number(low)}, {_number(high)}{')' if high_open else ']'}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def differing_options(recorded: dict, current: Configs) -> list[str]:
    """The options (as typed) whose recorded value differs from the current one, among those that define what a run
    computes; `recorded` is Configs.as_dict() of the earlier run."""
    now = current.as_dict()
    differing = []
    for name in ("model", "learning", "data"):  # RunConfig only says how and where a run executes
        for config_field in fields(CONFIG_CLASSES[name]):
            parameter, after = cli_parameter(config_field), now[name][config_field.name]
            # an option the earlier run's version did not have yet ran at its default
            default = json.loads(json.dumps(config_field.default)) if config_field.default is not MISSING else None
            before = recorded.get(name, {}).get(config_field.name, default)
            if before != after and not (parameter and parameter.resume_may_differ):
                label = parameter.typed if parameter else f"{name}.{config_field.name}"
                differing.append(f"{label} {_shown(before, parameter)} there, {_shown(after, parameter)} now")
    return differing


def _shown(value, parameter: CliParameter | None) -> str:
    if parameter is not None and parameter.click.get("is_flag"):
        return "on" if value == parameter.click.get("flag_value", True) else "off"  # --no_scl on = train_prompt False
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "none"
    return str(value)
