#!/usr/bin/env bash
# UCAD on VisA (as distributed, with split_csv/1cls.csv, or converted to the MVTec layout), 12 tasks.
# Usage: CUDA_VISIBLE_DEVICES=0 bash scripts/run_visa.sh /path/to/visa [results]
set -euo pipefail
cd "$(dirname "$0")/.."
datapath=${1:?give the VisA folder}
results=${2:-results}
datasets=(candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum)
dataset_flags=()
for dataset in "${datasets[@]}"; do dataset_flags+=(-d "$dataset"); done

python3 run_ucad.py --gpu 0 --seed 0 --memory_size 196 --log_group IM224_UCAD_L5_P01_D1024_M196 \
  --save_segmentation_images --log_project VisA_Results "$results" \
  ucad -b vit_base_patch16_224 -le 5 --faiss_on_gpu --pretrain_embed_dimension 1024 \
  --target_embed_dimension 1024 --anomaly_scorer_num_nn 1 --patchsize 1 \
  sampler -p 0.1 approx_greedy_coreset \
  dataset --resize 224 --imagesize 224 "${dataset_flags[@]}" visa "$datapath"
