"""The post-2023 options (LightningDiT's block, logit-normal times, the direction loss, AdamW beta2 0.95)
added one at a time to the digits demo trained with flow matching: the same steps, data, seed and
budget for each config, scored with classifier agreement and digits FD.  Prints a Markdown table and
writes JSON.

    PYTHONPATH=src python benchmarks/modern_options.py --out runs/modern --steps 400 [--seeds 0,1] [--configs baseline,full]

Each config is the `digits` preset with `objective.name=flow` and the overrides of CONFIGS, trained
with `ditkit.train`; its EMA weights then draw 1,000 digits (100 per class, Euler 50 steps, guidance
2.0: the demo's number of samples, network evaluations and guidance) through `ditkit.sample`, scored
with `ditkit.eval.digits` as `ditkit eval` scores the demo.  A run folder that holds a finished run
is scored again, not retrained."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import ditkit
from ditkit.config import ConfigError
from ditkit.eval.digits import evaluate_digits, to_digit_pixels

BASE = ["objective.name=flow", "sample.sampler=euler", "sample.steps=50"]
ARCH = ["model.pos_embed=rope", "model.norm=rmsnorm", "model.mlp=swiglu"]
LOGIT_NORMAL = ["objective.time_sampling=logit_normal"]
COS = ["objective.cos_weight=1"]
BETA2 = ["train.adam_betas=[0.9,0.95]"]

# (name, what it adds, overrides): each config keeps every option of the one above it.
CONFIGS = [
    ("baseline", "the 2023 block (sin-cos, LayerNorm, GELU), uniform t", []),
    ("arch", "+ RoPE, RMSNorm, SwiGLU", ARCH),
    ("logit_normal", "+ logit-normal t", ARCH + LOGIT_NORMAL),
    ("cos", "+ direction loss (w 1)", ARCH + LOGIT_NORMAL + COS),
    ("full", "+ AdamW beta2 0.95", ARCH + LOGIT_NORMAL + COS + BETA2),
]


def losses(run: Path, steps: int) -> tuple[float, float]:
    """Mean logged training loss over the last 100 steps before half the steps and before the end."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]

    def window(end: int) -> float:
        vals = [r["loss"] for r in rows if end - 100 < r["step"] <= end]
        return sum(vals) / len(vals)

    return window(steps // 2), window(steps)


def score(ckpt: Path, num_samples: int, seed: int) -> dict:
    model, cfg = ditkit.load_model(ckpt, device="cpu")
    t0 = time.perf_counter()
    out = ditkit.sample(model, cfg, num_samples=num_samples, seed=seed, progress=False)
    seconds = time.perf_counter() - t0
    metrics = evaluate_digits(to_digit_pixels(out.x.numpy()), out.labels.numpy())
    return {"agreement": metrics["classifier_agreement"], "digits_fd": metrics["digits_fd"],
            "real_vs_real_fd": metrics["real_vs_real_fd"], "nfe": out.nfe, "sample_seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/modern")
    ap.add_argument("--steps", type=int, default=400, help="training steps of every config")
    ap.add_argument("--seeds", default="0", help="comma-separated train.seed values")
    ap.add_argument("--configs", default=",".join(c[0] for c in CONFIGS), help="comma-separated config names")
    ap.add_argument("--num-samples", type=int, default=1000)
    args = ap.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in {c[0] for c in CONFIGS}]
    if unknown:
        ap.error(f"unknown config {unknown[0]!r}; known: {', '.join(c[0] for c in CONFIGS)}")
    out = Path(args.out)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, adds, extra in (c for c in CONFIGS if c[0] in names):
            overrides = BASE + extra + [f"train.steps={args.steps}", f"train.seed={seed}"]
            try:
                cfg = ditkit.load_config("digits", overrides)
            except ConfigError as err:  # e.g. the direction loss on one-channel digits
                print(f"{name:13s} refused at load: {err}", flush=True)
                continue
            run = out / f"{name}-seed{seed}"
            t0 = time.perf_counter()
            if not (run / "checkpoints" / "last.pt").exists():
                ditkit.train(cfg, run)
            train_s = time.perf_counter() - t0
            half_loss, loss = losses(run, args.steps)
            r = score(run / "checkpoints" / "last.pt", args.num_samples, seed)
            rows.append({"config": name, "adds": adds, "overrides": overrides, "seed": seed, "steps": args.steps,
                         "train_seconds": train_s, "loss_half": half_loss, "loss": loss, **r})
            print(f"{name:13s} seed {seed} loss {loss:.4f} agreement {r['agreement']:.3f} FD {r['digits_fd']:.3f} "
                  f"(train {train_s:.0f}s, sample {r['sample_seconds']:.0f}s)", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / "modern_options.json").write_text(json.dumps(
                {"torch": torch.__version__, "steps": args.steps, "num_samples": args.num_samples, "rows": rows},
                indent=2))
    half = args.steps // 2
    print(f"\n| config | adds | seed | loss at {half} | loss at {args.steps} | agreement | digits FD | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['config']} | {r['adds']} | {r['seed']} | {r['loss_half']:.4f} | {r['loss']:.4f} | "
              f"{r['agreement']:.1%} | {r['digits_fd']:.2f} | {r['train_seconds']:.0f} |")
    print(f"\n{args.steps} training steps per config, {args.num_samples} samples (Euler 50, guidance "
          f"{cfg.sample.cfg_scale}); real vs real digits FD {rows[0]['real_vs_real_fd']:.2f}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
