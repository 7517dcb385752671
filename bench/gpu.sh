#!/usr/bin/env bash
# One prepared GPU run (5 minutes on one H200 without the grid): matmul rate, the fast recipes
# (sweeps/fast.yaml, fast94.yaml) at several epoch counts and seeds, epoch times against their FLOP
# floor, the batch path, time to the seed's 85.8%, and the seed's 20-trial grid packed four per GPU.
#   bash bench/gpu.sh            # on the GPU machine, with CIFAR_RAY_DATA pointing at CIFAR-10
#   bash bench/gpu.sh --smoke    # tiny sizes on any machine: proves the script runs end to end
#   bash bench/gpu.sh --parts fast,seed_accuracy   # some parts only
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi: CPU run"
exec "$PY" bench/gpu.py "$@" --out "${OUT:-.}/gpu_results.json"
