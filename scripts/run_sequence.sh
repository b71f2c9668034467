#!/usr/bin/env bash
# UCAD on a whole benchmark, its categories as tasks in the paper's order: MVTec AD (15 tasks) or VisA (12 tasks,
# as distributed with split_csv/1cls.csv, or converted to the MVTec layout). run_mvtec.sh and run_visa.sh call this.
#
# Usage: [CUDA_VISIBLE_DEVICES=N] bash scripts/run_sequence.sh mvtec|visa DATA_PATH [RESULTS_PATH] [GLOBAL OPTIONS...]
#   DATA_PATH, RESULTS_PATH: relative to the folder you run the script from (the script does not cd anywhere);
#     RESULTS_PATH defaults to ./results. Structure maps are read from DATA_PATH-sam-b (segment_anything_prep).
#   GLOBAL OPTIONS: options of run_ucad.py itself, e.g. --seed 1, --resume, --save_patchcore_model,
#     --epochs_num 5, --log_group NAME, --gpu 1. In the chained command line global options must come before
#     RESULTS_PATH, so the script puts yours there, after its own: a value you give wins over the script's
#     (--seed 1 replaces --seed 0). Options of the ucad / sampler / dataset parts cannot be passed this way: copy
#     the command below instead. PYTHON chooses the interpreter (default python3).
set -euo pipefail
case ${1:-} in
  -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
  mvtec)
    categories=(bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush transistor wood
                zipper)
    log_project=MVTecAD_Results ;;
  visa)
    categories=(candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum)
    log_project=VisA_Results ;;
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
category_flags=()
for category in "${categories[@]}"; do category_flags+=(-d "$category"); done

# no --gpu here: it may be given more than once, so the script's would not be replaced by yours (default: 0)
"${PYTHON:-python3}" "$repository/run_ucad.py" --seed 0 --memory_size 196 --log_group IM224_UCAD_L5_P01_D1024_M196 \
  --save_segmentation_images --log_project "$log_project" "$@" "$results" \
  ucad -b vit_base_patch16_224 -le 5 --faiss_on_gpu --pretrain_embed_dimension 1024 \
  --target_embed_dimension 1024 --anomaly_scorer_num_nn 1 --patchsize 1 \
  sampler -p 0.1 approx_greedy_coreset \
  dataset --resize 224 --imagesize 224 "${category_flags[@]}" "$dataset" "$datapath"
