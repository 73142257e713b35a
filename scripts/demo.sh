#!/usr/bin/env bash
# The digits demo, with its own set-up: train a class-conditional DiT on scikit-learn's handwritten
# digits, sample a grid, and score the samples with a classifier trained on real digits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${1:-runs/digits}
.venv/bin/ditkit train --preset digits --run-dir "$OUT"
.venv/bin/ditkit sample --ckpt "$OUT/checkpoints/last.pt" --out "$OUT/samples" --num-samples 1000
.venv/bin/ditkit eval --samples "$OUT/samples/samples.npz"
