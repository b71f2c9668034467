#!/usr/bin/env bash
# UCAD on VisA (as distributed, with split_csv/1cls.csv, or converted to the MVTec layout), 12 tasks.
#
# Usage: [CUDA_VISIBLE_DEVICES=N] bash scripts/run_visa.sh DATA_PATH [RESULTS_PATH] [GLOBAL OPTIONS...]
#   Paths are relative to the folder you run the script from; GLOBAL OPTIONS (e.g. --seed 1, --resume, --gpu 1) are
#   options of run_ucad.py (--config FILE adds a recipe) and change only what they name. Details:
#   scripts/run_sequence.sh, or --help.
# Example, three seeds on three GPUs, from any folder:
#   for seed in 0 1 2; do CUDA_VISIBLE_DEVICES=$seed bash ~/ucad/scripts/run_visa.sh data/visa results_s$seed --seed $seed & done
exec bash "$(dirname "${BASH_SOURCE[0]}")/run_sequence.sh" visa "$@"
