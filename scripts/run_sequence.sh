#!/usr/bin/env bash
# UCAD on a whole benchmark, its categories as tasks in the paper's order: MVTec AD (15 tasks) or VisA (12 tasks,
# as distributed with split_csv/1cls.csv, or converted to the MVTec layout). run_mvtec.sh and run_visa.sh call this.
#
# Usage: [CUDA_VISIBLE_DEVICES=N] bash scripts/run_sequence.sh mvtec|visa DATA_PATH [RESULTS_PATH] [GLOBAL OPTIONS...]
#   DATA_PATH, RESULTS_PATH: relative to the folder you run the script from (the script does not cd anywhere);
#     RESULTS_PATH defaults to ./results. Structure maps are read from DATA_PATH-sam-b (segment_anything_prep).
#   Settings come from recipe files: configs/ucad_released.json (the method), then configs/mvtec.json or
#     configs/visa.json (task order, run folder, pictures). GLOBAL OPTIONS, options of run_ucad.py itself, come after
#     them and change only what they name: --config FILE (a further recipe, e.g. configs/ucad_plus.json; any option
#     of the ucad / sampler / dataset parts can be set this way), --seed 1, --epochs_num 5, --resume, --gpu 1,
#     --print_config (show the settings, run nothing). PYTHON chooses the interpreter (default python3).
set -euo pipefail
case ${1:-} in
  -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
  mvtec|visa) ;;
  *) echo "usage: run_sequence.sh mvtec|visa DATA_PATH [RESULTS_PATH] [GLOBAL OPTIONS...]" >&2; exit 2 ;;
esac
dataset=$1
shift
case ${1:-} in
  -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
  "") echo "usage: run_$dataset.sh DATA_PATH [RESULTS_PATH] [GLOBAL OPTIONS...]" >&2; exit 2 ;;
esac
repository=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
absolute() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
datapath=$(absolute "$1")
shift
results=results
if [[ $# -gt 0 && $1 != -* ]]; then results=$1; shift; fi
results=$(absolute "$results")

"${PYTHON:-python3}" "$repository/run_ucad.py" --config "$repository/configs/ucad_released.json" \
  --config "$repository/configs/$dataset.json" "$@" "$results" dataset "$dataset" "$datapath"
