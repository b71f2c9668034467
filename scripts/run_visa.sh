#!/usr/bin/env bash
# UCAD on VisA (as distributed, with split_csv/1cls.csv, or converted to the MVTec layout), 12 tasks.
#
# Usage: [CUDA_VISIBLE_DEVICES=N] bash scripts/run_visa.sh DATA_PATH [RESULTS_PATH] [GLOBAL OPTIONS...]
#   DATA_PATH, RESULTS_PATH: relative to the folder you run the script from (the script does not cd anywhere);
#     RESULTS_PATH defaults to ./results. Structure maps are read from DATA_PATH-sam-b (segment_anything_prep).
#   GLOBAL OPTIONS: options of run_ucad.py itself, e.g. --seed 1, --resume, --save_patchcore_model,
#     --epochs_num 5, --log_group NAME, --gpu 1. In the chained command line global options must come before
#     RESULTS_PATH, so the script puts yours there, after its own: a value you give wins over the script's
#     (--seed 1 replaces --seed 0). Options of the ucad / sampler / dataset parts cannot be passed this way: copy
#     the command below instead. PYTHON chooses the interpreter (default python3).
# Example, three seeds on three GPUs, from any folder:
#   for seed in 0 1 2; do CUDA_VISIBLE_DEVICES=$seed bash ~/ucad/scripts/run_visa.sh data/visa results_s$seed --seed $seed & done
set -euo pipefail
repository=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
absolute() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
datapath=$(absolute "${1:?usage: run_visa.sh DATA_PATH [RESULTS_PATH] [GLOBAL OPTIONS...]}")
shift
results=results
if [[ $# -gt 0 && $1 != -* ]]; then results=$1; shift; fi
results=$(absolute "$results")
datasets=(candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum)
dataset_flags=()
for dataset in "${datasets[@]}"; do dataset_flags+=(-d "$dataset"); done

# no --gpu here: it may be given more than once, so the script's would not be replaced by yours (default: 0)
"${PYTHON:-python3}" "$repository/run_ucad.py" --seed 0 --memory_size 196 --log_group IM224_UCAD_L5_P01_D1024_M196 \
  --save_segmentation_images --log_project VisA_Results "$@" "$results" \
  ucad -b vit_base_patch16_224 -le 5 --faiss_on_gpu --pretrain_embed_dimension 1024 \
  --target_embed_dimension 1024 --anomaly_scorer_num_nn 1 --patchsize 1 \
  sampler -p 0.1 approx_greedy_coreset \
  dataset --resize 224 --imagesize 224 "${dataset_flags[@]}" visa "$datapath"
