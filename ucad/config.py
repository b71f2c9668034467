"""The typed configuration of a run: the model, how each task is learned, the data, and how the run executes.

Every default and choice lives here and nowhere else, and every value is checked here (Configs.check) whatever its
source: the command line, a --config file, a run's config.json or code. A field that the command line sets carries
its sub-command, option and help in its metadata: `ucad.cli` builds the options from them, and `--resume` names a
differing field by its option. Plain data: neither click nor torch nor the implementation is loaded here."""
from __future__ import annotations

import json
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, Callable

from ucad.runtime.errors import UcadError

# the choices of the settings that have them, for the implementations too (dataset NAME: ucad.data.layouts's registry)
INPUT_NORMS = ("auto", "imagenet", "backbone")
PATCH_DISTANCES = ("squared", "euclidean")
ROUTINGS = ("mean", "calibrated", "gaussian", "calibrated_gaussian")
SAMPLER_NAMES = ("identity", "greedy_coreset", "approx_greedy_coreset")
KEY_SAMPLERS = ("kmeans", "random", "approx_greedy_coreset", "greedy_coreset")
KNOWLEDGE_STORAGES = ("fp32", "fp16", "sq8", "pq", "pq_kept", "pca_fp16", "pca_sq8")
EPOCH_SELECTIONS = ("last", "validation")
SCL_FEATURES = ("raw", "embedded")
LABEL_SAMPLINGS = ("centre", "corner")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BACKENDS = ("auto", "faiss", "torch")

# the released code's value of every setting where a run here can differ from it (README "Differences from the
# released code"); input_norm and precision as a run resolves them (auto is no value of its own)
RELEASED_CODE = {"key_sampler": "approx_greedy_coreset", "key_storage": "fp32", "knowledge_storage": "fp32",
                 "routing": "mean", "input_norm": "imagenet", "patch_distance": "squared", "scl_features": "raw",
                 "label_sampling": "centre", "train_prompt": True, "prompt_anchor": 0.0, "lr": 5e-4,
                 "resize_mode": "crop", "mode": "ucad", "precision": "fp32"}
KINDS = {"int": (int, "an integer"), "float": (float, "a number"), "str": (str, "a string"),  # accepted, as named
         "bool": (bool, "true or false")}


@dataclass(frozen=True)
class CliParameter:
    command: str  # "main" (global options), "ucad", "sampler" or "dataset"
    declarations: tuple[str, ...]  # ("-b", "--backbone_names"); empty for a positional argument
    help: str = ""
    metavar: str | None = None  # the name of a positional argument (NAME, DATA_PATH)
    click: dict = field(default_factory=dict)  # click's keywords; "type" may be a tuple of choices or a CLICK_TYPES key
    limits: str | None = None  # the accepted numbers as an interval: "[1, inf)", "(0, 1]"
    parse: Callable[[Any], Any] | None = None  # click's value -> the field's value
    resume_may_differ: bool = False  # how the run executes, not what it computes: --resume accepts a change

    @property
    def typed(self) -> str:
        """The parameter as the user types it: --epochs_num, or 'dataset DATA_PATH' for an argument."""
        if not self.declarations:
            return self.metavar if self.command == "main" else f"{self.command} {self.metavar}"
        return max(self.declarations, key=len)


