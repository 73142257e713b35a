#!/usr/bin/env bash
# ditkit on N GPUs of one host, in three parts (PARTS, default all three):
#   train   DiT-XL/2, bf16, 32 images per GPU, 100 steps: 1 GPU alone, then DDP and FSDP on N GPUs (img/s
#           per GPU, scaling efficiency). Each N-GPU loss curve against 1 GPU with N accumulation steps
#           (the same global batch, logged every step), and each N-GPU checkpoint resumed on 1 GPU for 10
#           more steps against the 1-GPU run resumed alike.
#   fast    the same throughput with a speed recipe (SPEED, default fastest: the levers valid for the run).
#   sample  50,000 256-pixel samples over N GPUs into one ADM .npz, checked index by index.
#   profile (not in the default) where the step's time goes, steps 81-90 under the profiler: 1 GPU eager,
#           compiled, with SPEED; FSDP on N GPUs (N may be 1): resharding after the forward or not, bf16 gathering.
#   PYTHONPATH=src bash scripts/multi_gpu.sh [OUT_DIR]
#   (PARTS="train fast sample" MODEL=DiT-XL/2 LATENT=32 MICRO=32 STEPS=100 SAMPLES=50000 DEVICE=cuda
#    NPROC=<processes, default: every GPU>)
set -euo pipefail
# NVLink multicast off: on shared hosts it can take the host's GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${1:-runs/multi_gpu}
parts=" ${PARTS:-train fast sample} "
model=${MODEL:-DiT-XL/2} latent=${LATENT:-32} micro=${MICRO:-32} steps=${STEPS:-100} device=${DEVICE:-cuda}
fast=${SPEED:-fastest}
n=${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count())')}
[ "$n" -ge 2 ] || [ "$parts" = " profile " ] || { echo "multi_gpu.sh: needs 2 or more GPUs, found $n" >&2; exit 1; }
mkdir -p "$out"
status=0
check() { python benchmarks/multi_gpu_check.py "$@" || status=1; }
# The last lines of a command's output without its progress bars; the command's failure fails the pipe.
quiet() { "$@" 2>&1 | tr '\r' '\n' | { grep -vE "^(train|sample):|it/s\]|batch/s\]" || true; } | tail -"${TAIL:-1}"; }
# train RUN PROCS ACCUM [ditkit train options]: the imagenet256 preset on the synthetic latent cache, MICRO per step per process
train() {
    local run=$1 procs=$2 accum=$3
    shift 3
    local args=(-m ditkit train --preset imagenet256 --model "$model" --steps "$steps" --run-dir "$out/$run"
                --set data.path="$out/latents" --set model.input_size="$latent" --set train.sample_every=0
                --set train.global_batch_size=$((micro * procs * accum)) --set train.grad_accum="$accum"
                --set train.ckpt_every=1000000 --speed reference "$@")
    if [ "$procs" -gt 1 ] || [[ "$*" == *distributed=fsdp* ]]; then quiet python -m torch.distributed.run --standalone --nproc_per_node "$procs" "${args[@]}"
    else quiet python "${args[@]}" --device "$device"; fi
}
since() { python -c "print(f'{$(date +%s.%N) - $1:.1f} s')"; }  # seconds since a `date +%s.%N`
all_gpus=$(seq -s, 0 $((n - 1)))
echo "## $n × $(python -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'), NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"
if [ "$device" = cuda ]; then nvidia-smi topo -m | head -$((n + 1)) || true; fi
[ -f "$out/latents/manifest.json" ] || python benchmarks/multi_gpu_check.py cache "$out/latents" "$latent"

