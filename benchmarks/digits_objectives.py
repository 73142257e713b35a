"""DDPM against flow matching on the digits demo: the same model and training budget for each
objective, then classifier agreement and digits FD against the number of network evaluations
(NFE) for every sampler.  Prints a Markdown table and writes JSON.

    PYTHONPATH=src python benchmarks/digits_objectives.py --out runs/objectives [--device cuda] [--steps 2000]

Runs on a CPU (about 20 minutes on 2 cores) or a GPU (a few minutes).  Each objective is trained
with `ditkit.training.trainer.train` from the `digits` preset; samples are 1,000 digits, 100 per
class, scored with `ditkit.eval.digits` (an SVC trained on real digits, 99.3% on held-out ones)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ditkit.checkpoints import load_model
from ditkit.config import load_config
from ditkit.eval.digits import evaluate_digits, to_digit_pixels
from ditkit.objectives import build_objective
from ditkit.sampling import generate, sample_labels, sample_noise
from ditkit.training.trainer import train

# (objective, sampler, steps): every sampler of each objective, at a few step counts.
RUNS = [
    ("ddpm", "ddpm", 250), ("ddpm", "ddim", 50), ("ddpm", "ddim", 25), ("ddpm", "ddim", 10),
    ("flow", "euler", 50), ("flow", "euler", 25), ("flow", "euler", 10), ("flow", "heun", 25), ("flow", "heun", 10),
    ("flow", "dopri5", 0), ("flow", "sde", 50),
]


def score(ckpt: Path, sampler: str, steps: int, cfg_scale: float, n: int, device: str, seed: int = 0) -> dict:
    model, cfg = load_model(ckpt, device=device)
    cfg.sample.sampler, cfg.sample.steps, cfg.sample.cfg_scale = sampler, steps, cfg_scale
    objective = build_objective(cfg)
    idx = range(n)
    noise = sample_noise(idx, (1, 8, 8), seed).to(device)
    y = sample_labels(idx, 10, "balanced", seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    x, nfe = generate(model, objective, noise, {"y": y.to(device)}, cfg.sample, progress=False)
    seconds = time.perf_counter() - t0
    metrics = evaluate_digits(to_digit_pixels(x.float().cpu().numpy()), y.numpy())
    return {"nfe": nfe, "agreement": metrics["classifier_agreement"], "digits_fd": metrics["digits_fd"],
            "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/objectives")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, help="training steps (default: the digits preset's)")
    ap.add_argument("--cfg-scale", type=float, help="guidance (default: the digits preset's)")
    ap.add_argument("--num-samples", type=int, default=1000)
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for objective in ("ddpm", "flow"):
        sampler = "ddpm" if objective == "ddpm" else "heun"
        overrides = [f"objective.name={objective}", f"sample.sampler={sampler}"] + ([f"train.steps={args.steps}"] if args.steps else [])
        cfg = load_config("digits", overrides=overrides)
        run = out / objective
        t0 = time.perf_counter()
        if not (run / "checkpoints" / "last.pt").exists():
            train(cfg, run, device=args.device)
        train_s = time.perf_counter() - t0
        scale = args.cfg_scale if args.cfg_scale is not None else cfg.sample.cfg_scale
        for obj, sampler, steps in RUNS:
            if obj != objective:
                continue
            r = score(run / "checkpoints" / "last.pt", sampler, steps, scale, args.num_samples, args.device)
            rows.append({"objective": objective, "sampler": sampler, "steps": steps, "cfg_scale": scale,
                         "train_steps": cfg.train.steps, "train_seconds": train_s, **r})
            print(f"{objective:5s} {sampler:7s} {steps:4d} NFE {r['nfe']:4d} agreement {r['agreement']:.3f} "
                  f"FD {r['digits_fd']:.3f} ({r['seconds']:.1f}s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "objectives.json").write_text(json.dumps(rows, indent=2))
    print("\n| objective | sampler | steps | NFE | agreement | digits FD | sampling s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        steps = "adaptive" if r["sampler"] == "dopri5" else r["steps"]
        print(f"| {r['objective']} | {r['sampler']} | {steps} | {r['nfe']} | {r['agreement']:.1%} | "
              f"{r['digits_fd']:.2f} | {r['seconds']:.1f} |")
    print(f"\ntraining: {rows[0]['train_steps']} steps per objective on {args.device}; guidance {rows[0]['cfg_scale']}")


if __name__ == "__main__":
    main()
