#!/usr/bin/env bash
# The throughput cost of REPA on DiT-XL/2 on one GPU: `ditkit train --preset imagenet256` on a synthetic latent
# cache, without and with REPA (a randomly initialised DINOv2-B of the published configuration as the frozen encoder,
# the cache's images beside the latents, block 8 aligned), at the same batch and speed recipe.
#   PYTHONPATH=src bash scripts/gpu_repa_cost.sh [BATCH]   # default 128
set -euo pipefail
cd "$(dirname "$0")/.."
b=${1:-128}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
common=(--models DiT-XL/2 --batch "$b" --micro "$b" --steps 40 --extra train.speed=fastest)
python benchmarks/train_throughput.py "${common[@]}" --tag "norepa_b$b"
python benchmarks/train_throughput.py "${common[@]}" --repa --tag "repa_b$b"
