#!/usr/bin/env bash
# UCAD on MVTec AD, the 15 categories as 15 tasks in the paper's order.
# Usage: CUDA_VISIBLE_DEVICES=0 bash scripts/run_mvtec.sh /path/to/mvtec [results]
# Structure maps are read from /path/to/mvtec-sam-b (make them with segment_anything_prep first).
set -euo pipefail
cd "$(dirname "$0")/.."
datapath=${1:?give the MVTec AD folder}
results=${2:-results}
datasets=(bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush transistor wood zipper)
dataset_flags=()
for dataset in "${datasets[@]}"; do dataset_flags+=(-d "$dataset"); done

python3 run_ucad.py --gpu 0 --seed 0 --memory_size 196 --log_group IM224_UCAD_L5_P01_D1024_M196 \
  --save_segmentation_images --log_project MVTecAD_Results "$results" \
  ucad -b vit_base_patch16_224 -le 5 --faiss_on_gpu --pretrain_embed_dimension 1024 \
  --target_embed_dimension 1024 --anomaly_scorer_num_nn 1 --patchsize 1 \
  sampler -p 0.1 approx_greedy_coreset \
  dataset --resize 224 --imagesize 224 "${dataset_flags[@]}" mvtec "$datapath"
