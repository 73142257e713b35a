#!/usr/bin/env bash
# The quality runs of the benchmarks with known answers on one GPU (docs/training.md), one part per call, each
# under ten minutes: the data is written when missing, training runs within its budget and resumes where the last
# call stopped (train.budget_minutes), scores and figures are copied to $OUT.
#   PYTHONPATH=src bash scripts/gpu_quality.sh PART
# PART: lengths   1D power-law fields of lengths 64-1,024: 8 minutes of the 10-minute budget
#       lengths2  the rest of that budget, then the score per length (1,024 samples per point)
#       volumes   3D 32^3 fields: 9 minutes of the 20-minute budget (run it twice), then volumes-score
#       volumes-score
#       numbers   numbers of one to three digits from their token sequence: train and score
#       video     moving-digit clips: train and score
#       images32  the images32 preset on the shapes dataset, flow matching, 20,000 steps, scored (a cut job:
#                 run it again, it goes on from the last checkpoint)
#       modern    the post-2023 options at one training budget of 2 minutes each on the shapes dataset:
#                 the 2023 block, + RoPE/RMSNorm/SwiGLU, + logit-normal times; modern2: + direction loss, + beta2 0.95
# The digit scorers need scikit-learn; wheels in .whl/ are installed when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:?"a part: lengths, lengths2, volumes, volumes-score, numbers, video, images32, modern or modern2"}
runs=runs/quality
out=${OUT:-$runs}
mkdir -p "$runs" "$out"
nvidia-smi --query-gpu=name --format=csv,noheader || true
if ! python -c "import sklearn" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    pip install -q --no-index --target /tmp/site .whl/*.whl
    export PYTHONPATH="${PYTHONPATH:-src}:/tmp/site"
fi
pl() { python benchmarks/power_law_fields.py "$@"; }
case "$part" in
    lengths|lengths2)
        r=$runs/lengths
        [ -f "$r/data/benchmark.json" ] || pl --out "$r" data --lengths 64,128,256,512,1024
        pl --out "$r" --device cuda train --minutes 10 --call-minutes 8 --set train.ckpt_every=2000
        if [ "$part" = lengths2 ]; then pl --out "$r" score --points 8 --samples 1024; fi
        cp "$r/run/metrics.jsonl" "$out/lengths_metrics.jsonl"
        if [ -f "$r/score.json" ]; then cp "$r/score.json" "$out/lengths_score.json"; fi ;;
    volumes)
        r=$runs/volumes
        [ -f "$r/data/benchmark.json" ] || pl --out "$r" data --axes 3 --size 32
        pl --out "$r" --device cuda train --minutes 20 --call-minutes 9 --set train.ckpt_every=2000
        cp "$r/run/metrics.jsonl" "$out/volumes_metrics.jsonl" ;;
    volumes-score)
        r=$runs/volumes
        pl --out "$r" --device cuda train --minutes 20 --call-minutes 9 --set train.ckpt_every=2000  # trains out what is left of the budget
        pl --out "$r" score --points 8 --samples 32
        cp "$r/score.json" "$out/volumes_score.json"; cp "$r/spectra.png" "$out/volumes_spectra.png" ;;
    numbers|video)
        script=benchmarks/digit_numbers.py; steps=6000; r=$runs/numbers
        if [ "$part" = video ]; then script=benchmarks/moving_digits.py; steps=8000; r=$runs/video; fi
        [ -d "$r/data" ] || python "$script" --out "$r" data
        [ -f "$r/run/checkpoints/last.pt" ] || python "$script" --out "$r" --device cuda train --steps "$steps"
        python "$script" --out "$r" score --cfg-scales 1 2 3
        cp "$r"/*.json "$r"/*.png "$r"/*.gif "$out/" 2>/dev/null || true ;;
    images32)
        python benchmarks/small_images.py --out "$runs/images32" --steps 20000 --device cuda --objectives flow \
            --speed fast
        cp "$runs"/images32/*.json "$runs"/images32/*.png "$out/" 2>/dev/null || true ;;
    modern|modern2)
        configs=baseline,arch,logit_normal
        if [ "$part" = modern2 ]; then configs=cos,full; fi
        python benchmarks/modern_options.py --out "$runs/modern_shapes" --data shapes --minutes 2 --device cuda \
            --speed fast --configs "$configs" ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
esac
