#!/usr/bin/env bash
# The ablation behind configs/ucad_plus.json: each candidate part alone against the released recipe, over seeds, on
# one sequence of tasks; then one table (mean ± std over seeds) from scripts/summarize.py.
#
# Usage: bash benchmarks/recipe_ablation.sh DATA_PATH RESULTS_PATH -d TASK [-d TASK ...] [-- RUN OPTIONS...]
#   DATA_PATH   an MVTec-layout folder with structure maps in DATA_PATH-sam-b
#               (segment_anything_prep/make_structure_maps.py --method felzenszwalb makes them offline)
#   RESULTS_PATH  runs go to RESULTS_PATH/ablation/VARIANT_seedS_0; the table to RESULTS_PATH/ablation.md
#   RUN OPTIONS   global options given to every run after the recipe (e.g. --epochs_num 5 --cpu)
# Environment: SEEDS (default "0 1 2"), VARIANTS (default: all below), BACKBONE_OPTIONS (default: the offline
# EfficientNet-Lite0, stages 2 and 3, patch size 3), DATASET_OPTIONS (default: --resize_mode square,
# --train_val_split 0.9, so that thresholds and --epoch_selection validation have held-out images), PYTHON.
set -euo pipefail
if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0; fi
repository=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
data=$1 results=$2; shift 2
tasks=() run_options=()
while [[ $# -gt 0 && $1 != -- ]]; do tasks+=("$1"); shift; done
[[ $# -gt 0 ]] && { shift; run_options=("$@"); }
python=${PYTHON:-python3}
seeds=${SEEDS:-0 1 2}
backbone_options=${BACKBONE_OPTIONS:-"-b efficientnet_lite0 -le 2 -le 3 --patchsize 3"}
dataset_options=${DATASET_OPTIONS:-"--resize_mode square --train_val_split 0.9"}

# each candidate part as a recipe layered over the released one
declare -A variant=(
  [released]='{}'
  [pq2176]='{"learning": {"memory_size": 2176, "knowledge_storage": "pq"}}'
  [pq_kept2176]='{"learning": {"memory_size": 2176, "knowledge_storage": "pq_kept"}}'
  [fp16_392]='{"learning": {"memory_size": 392, "knowledge_storage": "fp16"}}'
  [epoch_validation]='{"learning": {"epoch_selection": "validation"}}'
  [anchor100]='{"learning": {"prompt_anchor": 100.0}}'
  [no_scl]='{"learning": {"train_prompt": false}}'
  [lr1e4]='{"learning": {"lr": 0.0001}}'
  [pq2176_keys]='{"learning": {"memory_size": 2176, "knowledge_storage": "pq", "key_size": 2176, "key_storage": "pq"}}'
)
variants=${VARIANTS:-"released pq2176 pq_kept2176 fp16_392 epoch_validation anchor100 no_scl lr1e4 pq2176_keys"}
mkdir -p "$results/ablation/recipes"
runs=()
for name in $variants; do
  printf '%s\n' "${variant[$name]}" > "$results/ablation/recipes/$name.json"
  for seed in $seeds; do
    group=${name}_seed$seed
    if [[ ! -f $results/ablation/${group}_0/results_per_task.csv ]]; then
      "$python" "$repository/run_ucad.py" --config "$repository/configs/ucad_released.json" \
        --config "$results/ablation/recipes/$name.json" --seed "$seed" --log_project ablation --log_group "$group" \
        "${run_options[@]}" "$results" ucad $backbone_options dataset $dataset_options "${tasks[@]}" mvtec "$data"
    fi
    runs+=("$results/ablation/${group}_0")
  done
done
"$python" "$repository/scripts/summarize.py" "${runs[@]}" --markdown "$results/ablation.md" --csv "$results/ablation.csv"
