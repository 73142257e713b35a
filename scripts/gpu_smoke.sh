#!/usr/bin/env bash
# The fast paths end to end on one GPU, through the command line, on the digits demo: for each
# objective, training with the SPEED recipe (default fastest), then sampling with SAMPLE_SPEED
# (default fastest: bf16, FP8 block linears, CUDA graphs) with DDPM-250 for the DDPM model and
# Heun-25 for the flow model (Heun keeps one network output while taking the next, so the graph's
# output must be copied), scored by the digits evaluator.
#   PYTHONPATH=src [STEPS=1500] [OBJECTIVES="ddpm flow"] [SPEED=fastest] [SAMPLE_SPEED=fastest] bash scripts/gpu_smoke.sh [RUN_DIR]
set -euo pipefail
run=${1:-runs/gpu_smoke}
steps=${STEPS:-1500}  # the digits preset's
rm -rf "$run"
quiet() { "$@" 2>&1 | tr '\r' '\n' | grep -vE "^(train|sample):" | tail -4; }
for objective in ${OBJECTIVES:-ddpm flow}; do
    if [ "$objective" = ddpm ]; then sampler=ddpm; n=250; else sampler=heun; n=25; fi
    quiet python -m ditkit train --preset digits --objective "$objective" --run-dir "$run/$objective" --steps "$steps" \
        --device cuda --speed "${SPEED:-fastest}" --set train.precision=bf16 --set train.log_every=250
    quiet python -m ditkit sample --ckpt "$run/$objective/checkpoints/last.pt" --out "$run/$objective/$sampler" \
        --num-samples 500 --sampler "$sampler" --steps "$n" --speed "${SAMPLE_SPEED:-fastest}" --device cuda
    python -m ditkit eval --samples "$run/$objective/$sampler/samples.npz" | grep -iE "agreement|FD"
done
