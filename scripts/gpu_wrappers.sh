#!/usr/bin/env bash
# DiT-XL/2 on one GPU, in one table: the official step at its fastest (bf16 autocast, foreach AdamW, the
# per-parameter EMA), ditkit's benchmark step with `fastest`, and `ditkit train --preset imagenet256` on a
# latent cache in one process, under DDP and under FSDP (torchrun with one process: the wrapper's hooks and
# collectives are in the step), at 32 and 128 images per step.
#   PYTHONPATH=src bash scripts/gpu_wrappers.sh [BATCHES] [PARTS]     # BATCHES: "32 128"; PARTS: "bench train"
set -euo pipefail
cd "$(dirname "$0")/.."
batches=${1:-"32 128"}
parts=${2:-"bench train"}
out=${OUT:-runs/gpu_wrappers}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
list=$(echo "$batches" | tr ' ' ',')
if [[ " $parts " == *" bench "* ]]; then
    python benchmarks/bench.py --parts peak,train --models DiT-XL/2 --batches "$list" --steps 30 \
        --variants bf16 --no-fused-adamw --no-foreach-ema --out "$out/bench_official_bf16.json"
    python benchmarks/bench.py --parts train --models DiT-XL/2 --batches "$list" --steps 30 \
        --train-speed fastest --out "$out/bench_fastest.json"
fi
if [[ " $parts " == *" train "* ]]; then
    for b in $batches; do
        common=(--models DiT-XL/2 --batch "$b" --micro "$b" --steps 40)
        python benchmarks/train_throughput.py "${common[@]}" --extra train.speed=fastest --tag "plain_b$b"
        python benchmarks/train_throughput.py "${common[@]}" --torchrun --extra train.speed=fastest train.distributed=ddp --tag "ddp_b$b"
        python benchmarks/train_throughput.py "${common[@]}" --torchrun --extra train.speed=fastest train.distributed=fsdp --tag "fsdp_b$b"
    done
fi
python benchmarks/wrappers_table.py "$out"