def option(default, command: str, *declarations: str, help: str, limits: str | None = None, parse=None,
           resume_may_differ: bool = False, **click: Any):
    return field(default=default, metadata={"cli": CliParameter(command, declarations, help, None, click, limits,
                                                                parse, resume_may_differ)})


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
        "Input mean/std: imagenet (for every backbone) or backbone (the weights' own config); auto = imagenet, except "
        "[-1, 1] for the offline EfficientNet-Lite0 weights, which were trained on that range."))
    mode: str = option("ucad", "ucad", "--mode", type=("ucad", "patchcore"), help=(
        "ucad = the continual method; patchcore = one PatchCore bank per task, no prompts (oracle baseline)."))
    pretrain_embed_dimension: int = option(1024, "ucad", "--pretrain_embed_dimension", limits="[1, inf)", help=(
        "Per-layer feature size after pooling."))
    target_embed_dimension: int = option(1024, "ucad", "--target_embed_dimension", limits="[1, inf)", help=(
        "Patch feature size after merging layers."))
    anomaly_scorer_num_nn: int = option(1, "ucad", "--anomaly_scorer_num_nn", limits="[1, inf)", help=(
        "k nearest knowledge vectors averaged for a patch score."))
    patchsize: int = option(3, "ucad", "--patchsize", limits="[1, inf)", help=(
        "p x p neighbourhood aggregated per patch."))
    patch_distance: str = option("squared", "ucad", "--patch_distance", type=PATCH_DISTANCES, help=(
        "Patch and key distance: squared L2 (what faiss IndexFlatL2 returns) or euclidean."))
    routing: str = option("mean", "ucad", "--routing", type=ROUTINGS, help=(
        "What routing compares across tasks: mean = mean nearest-key distance; calibrated = that distance over its "
        "mean on the task's own normal images; gaussian = an image-level diagonal Gaussian of frozen features, "
        "calibrated alike; calibrated_gaussian = the mean of the two."))
    route_trust_quantile: float = option(0.05, "ucad", "--route_trust_quantile", limits="[0, 1]", help=(
        "A route is trusted when its margin (relative gap between the best and the runner-up task) is at least this "
        "quantile of the margins of every learned task's held-out normal training images (dataset "
        "--train_val_split), each measured when its task was learned; 0 trusts every route."))
    prompt_length: int = option(1, "ucad", "--prompt_length", limits="[1, inf)", help=(
        "Prefix key/value tokens per layer."))
    smoothing_sigma: float = option(4.0, "ucad", "--smoothing_sigma", limits="[0, inf)", help=(
        "Gaussian sigma of anomaly maps."))
    resize: int = option(224, "dataset", "--resize", limits="[16, inf)", help=(
        "Shorter image side before the centre crop."))
    imagesize: int = option(224, "dataset", "--imagesize", limits="[16, inf)", help="Network input size (square).")
    resize_mode: str = option("crop", "dataset", "--resize_mode", type=("crop", "square"), help=(
        "crop: resize + centre crop; square: squash to imagesize, nothing cut (non-square data)."))

    @property
    def geometry(self):
        from ucad.data.decode import ImageGeometry  # here, not above: decoding needs torch, settings do not
        return ImageGeometry(self.resize, self.imagesize, self.resize_mode)

    @property
    def learns_prompts(self) -> bool:
        """patchcore mode keeps a coreset of the frozen features: no prompt, no structure maps."""
        return self.mode == "ucad"


@dataclass
class LearningConfig:
    """How each task is learned: keys, prompt training, knowledge, thresholds."""

    seed: int = option(0, "main", "--seed", limits=f"[0, {2 ** 32})", help=(
        "Seed of every random choice (prompts, coresets, shuffles, splits)."))
    memory_size: int = option(196, "main", "--memory_size", limits="[0, inf)", help=(
        "Knowledge vectors per task (the coreset); 0 = as many as --knowledge_storage fits in the bytes of 196 fp32 "
        "vectors (the paper's 784 KiB per task at 1024-d)."))
    epochs_num: int = option(25, "main", "--epochs_num", limits="[0, inf)", help=(
        "Prompt training epochs per task (fixed; never chosen on test data)."))
    key_size: int = option(196, "main", "--key_size", limits="[0, inf)", help=(
        "Key vectors per task: what test images are routed by; 0 = as many as --key_storage fits in the bytes of 196 "
        "fp32 vectors (the paper's 784 KiB per task at 1024-d)."))
    key_sampler: str = option("kmeans", "ucad", "--key_sampler", type=KEY_SAMPLERS, help=(
        "How a task's keys are chosen from its frozen patches: kmeans centroids or random patches cover the typical "
        "ones; approx_greedy_coreset and greedy_coreset pick the most outlying."))
    key_storage: str = option("fp32", "ucad", "--key_storage", type=KNOWLEDGE_STORAGES, help=(
        "How keys are stored, with the choices of --knowledge_storage; --key_size 0 fills the paper's 784 KiB of "
        "keys per task (e.g. 4200 pca_sq8 keys at 1024-d)."))
    epoch_selection: str = option("last", "ucad", "--epoch_selection", type=EPOCH_SELECTIONS, help=(
        "last: the prompt after --epochs_num epochs; validation: the best epoch (or none) on held-out normal images "
        "with synthetic defects, never the test set (needs dataset --train_val_split < 1)."))
    knowledge_storage: str = option("fp32", "ucad", "--knowledge_storage", type=KNOWLEDGE_STORAGES, help=(
        "Knowledge storage: fp32, fp16, sq8 (one byte per dimension), pq (product quantisation, its codebook learned "
        "from the task's patches), pq_kept (the codebook learned from the kept vectors themselves), or pca_fp16 and "
        "pca_sq8 (coefficients on the task's 128 principal directions, so stored); --memory_size 0 fills the paper's "
        "784 KiB per task (392 fp16, 776 sq8, 2176 pq or pq_kept, 2104 pca_fp16, 4200 pca_sq8 vectors at 1024-d)."))
    basic_size: int = option(1960, "main", "--basic_size", limits="[0, inf)", help=(
        "Knowledge size of the 'unlimited' variant reported beside (0 = off)."))
    threshold_quantile: float = option(0.99, "main", "--threshold_quantile", limits="(0, 1]", help=(
        "Per-task image and pixel thresholds: this quantile of the scores of the held-out normal training images "
        "(dataset --train_val_split)."))
    sampler: str = argument("sampler", "NAME", default="approx_greedy_coreset", type=SAMPLER_NAMES)
    sampler_percentage: float = option(0.1, "sampler", "-p", "--percentage", limits="(0, 1]", help=(
        "Fraction kept in patchcore mode (ucad mode: --key_size/--memory_size)."))
    train_prompt: bool = option(True, "ucad", "--no_scl", is_flag=True, flag_value=False, help=(
        "Train without structure maps: prompts stay at their initialisation."))
    scl_features: str = option("raw", "ucad", "--scl_features", type=SCL_FEATURES, help=(
        "What SCL sees: raw extractor tokens at the patch grid or the pooled PatchCore embedding."))
    label_sampling: str = option("centre", "ucad", "--label_sampling", type=LABEL_SAMPLINGS, help=(
        "Region id of a patch: at its centre pixel or its top-left pixel."))
    prompt_anchor: float = option(0.0, "ucad", "--prompt_anchor", limits="[0, inf)", help=(
        "Weight of a term that keeps the prompted embedding of normal training images near the frozen one (relative "
        "squared drift); 0 = off."))
    lr: float = option(5e-4, "ucad", "--lr", limits="(0, inf)", help="Adam learning rate of the prompt.")
    feature_batch_size: int = option(32, "ucad", "--feature_batch_size", limits="[1, inf)", resume_may_differ=True,
                                     help="Images per batch when extracting features.")
    batch_size: int = option(8, "dataset", "--batch_size", limits="[1, inf)", help="Prompt-training batch size.")
    augment: bool = option(False, "dataset", "--augment", is_flag=True, help="Random image flips in prompt training.")
    grad_clip: float = 1.0
    temperature: float = 0.5

    def task_seed(self, task_index: int) -> int:
        """The seed of task `task_index`'s random choices: distinct per task and seed, and a C int (faiss wants one)."""
        return (self.seed * 1000 + task_index) % 2 ** 31


