"""Does FP8 sampling (ditkit.models.fp8) keep quality?  Two checks, printed as tables, JSON to --out:

1. Network error at scale: a DiT-XL/2 with random weights (adaLN gates non-zero) on random
   latents; relative L2 error of bf16 and of bf16 + FP8 (static scales calibrated on other
   inputs) against fp32, and of the GPU's FP8 kernel (torch._scaled_mm) against the float32
   emulation of the same quantized operands.
2. The digits demo: the `digits` preset trained here (DDPM, its default steps), then 1,000
   digits from the same noise and labels sampled in fp32, bf16 and bf16 + FP8 with DDPM-250 and
   DDIM-50, scored by classifier agreement and digits FD (``ditkit.eval.digits``).

    PYTHONPATH=src python benchmarks/fp8_quality.py --out runs/fp8 [--device cuda]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ditkit.checkpoints import load_for_sampling
from ditkit.config import load_config
from ditkit.eval.digits import evaluate_digits, to_digit_pixels
from ditkit.models.fp8 import calibrate_fp8, convert_to_fp8, quantize
from ditkit.objectives import build_objective
from ditkit.sampling import generate, sample_labels, sample_noise
from ditkit.train.trainer import train

from bench import make_model  # benchmarks/ is the script's folder, so on sys.path

PRECISIONS = ("fp32", "bf16", "bf16+fp8")


def network_error(device: str) -> dict:
    torch.manual_seed(0)
    model = make_model("DiT-XL/2", 32, device).eval()  # benchmarks/bench.py's: adaLN gates non-zero
    x = torch.randn(8, 4, 32, 32, device=device)
    t, y = torch.randint(0, 1000, (8,), device=device), torch.randint(0, 1000, (8,), device=device)
    fp8 = copy.deepcopy(model)
    convert_to_fp8(fp8)
    other = [(torch.randn_like(x), torch.randint(0, 1000, (8,), device=device), y) for _ in range(4)]
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):  # static scales from other inputs
        calibrate_fp8(fp8, lambda: [fp8(*batch) for batch in other])
    with torch.no_grad():
        ref = model(x, t, y).float()
        with torch.autocast(device, dtype=torch.bfloat16):
            bf16 = model(x, t, y).float()
            f8 = fp8(x, t, y).float()
        rel = lambda a: ((a - ref).norm() / ref.norm()).item()  # noqa: E731
        layer = fp8.blocks[0].mlp.fc1
        h = torch.randn(2048, layer.in_features, device=device)
        kernel = layer(h).float()
        s_in = layer.input_scale  # the layer's static scale: the same quantized operands, multiplied in fp32
        q = quantize(h, s_in)
        emulated = (q.float() * s_in) @ layer.dequantized_weight().t() + layer.bias
    return {"bf16_vs_fp32": rel(bf16), "fp8_vs_fp32": rel(f8),
            "kernel_vs_emulation": ((kernel - emulated).norm() / emulated.norm()).item()}


def digits(out: Path, device: str, n: int) -> list[dict]:
    run = out / "digits"
    if not (run / "checkpoints" / "last.pt").exists():
        train(load_config("digits"), run, device=device)
    rows = []
    for sampler, steps in (("ddpm", 250), ("ddim", 50)):
        for precision in PRECISIONS:
            model, cfg = load_for_sampling(run / "checkpoints" / "last.pt", device=device)
            cfg.sample.sampler, cfg.sample.steps = sampler, steps
            objective = build_objective(cfg)
            idx = range(n)
            noise, y = sample_noise(idx, (1, 8, 8), 0).to(device), sample_labels(idx, 10, "balanced", 0)
            amp = torch.autocast(device, dtype=torch.bfloat16) if precision.startswith("bf16") else nullcontext()
            if "fp8" in precision:  # static scales from one run on 8 other samples, as `ditkit sample --fp8`
                convert_to_fp8(model)
                cal_noise, cal_y = torch.randn(8, 1, 8, 8, device=device), torch.arange(8, device=device)
                with amp:
                    calibrate_fp8(model, lambda: generate(model, objective, cal_noise, {"y": cal_y}, cfg.sample, progress=False))
            torch.manual_seed(0)
            t0 = time.perf_counter()
            with amp:
                x, _ = generate(model, objective, noise, {"y": y.to(device)}, cfg.sample, progress=False)
            m = evaluate_digits(to_digit_pixels(x.float().cpu().numpy()), y.numpy())
            rows.append({"sampler": sampler, "steps": steps, "precision": precision, "agreement": m["classifier_agreement"],
                         "digits_fd": m["digits_fd"], "seconds": time.perf_counter() - t0})
            print(f"{sampler}-{steps} {precision:9s} agreement {rows[-1]['agreement']:.3f} FD {rows[-1]['digits_fd']:.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/fp8")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-samples", type=int, default=1000)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    net = network_error(args.device)
    print(f"DiT-XL/2 relative error vs fp32: bf16 {net['bf16_vs_fp32']:.2e}, bf16+fp8 {net['fp8_vs_fp32']:.2e}; "
          f"FP8 kernel vs emulation {net['kernel_vs_emulation']:.2e}", flush=True)
    rows = digits(out, args.device, args.num_samples)
    (out / "fp8_quality.json").write_text(json.dumps({"network": net, "digits": rows}, indent=2))
    print("\n| sampler | precision | agreement | digits FD |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['sampler']}-{r['steps']} | {r['precision']} | {r['agreement']:.1%} | {r['digits_fd']:.3f} |")


if __name__ == "__main__":
    main()
