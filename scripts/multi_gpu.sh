#!/usr/bin/env bash
# ditkit on every GPU of one host (issue 11): training throughput on 1 GPU and with DDP and FSDP on N,
# the N-GPU loss curve against one GPU with the same global batch, an N-GPU checkpoint resumed on
# one GPU, and 50,000 samples into one ADM .npz over N GPUs, checked index by index.
#   PYTHONPATH=src bash scripts/multi_gpu.sh [OUT_DIR]      (TP_STEPS=30 TP_MODELS=DiT-XL/2 TP_EXTRA="k=v ...")
set -euo pipefail
# NVLink multicast off: on the lent machines it can take the host's shared GPUs out of service (KINDS.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${1:-runs/multi_gpu}
mkdir -p "$out"
n=$(python -c 'import torch; print(torch.cuda.device_count())')
run() { python -m torch.distributed.run --standalone --nproc_per_node "$@"; }
# The last lines of a command's output without its progress bars; the command's failure fails the script.
quiet() { "$@" 2>&1 | tr '\r' '\n' | { grep -vE "^(train|sample):|it/s\]|batch/s\]" || true; } | tail -"${TAIL:-2}"; }
[ "$n" -ge 1 ] || { echo "multi_gpu.sh: no CUDA GPU visible" >&2; exit 1; }
echo "## $n × $(python -c 'import torch; print(torch.cuda.get_device_name())'), NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"

echo "## 1. DiT-XL/2 training throughput, bf16, per-GPU batch 32 (img/s from the trainer's metrics)"
# One process is the plain single-GPU run (train.distributed applies under torchrun only).
throughput() { TAIL=1 quiet python benchmarks/train_throughput.py --models ${TP_MODELS:-DiT-XL/2} --batch $((32 * $1)) \
    --micro 32 --nproc "$1" --steps "${TP_STEPS:-30}" --tag "$2" --extra "train.distributed=$2" ${TP_EXTRA:-}; }
throughput 1 ddp
if [ "$n" -gt 1 ]; then throughput "$n" ddp; throughput "$n" fsdp; fi

echo "## 2. digits, 100 steps: $n GPUs against 1 GPU with $n accumulation steps (the same global batch, 32 per GPU)"
common=(train --preset digits --steps 100 --set train.global_batch_size=$((32 * n)) --set train.log_every=1 --set train.sample_every=0)
quiet python -m ditkit "${common[@]}" --device cuda --run-dir "$out/one" --set train.grad_accum="$n"
for dist in ddp fsdp; do
    quiet run "$n" -m ditkit "${common[@]}" --run-dir "$out/$dist" --set train.distributed="$dist"
    python benchmarks/multi_gpu_check.py losses "$out/$dist" "$out/one"
done
echo "## the $n-GPU checkpoints resumed on 1 GPU to step 120, against the 1-GPU run resumed likewise"
more=(train --preset digits --steps 120 --resume --device cuda --set train.global_batch_size=$((32 * n)) --set train.log_every=1
      --set train.sample_every=0 --set train.grad_accum="$n")
for r in one ddp fsdp; do quiet python -m ditkit "${more[@]}" --run-dir "$out/$r"; done
for dist in ddp fsdp; do python benchmarks/multi_gpu_check.py losses "$out/$dist" "$out/one"; done

echo "## 3. 50,000 samples over $n GPUs into one ADM .npz (DiT-S/2 on 8×8×4 latents, DDIM-25, guidance 1.5, SD VAE decoder)"
python benchmarks/multi_gpu_check.py fake-checkpoint "$out/lat"
sample=(-m ditkit sample --ckpt "$out/lat/dit.safetensors" --vae "$out/lat/vae" --sampler ddim --steps 25 --batch-size 500)
start=$(date +%s.%N)
quiet run "$n" "${sample[@]}" --num-samples 50000 --out "$out/s50k"
echo "wall time, $n GPUs, 50,000 samples: $(python -c "print(f'{$(date +%s.%N) - $start:.1f} s')") (start-up included)"
quiet python "${sample[@]}" --num-samples 2000 --out "$out/s2k" --device cuda
python benchmarks/multi_gpu_check.py samples "$out/s50k/samples.npz" "$out/s2k/samples.npz"
rm -rf "$out/s50k/parts" "$out/s2k"
