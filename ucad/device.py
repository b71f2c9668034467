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


def keep_fp32_exact(device: torch.device) -> None:
    """Float32 math on the GPU stays float32: no TF32 in convolutions or matrix products. cuDNN allows TF32 by
    default, which on the H200 moved a CNN's fp32 numbers away from the CPU's (pixel AUROC by 0.003 on
    magnetic_tile after 3 prompt epochs); --precision then says all there is to say about the arithmetic."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class OutOfMemoryRetry:
    """Batches of at most `batch_size` items; a batch that runs out of GPU memory is retried once with half the
    size, for this and every later batch, with one line saying so. A second GPU out-of-memory error, or running
    out of host memory, ends the run with a UcadError naming `option`, the setting that decides the batch size.

    Usage: `used = retry.run(step)` where step(size) processes the next at most `size` items."""

    def __init__(self, batch_size: int, what: str, option: str, warn=None):
        self.batch_size = self.requested = batch_size
        self.what, self.option = what, option
        self.warn = warn or _write_above_progress_bars
        self.halved = False

    def run(self, step):
        while True:
            try:
                return step(self.batch_size)
            except Exception as error:  # noqa: BLE001 -- only memory errors are handled, the rest re-raised
                kind = out_of_memory_kind(error)
                if kind is None:
                    raise
            # here, outside the except block, the failed batch's tensors (held by the traceback) are free again
            self._after_out_of_memory(kind)

    def _after_out_of_memory(self, kind: str) -> None:
        if kind == "gpu" and not self.halved and self.batch_size > 1:
            self.halved, old, self.batch_size = True, self.batch_size, max(1, self.batch_size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.warn(f"note: out of GPU memory in {self.what} with batches of {old} ({self.option} "
                      f"{self.requested}); retrying with batches of {self.batch_size}")
            return
        where = "GPU" if kind == "gpu" else "host (CPU)"
        raise UcadError(f"out of {where} memory in {self.what} with batches of {self.batch_size} ({self.option} "
                        f"{self.requested}): rerun with a smaller {self.option} (add --resume to keep the finished "
                        "tasks)")


def out_of_memory_kind(error: BaseException) -> str | None:
    """"gpu", "cpu" or None. torch reports a failed host allocation as a RuntimeError, not MemoryError."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "gpu"
    if isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "can't allocate memory" in str(error)):
        return "cpu"
    return None


def _write_above_progress_bars(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message)