@dataclass
class DataConfig:
    """Which data: the layout, the folder, the tasks in order, the held-out split."""

    name: str = argument("dataset", "NAME", type="layout")
    data_path: str = argument("dataset", "DATA_PATH", type="path")
    categories: tuple[str, ...] = option((), "dataset", "-d", "--subdatasets", multiple=True, help=(
        "Category (task), repeat in task order; default: all found."))
    train_val_split: float = option(1.0, "dataset", "--train_val_split", limits="(0, 1]", help=(
        "Fraction of each task's training images used for learning (seeded); the rest is held out as normal images "
        "that set the thresholds."))
    num_workers: int = option(8, "dataset", "--num_workers", limits="[0, inf)", resume_may_differ=True, help=(
        "Threads decoding images (0 or 1: in the main thread)."))
    structure_path: str | None = option(None, "dataset", "--structure_path", type="path", help=(
        "Structure-map tree (default DATA_PATH-sam-b), made by segment_anything_prep."))


@dataclass
class RunConfig:
    """How and where the run executes; none of it changes what is learned (so --resume accepts changes)."""

    results_path: str = argument("main", "RESULTS_PATH", type="folder")
    gpu: tuple[int, ...] = option((0,), "main", "--gpu", multiple=True, limits="[0, inf)", help=(
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
    precision: str = option("fp32", "main", "--precision", type=PRECISIONS, help=(
        "Backbone arithmetic: fp32 (a GPU gives the CPU's numbers), bf16 / fp16 autocast (metrics move slightly, see "
        "the README), or auto = bf16 if the GPU has it."))
    reference_evaluation: bool = option(False, "main", "--reference_evaluation", is_flag=True, hidden=True, help=(
        "Recompute every test feature and score in every phase (slow reference for checking the caches)."))
    faiss_on_gpu: bool = option(False, "ucad", "--faiss_on_gpu", is_flag=True, help=(
        "Use a faiss GPU index when faiss has GPU support (else torch on the GPU)."))
    faiss_num_workers: int = option(8, "ucad", "--faiss_num_workers", limits="[0, inf)", help=(
        "faiss CPU threads (0: faiss's own choice of one)."))
    nn_backend: str = option("auto", "ucad", "--nn_backend", type=BACKENDS, help=(
        "Nearest-neighbour search: auto = faiss on CPU, torch on GPU."))
    fpr_limit: float = 0.3  # AUPRO integrates the PRO curve up to this false-positive rate


CONFIG_CLASSES = {"model": ModelConfig, "learning": LearningConfig, "data": DataConfig, "run": RunConfig}
# every field by name (names are unique across the four configurations), with the name of its configuration
FIELDS = {f.name: (name, f) for name, cls in CONFIG_CLASSES.items() for f in fields(cls)}


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
        """Every value checked and brought to its type in place (check_bounds), then the rules that join two fields."""
        for name in CONFIG_CLASSES:
            check_bounds(getattr(self, name))
        model = self.model
        if model.resize_mode == "crop" and model.imagesize > model.resize:
            raise UcadError(f"dataset --imagesize {model.imagesize} is larger than --resize {model.resize}: the centre "
                            "crop would pad every image with a black border; give --resize at least --imagesize, or "
                            "--resize_mode square")
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
    """Every field of one configuration checked and brought to its type, in place (checked_value), named by its
    option, or by section.field where it has none or is a flag (then only a file or code gave it a value)."""
    section = next(name for name, cls in CONFIG_CLASSES.items() if isinstance(config, cls))
    for config_field in fields(config):
        parameter, name = cli_parameter(config_field), config_field.name
        label = parameter.typed if parameter and not parameter.click.get("is_flag") else f"{section}.{name}"
        setattr(config, name, checked_value(config_field, getattr(config, name), label))


def field_kind(config_field: Field) -> tuple[str, bool]:
    """(element type, repeated) from the annotation's text: ('int', False) for int, ('str', True) for tuple[str, ...]"""
    text = config_field.type
    return text.removeprefix("tuple[").split(",")[0].split(" |")[0], text.startswith("tuple[")


def from_text(config_field: Field, value):
    """A value typed on the command line (text, or a tuple of texts) as the field's type where it reads as one; other
    text stays text, for checked_value to refuse with the message a file's value gets."""
    if isinstance(value, tuple):
        return tuple(from_text(config_field, one) for one in value)
    try:
        return {"int": int, "float": float}[field_kind(config_field)[0]](value) if isinstance(value, str) else value
    except (KeyError, ValueError):
        return value


def checked_value(config_field: Field, value, label: str):
    """`value` as its field's type (a list becomes a tuple, an integer a float where a number is wanted), or a
    UcadError '<label> must be ...': a wrong type (a boolean is no number, text no boolean), a value outside the
    field's limits (which nan and infinity always are) or choices, for every value of a repeated field."""
    kind, repeated = field_kind(config_field)
    if value is None and config_field.type.endswith("| None"):
        return None
    if repeated != isinstance(value, (tuple, list)):
        raise UcadError(f"{label} must be {'a list' if repeated else KINDS[kind][1]}, got {value!r}")
    values = tuple(float(one) if kind == "float" and type(one) is int else one for one in
                   (value if repeated else (value,)))
    if wrong := [one for one in values if type(one) is not KINDS[kind][0]]:
        raise UcadError(f"{label} must be {KINDS[kind][1]}, got {wrong[0]!r}")
    parameter = cli_parameter(config_field)
    if parameter and (problem := _bounds_problem(parameter, values)):
        raise UcadError(f"{label} {problem}")
    return values if repeated else values[0]


def _bounds_problem(parameter: CliParameter, values: tuple) -> str | None:
    choices, limits = parameter.click.get("type"), parameter.limits
    for one in values:
        if isinstance(choices, tuple) and one not in choices:
            return f"'{one}' is not one of {', '.join(choices)}"
        if limits and not isinstance(one, (str, bool)):
            low, high = map(float, limits[1:-1].split(","))
            if not (low < one < high or one == low and limits[0] == "[" or one == high and limits[-1] == "]"):
                shown = f"{'at least' if limits[0] == '[' else 'above'} {limits[1:].split(',')[0]}" \
                    if limits.endswith("inf)") else f"in {limits}"
                return f"must be {shown}, got {one}"  # nan too: it compares false
    return None


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


def departures_from_released_code(values: dict[str, object]) -> list[str]:
    """'--key_sampler kmeans (released: approx_greedy_coreset)' for each of `values` ({field name: the value a run
    uses}, input_norm and precision as resolved) that is not RELEASED_CODE's."""
    return [f"{parameter.typed} {_shown(value, parameter)} (released: {_shown(RELEASED_CODE[name], parameter)})"
            for name, value in values.items() if name in RELEASED_CODE and value != RELEASED_CODE[name]
            for parameter in [cli_parameter(FIELDS[name][1])]]


def _shown(value, parameter: CliParameter | None) -> str:
    if parameter is not None and parameter.click.get("is_flag"):
        return "on" if value == parameter.click.get("flag_value", True) else "off"  # --no_scl on = train_prompt False
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "none"
    return str(value)
