"""One epoch of prompt training under the torch profiler, for scripts/benchmark.py --profile DIR.

The first task's prompt training is run as one warm-up epoch (cuDNN autotuning, allocator growth and lazy
initialisation stay out of the trace), one profiled epoch, then the remaining epochs; each part restarts the
optimiser, which changes no amount of work. Written: DIR/prompt_epoch_trace.json.gz (chrome://tracing or
ui.perfetto.dev) and DIR/prompt_epoch_ops.txt (operators by device time and by CPU time, and the epoch's wall
time: a GPU waiting on the Python side shows as much CPU time and little device time).
"""
from __future__ import annotations

import contextlib
import gzip
import inspect
import shutil
import time
from pathlib import Path

import torch


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _table(profiler, sort_keys: tuple[str, ...], rows: int = 40) -> str:
    averages = profiler.key_averages()
    for key in sort_keys:  # the device-time column has been renamed across torch versions
        try:
            return averages.table(sort_by=key, row_limit=rows)
        except (KeyError, AttributeError, ValueError, RuntimeError):
            continue
    return averages.table(row_limit=rows)


def write_profile(profiler, out_dir: Path, seconds: float, images: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = out_dir / "prompt_epoch_trace.json"
    profiler.export_chrome_trace(str(trace))
    with open(trace, "rb") as source, gzip.open(str(trace) + ".gz", "wb") as target:
        shutil.copyfileobj(source, target)
    trace.unlink()
    on_gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
    parts = [f"one epoch of prompt training: {seconds:.3f} s wall, {images} images ({images / max(seconds, 1e-9):.1f}/s)"]
    if on_gpu:
        parts += ["", "== by self device time", _table(profiler, ("self_device_time_total", "self_cuda_time_total"))]
    parts += ["", "== by self CPU time", _table(profiler, ("self_cpu_time_total",))]
    (out_dir / "prompt_epoch_ops.txt").write_text("\n".join(parts) + "\n")


@contextlib.contextmanager
def profile_first_prompt_training(out_dir: str | None):
    """While active, the first call of ucad.learner.train_prompt profiles one of its epochs into out_dir."""
    if out_dir is None:
        yield
        return
    import ucad.learner as learner

    original = learner.train_prompt
    done = []

    def profiled(*args, **kwargs):
        bound = inspect.signature(original).bind(*args, **kwargs)
        bound.apply_defaults()
        epochs_name = next((n for n in ("epochs", "epochs_num") if n in bound.arguments), None)
        if done or epochs_name is None or bound.arguments[epochs_name] < 1:
            return original(*args, **kwargs)
        done.append(True)
        epochs = bound.arguments[epochs_name]

        def epochs_of(count: int) -> list[float]:
            bound.arguments[epochs_name] = count
            return original(*bound.args, **bound.kwargs)

        history = epochs_of(1) if epochs >= 2 else []
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        _synchronize()
        started = time.perf_counter()
        with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
            history += epochs_of(1)
            _synchronize()
        seconds = time.perf_counter() - started
        images = bound.arguments["images"].shape[0] if "images" in bound.arguments else 0
        write_profile(profiler, Path(out_dir), seconds, images)
        print(f"profile of one prompt-training epoch written to {out_dir}", flush=True)
        if epochs > 2:
            history += epochs_of(epochs - 2)
        return history

    learner.train_prompt = profiled
    try:
        yield
    finally:
        learner.train_prompt = original
        if not done:
            print("note: --profile: no prompt training ran (0 epochs, --no_scl or patchcore), nothing profiled",
                  flush=True)
