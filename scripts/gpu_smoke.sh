#!/usr/bin/env bash
# The fast paths end to end on one GPU, through the command line, on the digits demo: for each
# objective, training compiled with CUDA graphs, then sampling in amp-bf16 + FP8 + CUDA graphs
# (DDPM-250 for the DDPM model; Heun-25 for the flow model: Heun keeps one network output while
# taking the next, so the graph's output must be copied), scored by the digits evaluator.
#   PYTHONPATH=src bash scripts/gpu_smoke.sh [RUN_DIR]
set -euo pipefail
run=${1:-runs/gpu_smoke}
rm -rf "$run"
quiet() { "$@" 2>&1 | tr '\r' '\n' | grep -vE "^(train|sample):" | tail -3; }
for pair in "ddpm ddpm 250" "flow heun 25"; do
    set -- $pair
    quiet python -m ditkit train --preset digits --objective "$1" --run-dir "$run/$1" --steps 600 --device cuda \
        --set train.compile=true --set train.compile_mode=cudagraphs --set train.log_every=200
    quiet python -m ditkit sample --ckpt "$run/$1/checkpoints/last.pt" --out "$run/$1/$2" --num-samples 500 \
        --sampler "$2" --steps "$3" --precision amp-bf16 --fp8 --compile cudagraphs --device cuda
    python -m ditkit eval --samples "$run/$1/$2/samples.npz" | grep -iE "agreement|FD"
done
