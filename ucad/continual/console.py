"""What a continual run prints: what it is about to do, each task as it is learned, and the final tables."""
from __future__ import annotations

import time
from dataclasses import asdict
from functools import partial

import numpy as np
import torch

from ucad.config import departures_from_released_code
from ucad.continual.hooks import RunHooks
from ucad.model.ucad_model import KNOWLEDGE
from ucad.results.tables import final_tables, route_trust_line

echo = partial(print, flush=True)


def departures_line(run) -> str:
    """The run's departures from RELEASED_CODE, input scaling and arithmetic as resolved on this device."""
    resolved = {"input_norm": run.model.extractor.input_norm,
                "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[run.model.amp_dtype]}
    values = {**asdict(run.configs.model), **asdict(run.configs.learning), **resolved}
    return ", ".join(departures_from_released_code(values)) or "none"


class ConsoleReport(RunHooks):
    def run_started(self, run) -> None:
        model, model_config, learning = run.model, run.configs.model, run.configs.learning
        echo(f"UCAD run folder: {run.run_dir}")
        autocast = f" (autocast {str(model.amp_dtype).replace('torch.', '')})" if model.amp_dtype else ""
        echo(f"device: {model.device}{autocast}")
        echo(f"backbone: {model.extractor.describe(prompts=model_config.learns_prompts)}")
        echo(f"mode: {model_config.mode}; patch size {model_config.patchsize}, embedding "
             f"{model_config.target_embed_dimension}; patch grid {model.grid[0]}x{model.grid[1]}; sampler "
             f"{run.sampler.name}; nearest neighbours: {run.scorer.describe()}")
        if model_config.learns_prompts:
            training = (f"{learning.epochs_num} epochs, SCL with structure maps from {run.structure_root}"
                        if learning.train_prompt else "OFF (--no_scl): prompts keep their random initialisation")
            fill = "as many as fit in the paper's 784 KiB"
            echo(f"memory: keys {learning.key_size or fill} ({learning.key_storage}), knowledge "
                 f"{learning.memory_size or fill} ({learning.knowledge_storage}), "
                 f"unlimited {learning.basic_size} per task; prompt training: {training}")
        echo("departures from the released code: " + departures_line(run))
        echo(f"tasks ({len(run.tasks)}): {', '.join(t.category for t in run.tasks)}"
             + (f"; resuming after task {run.finished}" if run.finished else ""))
        if not any(task.validation for task in run.tasks):
            echo("thresholds: none, since no normal training images are held out (dataset --train_val_split 1.0); "
                 "F1 at a threshold is not reported (F1-max is). Hold some out with e.g. --train_val_split 0.9")

    def task_started(self, run, index: int) -> None:
        task = run.tasks[index]
        echo(f"\n== task {index + 1}/{len(run.tasks)}: {task.category} ({len(task.train)} train, "
             f"{len(task.validation)} held out, {len(task.test)} test)")

    def task_learned(self, run, index: int, seconds: float) -> None:
        memory = run.model.tasks[index]
        if history := run.losses[memory.name]:
            drift = memory.extra.get("feature_drift")
            echo(f"   prompt loss {history[0]:.4f} -> {history[-1]:.4f} over {len(history)} epochs; "
                 + (f"the kept prompt moved the training images' features {drift:.1%} from the frozen ones"
                    if drift is not None else "no prompt kept"))
        if "chosen_epoch" in memory.extra:
            chosen, scores = memory.extra["chosen_epoch"], memory.extra["validation_scores"]
            echo(f"   epoch chosen on held-out synthetic defects: {chosen or 'none (frozen features)'} (validation "
                 f"score per epoch, 0 = no prompt: {', '.join(f'{v:.3f}' for v in scores)})")
        kept = memory.memory_bytes()
        keys, knowledge = (packed.storage if packed else "fp32" for packed in (memory.packed_keys, memory.packed))
        echo(f"   kept for this task: {sum(kept.values()):,} bytes (keys {kept['keys']:,} as {keys}, prompt "
             f"{kept['prompt']:,}, knowledge {kept['knowledge']:,} as {knowledge})")
        if threshold := memory.thresholds.get(KNOWLEDGE):
            echo(f"   thresholds from {threshold.images} held-out normal image(s), quantile {threshold.quantile:g}: "
                 f"image {threshold.image:.5g}, pixel {threshold.pixel:.5g}")

    def phase_kept(self, run, index: int, seconds: float) -> None:
        mine = [r for r in run.records if r["phase"] == index and r["variant"] == "task_agnostic"]
        aurocs = [r["image_auroc"] for r in mine if not np.isnan(r["image_auroc"])]  # nan: one class only
        auroc = f"{np.mean(aurocs):.3f}" if aurocs else "-"
        over = "" if len(aurocs) == len(mine) else f" (over the {len(aurocs)} task(s) whose test set has both classes)"
        echo(f"   after {run.tasks[index].category}: mean image AUROC {auroc}{over}, "
             f"mean routing accuracy {np.mean([r['routing_accuracy'] for r in mine]):.3f} over {len(mine)} task(s)")

    def run_finished(self, run) -> None:
        total = time.perf_counter() - run.started
        echo("\n" + final_tables(run.records, [t.category for t in run.tasks], run.configs.model.mode,
                                 {t.name: t.thresholds.get(KNOWLEDGE) for t in run.model.tasks}))
        last = run.finished - 1
        if trust := route_trust_line([r for r in run.image_rows if r["phase"] == last],
                                     run.model.route_trust_threshold(last + 1), run.configs.model.route_trust_quantile):
            echo(trust)
        echo(f"\nwall time {total:.1f} s; per phase: " + ", ".join(f"{k} {v['seconds']:.1f}s"
                                                                 for k, v in run.timer.as_dict().items()))

