"""Choosing the torch device from --gpu / --cpu and CUDA_VISIBLE_DEVICES, and the autocast dtype."""
from __future__ import annotations

import contextlib
import os

import torch

from ucad.errors import UcadError


def select_device(gpus: tuple[int, ...] | list[int], force_cpu: bool = False, warn=print) -> torch.device:
    """--gpu N picks the N-th visible GPU (CUDA_VISIBLE_DEVICES decides which are visible).

    Without any GPU the run continues on the CPU with one warning, so the published command lines
    (which all say --gpu 0) still work on a laptop; a GPU index beyond those visible is an error."""
    if force_cpu or not gpus:
        return torch.device("cpu")
    if len(gpus) > 1:
        warn(f"note: --gpu given {len(gpus)} times; one run uses one GPU, using --gpu {gpus[0]}")
    index = gpus[0]
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        warn(f"warning: --gpu {index} asked for a GPU but torch sees none (CUDA_VISIBLE_DEVICES={visible}, "
             f"torch built with CUDA {torch.version.cuda or 'no'}); running on the CPU. Pass --cpu to silence this.")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if index < 0 or index >= count:
        raise UcadError(f"--gpu {index}: only {count} GPU(s) visible (indices 0..{count - 1}; "
                        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
    return torch.device("cuda", index)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """None means full fp32. 'auto' is bf16 on GPUs that support it, fp32 on the CPU."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
