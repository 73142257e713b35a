#!/usr/bin/env bash
# DiT-XL/2 on one GPU, in one table: the official step at its fastest (bf16 autocast, foreach AdamW, the
# per-parameter EMA), ditkit's benchmark step with `fastest`, and `ditkit train --preset imagenet256` on a
# latent cache in one process, under DDP and under FSDP (torchrun with one process: the wrapper's hooks and
# collectives are in the step), at 32 and 128 images per step.
#   PYTHONPATH=src bash scripts/gpu_wrappers.sh [BATCHES] [PARTS]   # defaults "32 128", "official fastest plain ddp fsdp"
#   (ddp: the default buckets, one for all gradients under CUDA graphs; the part ddp_buckets adds DDP with
#   train.ddp_bucket_mb at each size of $DDP_BUCKETS, default 25, torch's size; fsdp_eager adds FSDP with the
#   levers of fastest but without torch.compile)
set -euo pipefail
cd "$(dirname "$0")/.."
batches=${1:-"32 128"}
parts=${2:-"official fastest plain ddp fsdp"}
out=${OUT:-runs/gpu_wrappers}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
list=$(echo "$batches" | tr ' ' ',')
if [[ " $parts " == *" official "* ]]; then
    python benchmarks/bench.py --parts peak,train --models DiT-XL/2 --batches "$list" --steps 30 \
        --variants bf16 --no-fused-adamw --no-foreach-ema --out "$out/bench_official_bf16.json"
fi
if [[ " $parts " == *" fastest "* ]]; then
    python benchmarks/bench.py --parts train --models DiT-XL/2 --batches "$list" --steps 30 \
        --train-speed fastest --out "$out/bench_fastest.json"
fi
for b in $batches; do
    common=(--models DiT-XL/2 --batch "$b" --micro "$b" --steps 40)
    if [[ " $parts " == *" plain "* ]]; then
        python benchmarks/train_throughput.py "${common[@]}" --extra train.speed=fastest --tag "plain_b$b"
    fi
    for mode in ddp fsdp; do
        if [[ " $parts " == *" $mode "* ]]; then
            python benchmarks/train_throughput.py "${common[@]}" --torchrun --extra train.speed=fastest \
                "train.distributed=$mode" --tag "${mode}_b$b" || true
        fi
    done
    if [[ " $parts " == *" fsdp_eager "* ]]; then  # FSDP with fastest's levers but no torch.compile
        python benchmarks/train_throughput.py "${common[@]}" --torchrun --extra train.distributed=fsdp \
            train.speed=fused_mlp+fused_attention+tuned_linear+fused_norm+bf16_residual+master_weights+fp8_forward+fp8_backward \
            --tag "fsdpeager_b$b" || true
    fi
    if [[ " $parts " == *" ddp_buckets "* ]]; then  # larger DDP buckets: fewer pieces of the compiled graph
        for mb in ${DDP_BUCKETS:-25}; do
            python benchmarks/train_throughput.py "${common[@]}" --torchrun --extra train.speed=fastest \
                train.distributed=ddp "train.ddp_bucket_mb=$mb" --tag "ddp${mb}_b$b" || true
        done
    fi
done
python benchmarks/wrappers_table.py "$out"