if [[ $parts == *" train "* ]]; then
    echo "## $model, the preset's precision (bf16 on GPUs), $micro per GPU, $steps steps, loss logged every step"
    # side by side, one GPU each (sharing the host's cores): the throughput baseline, and the loss-curve
    # twin (N accumulation steps); a failure of either stops the script once both have ended
    CUDA_VISIBLE_DEVICES=0 train one 1 1 --set train.log_every=1 & a=$!
    CUDA_VISIBLE_DEVICES=1 train one_accum 1 "$n" --set train.log_every=1 & b=$!
    rc=0; wait $a || rc=1; wait $b || rc=1; [ $rc = 0 ]
    rm -rf "$out/one/checkpoints" "$out/one/ema.safetensors"
    for dist in ddp fsdp; do train "$dist" "$n" 1 --set train.log_every=1 --set train.distributed="$dist"; done
    check throughput "$out/one:1:$steps" "$out/ddp:$n:$steps" "$out/fsdp:$n:$steps"
    for dist in ddp fsdp; do check losses "$out/$dist" "$out/one_accum"; done
    echo "## the $n-GPU checkpoints resumed on 1 GPU to step $((steps + 10)), against the 1-GPU run resumed alike"
    steps0=$steps
    steps=$((steps0 + 10))
    CUDA_VISIBLE_DEVICES=0 train one_accum 1 "$n" --set train.log_every=1 --resume & a=$!
    CUDA_VISIBLE_DEVICES=1 train ddp 1 "$n" --set train.log_every=1 --resume & b=$!
    rc=0; wait $a || rc=1; wait $b || rc=1; [ $rc = 0 ]
    train fsdp 1 "$n" --set train.log_every=1 --resume
    steps=$steps0
    for dist in ddp fsdp; do check losses "$out/$dist" "$out/one_accum"; done
    rm -rf "$out"/{one_accum,ddp,fsdp}/checkpoints "$out"/*/ema.safetensors
fi

if [[ $parts == *" fast "* ]]; then
    echo "## $model, $micro per GPU, $steps steps, with $fast"
    CUDA_VISIBLE_DEVICES=0 train fast_one 1 1 --set train.log_every=$((steps / 2)) --speed "$fast" || echo "fast_one FAILED"
    for dist in ddp fsdp; do
        train "fast_$dist" "$n" 1 --set train.log_every=$((steps / 2)) --set train.distributed="$dist" --speed "$fast" \
            || echo "fast_$dist FAILED"
    done
    check throughput "$out/fast_one:1" "$out/fast_ddp:$n" "$out/fast_fsdp:$n"
    rm -rf "$out"/fast_*/checkpoints "$out"/fast_*/ema.safetensors
fi

if [[ $parts == *" profile "* ]]; then
    echo "## where the step goes: $model, $micro per GPU, the profiler over steps 81-90 of $steps"
    prof() {
        local run=$1
        shift
        CUDA_VISIBLE_DEVICES=${GPUS:-0} train "$run" "$@" --set train.profile=81-90 --set train.log_every="$steps" || echo "$run FAILED"
        echo "### $run"
        sed -n '1,14p' "$out/$run/profile_81-90.txt" || true
        rm -rf "$out/$run/checkpoints" "$out/$run/ema.safetensors" "$out/$run/profile_81-90.json"
    }
    GPUS=$all_gpus prof prof_fsdp_keep "$n" 1 --set train.distributed=fsdp --set train.fsdp_reshard=false
    # NCCL's own account of the links it chose (P2P/NVLink, SHM, ...), for this run only
    NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,P2P NCCL_DEBUG_FILE="$out/nccl.%p.txt" \
        GPUS=$all_gpus prof prof_fsdp "$n" 1 --set train.distributed=fsdp
    echo "### NCCL channels (NCCL_DEBUG=INFO)"
    { grep -h " via " "$out"/nccl.*.txt || true; } | sed 's/^.*NCCL INFO //' | sort | uniq -c | head -20
    GPUS=$all_gpus prof prof_fsdp_bf16 "$n" 1 --set train.distributed=fsdp --set train.fsdp_bf16_gather=true \
        --set train.precision=bf16
    prof prof_eager 1 1
    prof prof_fast 1 1 --speed "$fast"
    prof prof_compile 1 1 --speed compile
fi

if [[ $parts == *" sample "* ]]; then
    total=${SAMPLES:-50000}
    echo "## $total samples over $n GPUs into one ADM .npz: DiT-S/2 on ${latent}×${latent}×4 latents (random weights),"
    echo "## DDIM-25, guidance 1.5, amp-bf16; the SD VAE's decoder (random weights) in float32"
    python benchmarks/multi_gpu_check.py fake-checkpoint "$out/lat" "$latent"
    sample=(-m ditkit sample --ckpt "$out/lat/dit.safetensors" --vae "$out/lat/vae" --sampler ddim --steps 25
            --cfg-scale 1.5 --speed amp_bf16 --batch-size 250)
    start=$(date +%s.%N)
    quiet python -m torch.distributed.run --standalone --nproc_per_node "$n" "${sample[@]}" --num-samples "$total" --out "$out/many"
    echo "wall time, $n GPUs, $total samples: $(since "$start") (start-up included)"
    start=$(date +%s.%N)
    CUDA_VISIBLE_DEVICES=0 quiet python "${sample[@]}" --num-samples $((total / 25)) --out "$out/one_gpu" --device "$device"
    echo "wall time, 1 GPU, $((total / 25)) samples: $(since "$start") (start-up included)"
    ls -l "$out/many/samples.npz"
    check samples "$out/many/samples.npz" "$out/one_gpu/samples.npz"
    rm -rf "$out/many" "$out/one_gpu"
fi
exit $status
