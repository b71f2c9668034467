"""Choosing the torch device from --gpu / --cpu and CUDA_VISIBLE_DEVICES, and the autocast dtype."""
from __future__ import annotations

import os

import torch
from tqdm import tqdm

from ucad.runtime.errors import UcadError


def select_device(gpus: tuple[int, ...] | list[int], force_cpu: bool = False, warn=print) -> torch.device:
    """--gpu N picks the N-th GPU that CUDA_VISIBLE_DEVICES shows. Without any GPU the run continues on the CPU
    with one warning, so the published command lines (which all say --gpu 0) still work on a laptop."""
    if force_cpu or not gpus:
        return torch.device("cpu")
    if len(gpus) > 1:
        warn(f"note: --gpu given {len(gpus)} times; one run uses one GPU, using --gpu {gpus[0]}")
    index, visible = gpus[0], os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    if not torch.cuda.is_available():
        warn(f"warning: --gpu {index} asked for a GPU but torch sees none (CUDA_VISIBLE_DEVICES={visible}, "
             f"torch built with CUDA {torch.version.cuda or 'no'}); running on the CPU. Pass --cpu to silence this.")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if index < 0 or index >= count:
        raise UcadError(f"--gpu {index}: only {count} GPU(s) visible (indices 0..{count - 1}; "
                        f"CUDA_VISIBLE_DEVICES={visible})")
    return torch.device("cuda", index)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """None means full fp32. 'auto' is bf16 on GPUs that support it, fp32 on the CPU."""
    if precision == "auto" and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"auto": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def keep_fp32_exact(device: torch.device) -> None:
    """No TF32 in convolutions or matrix products: cuDNN allows it by default, and it rounds a CNN's fp32 products
    to a 10-bit mantissa, away from the CPU's numbers; with TF32 off, --precision alone sets the arithmetic."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


class OutOfMemoryRetry:
    """`run(step)` returns step(size), which processes the next at most `size` items. A batch that runs out of GPU
    memory is retried once with half the size, for this and every later batch, with one line saying so; a second
    GPU out-of-memory error, or running out of host memory, ends the run with a UcadError naming `option`."""

    def __init__(self, batch_size: int, what: str, option: str, warn=None):
        self.batch_size = self.requested = batch_size
        self.what, self.option = what, option
        self.warn = warn or tqdm.write  # above any progress bar

    def run(self, step):
        while True:
            try:
                return step(self.batch_size)
            except Exception as error:  # noqa: BLE001 -- only memory errors are handled, the rest re-raised
                if (kind := out_of_memory_kind(error)) is None:
                    raise
            # here, outside the except block, the failed batch's tensors (held by the traceback) are free again
            if kind != "gpu" or self.batch_size < self.requested or self.batch_size == 1:  # halved before, or can't be
                raise UcadError(f"out of {'GPU' if kind == 'gpu' else 'host (CPU)'} memory in {self.what} with batches "
                                f"of {self.batch_size} ({self.option} {self.requested}): rerun with a smaller "
                                f"{self.option} (add --resume to keep the finished tasks)")
            self.batch_size //= 2
            torch.cuda.empty_cache()  # a no-op unless CUDA is in use
            self.warn(f"note: out of GPU memory in {self.what} with batches of {self.requested} ({self.option} "
                      f"{self.requested}); retrying with batches of {self.batch_size}")


def out_of_memory_kind(error: BaseException) -> str | None:
    """"gpu", "cpu" or None. torch reports a failed host allocation as a RuntimeError, not MemoryError."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "gpu"
    if isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "can't allocate memory" in str(error)):
        return "cpu"
    return None
