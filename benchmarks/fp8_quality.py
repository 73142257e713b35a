"""Do the fast sampling precisions keep quality?  ``SampleSpeed.precision`` (fp32, amp-bf16: autocast;
ditkit.fast.inference), each with and without FP8 block linears (ditkit.fast.fp8).  Two checks, printed as tables, JSON to --out:

1. Network error at scale: a DiT-XL/2 with random weights (adaLN gates non-zero) on random
   latents; relative L2 error of each precision (FP8: static scales calibrated on other inputs)
   against fp32, and of the GPU's FP8 kernel (torch._scaled_mm) against the float32 emulation of
   the same quantized operands.
2. The digits demo: the `digits` preset trained here (DDPM, its default steps), then 1,000
   digits from the same noise and labels sampled in each precision with DDPM-250 and DDIM-50,
   scored by classifier agreement and digits FD (``ditkit.eval.digits``).

    PYTHONPATH=src python benchmarks/fp8_quality.py --out runs/fp8 [--device cuda]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from bench import make_model  # benchmarks/ is the script's folder, so on sys.path

from ditkit.checkpoints import load_model
from ditkit.config import load_config
from ditkit.eval.digits import evaluate_digits, to_digit_pixels
from ditkit.fast import SampleSpeed, sample_speed
from ditkit.fast.fp8 import quantize
from ditkit.objectives import build_objective
from ditkit.sampling import generate, sample_labels, sample_noise
from ditkit.training.trainer import train

PRECISIONS = ("fp32", "amp-bf16", "amp-bf16+fp8", "amp-bf16+fp8+plainmlp")
# +plainmlp: FP8 without GELU and fc2's quantization in fc1's product (ditkit.fast.fp8_mlp)


def prepared(model, precision: str, calibration) -> torch.nn.Module:
    """``model`` as `ditkit sample --speed` runs it, through the same door: cast, then FP8 with static
    scales from ``calibration(net)`` (a run on other inputs)."""
    fp8 = "+fp8" in precision
    speed = SampleSpeed(precision=precision.split("+")[0], fp8=fp8, fp8_mlp=fp8 and "+plainmlp" not in precision)
    device = next(model.parameters()).device
    with torch.no_grad():
        return sample_speed(model, speed, device, calibrate=calibration)[0]


def network_error(device: str) -> dict:
    torch.manual_seed(0)
    model = make_model("DiT-XL/2", 32, device).eval()  # benchmarks/bench.py's: adaLN gates non-zero
    x = torch.randn(8, 4, 32, 32, device=device)
    t, y = torch.randint(0, 1000, (8,), device=device), torch.randint(0, 1000, (8,), device=device)
    other = [(torch.randn_like(x), torch.randint(0, 1000, (8,), device=device), y) for _ in range(4)]
    with torch.no_grad():
        ref = model(x, t, y).float()
    rel = lambda a: ((a - ref).norm() / ref.norm()).item()  # noqa: E731
    errors = {}
    for precision in PRECISIONS[1:]:
        copy_ = copy.deepcopy(model)
        net = prepared(copy_, precision, lambda n: [n(a, b, y=c) for a, b, c in other])
        with torch.no_grad():
            errors[f"{precision}_vs_fp32"] = rel(net(x, t, y=y))
        if precision == "amp-bf16+fp8":
            fp8 = copy_
        del copy_, net
    with torch.no_grad():
        layer = fp8.blocks[0].mlp.fc1
        h = torch.randn(2048, layer.in_features, device=device)
        kernel = layer(h).float()
        s_in = layer.input_scale  # the layer's static scale: the same quantized operands, multiplied in fp32
        q = quantize(h, s_in)
        emulated = (q.float() * s_in) @ layer.dequantized_weight().t() + layer.bias
    return {**errors, "kernel_vs_emulation": ((kernel - emulated).norm() / emulated.norm()).item()}


def digits(out: Path, device: str, n: int) -> list[dict]:
    run = out / "digits"
    if not (run / "checkpoints" / "last.pt").exists():
        train(load_config("digits"), run, device=device)
    rows = []
    for sampler, steps in (("ddpm", 250), ("ddim", 50)):
        for precision in PRECISIONS:
            model, cfg = load_model(run / "checkpoints" / "last.pt", device=device)
            cfg.sample.sampler, cfg.sample.steps = sampler, steps
            objective = build_objective(cfg)
            idx = range(n)
            noise, y = sample_noise(idx, (1, 8, 8), 0).to(device), sample_labels(idx, 10, "balanced", 0)
            cal_noise, cal_y = torch.randn(8, 1, 8, 8, device=device), torch.arange(8, device=device)
            net = prepared(model, precision, lambda n: generate(n, objective, cal_noise, {"y": cal_y}, cfg.sample, progress=False))
            torch.manual_seed(0)
            t0 = time.perf_counter()
            x, _ = generate(net, objective, noise, {"y": y.to(device)}, cfg.sample, progress=False)
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
    ap.add_argument("--network-only", action="store_true", help="only the DiT-XL/2 network error (no digits model)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    net = network_error(args.device)
    print("DiT-XL/2 relative error vs fp32: " + ", ".join(f"{k.removesuffix('_vs_fp32')} {v:.2e}" for k, v in net.items()
                                                           if k.endswith("_vs_fp32"))
          + f"; FP8 kernel vs emulation {net['kernel_vs_emulation']:.2e}", flush=True)
    rows = [] if args.network_only else digits(out, args.device, args.num_samples)
    name = "fp8_quality_network.json" if args.network_only else "fp8_quality.json"
    (out / name).write_text(json.dumps({"network": net, "digits": rows}, indent=2))
    print("\n| sampler | precision | agreement | digits FD |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['sampler']}-{r['steps']} | {r['precision']} | {r['agreement']:.1%} | {r['digits_fd']:.3f} |")


if __name__ == "__main__":
    main()
