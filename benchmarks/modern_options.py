"""The post-2023 options (LightningDiT's block, logit-normal times, the direction loss, AdamW beta2 0.95)
added one at a time to the digits demo trained with flow matching: the same steps, data, seed and
budget for each config, scored with classifier agreement and digits FD.  Prints a Markdown table and
writes JSON.

    PYTHONPATH=src python benchmarks/modern_options.py --out runs/modern --steps 400 [--seeds 0,1] [--configs baseline,full]

Time to quality on one GPU: `--data shapes --minutes 4 --device cuda --speed fast` gives every config the same
wall-clock budget (`train.budget_minutes`) on the shapes dataset with the `images32` preset, scored by
`ditkit.eval.shapes` (600 samples, the preset's Heun-25 at guidance 1.5).

Each config is the `digits` preset with `objective.name=flow` and the overrides of CONFIGS, trained
with `ditkit.train`; its EMA weights then draw 1,000 digits (100 per class, Euler 50 steps, guidance
2.0: the demo's number of samples, network evaluations and guidance) through `ditkit.sample`, scored
with `ditkit.eval.digits` as `ditkit eval` scores the demo.  A run folder that holds a finished run
is scored again, not retrained."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import ditkit
from ditkit.checkpoints import load_run
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


def losses(run: Path) -> tuple[int, float, float]:
    """The last step trained, and the mean logged training loss over the last 100 steps before half of it and
    before it."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("loss") is not None]
    steps = rows[-1]["step"]

    def window(end: int) -> float:
        vals = [r["loss"] for r in rows if end - 100 < r["step"] <= end] or [r["loss"] for r in rows if r["step"] <= end]
        return sum(vals) / len(vals) if vals else float("nan")

    return steps, window(steps // 2), window(steps)


def merged(out: Path, rows: list[dict]) -> list[dict]:
    """The rows of earlier calls into the same --out, with this call's rows in place of theirs for the same
    (config, seed): configs run as several calls make one file."""
    path = out / "modern_options.json"
    earlier = json.loads(path.read_text())["rows"] if path.exists() else []
    mine = {(r["config"], r["seed"]) for r in rows}
    return [r for r in earlier if (r["config"], r["seed"]) not in mine] + rows


def score(model: torch.nn.Module, cfg: ditkit.Config, data: str, num_samples: int, seed: int) -> dict:
    """Samples of a run's EMA weights, scored: the digits as ``ditkit eval`` scores the demo, the shapes by
    ``ditkit.eval.shapes`` with labels balanced over the classes."""
    t0 = time.perf_counter()
    if data == "digits":
        out = ditkit.sample(model, cfg, num_samples=num_samples, seed=seed, progress=False)
        seconds = time.perf_counter() - t0
        metrics = evaluate_digits(to_digit_pixels(out.x.numpy()), out.labels.numpy())
        fd = {"fd": metrics["digits_fd"]}
    else:
        from ditkit.data.shapes import CLASSES
        from ditkit.eval.shapes import evaluate_shapes

        labels = np.arange(num_samples) % len(CLASSES)
        out = ditkit.sample(model, cfg, labels=labels.tolist(), seed=seed, batch_size=300, progress=False)
        seconds = time.perf_counter() - t0
        metrics = evaluate_shapes(out.images, labels)
        fd = {"fd": metrics["shapes_fd"]}
    return {"agreement": metrics["classifier_agreement"], **fd, "real_vs_real_fd": metrics["real_vs_real_fd"],
            "nfe": out.nfe, "sample_seconds": seconds}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/modern")
    ap.add_argument("--steps", type=int, default=400, help="training steps of every config")
    ap.add_argument("--seeds", default="0", help="comma-separated train.seed values")
    ap.add_argument("--configs", default=",".join(c[0] for c in CONFIGS), help="comma-separated config names")
    ap.add_argument("--num-samples", type=int, default=None, help="samples scored per config (digits 1,000, shapes 600)")
    ap.add_argument("--data", choices=["digits", "shapes"], default="digits",
                    help="the digits demo, or the images32 preset on the shapes dataset")
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="the same training-time budget for every config (train.budget_minutes; --steps caps it)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    ap.add_argument("--speed", default="reference", help="train.speed of every config")
    ap.add_argument("--per-class", type=int, default=1000, help="shapes: training images per class")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further overrides for every config")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    num_samples = args.num_samples or (1000 if args.data == "digits" else 600)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in {c[0] for c in CONFIGS}]
    if unknown:
        ap.error(f"unknown config {unknown[0]!r}; known: {', '.join(c[0] for c in CONFIGS)}")
    out = Path(args.out)
    if args.data == "shapes" and not (out / "shapes").is_dir():
        from ditkit.data.shapes import write_shapes

        write_shapes(out / "shapes", args.per_class)
    preset, base = ("digits", BASE) if args.data == "digits" else ("images32", [f"data.path={out / 'shapes'}"])
    budget = [f"train.budget_minutes={args.minutes}"] if args.minutes else []
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, adds, extra in (c for c in CONFIGS if c[0] in names):
            overrides = base + extra + [f"train.steps={args.steps}", f"train.seed={seed}", f"train.speed={args.speed}",
                                        f"train.ckpt_every={args.steps}", f"train.sample_every={args.steps}",
                                        *budget, *args.set]
            try:
                cfg = ditkit.load_config(preset, overrides)
            except ConfigError as err:  # e.g. the direction loss on one-channel digits
                print(f"{name:13s} refused at load: {err}", flush=True)
                continue
            run = out / f"{name}-seed{seed}"
            ditkit.train(cfg, run, device=device, resume=True)  # a finished run (or budget) trains nothing more
            model, run_cfg, stored = load_run(run / "checkpoints" / "last.pt", device=device)  # the file, read once
            train_s = stored["extra"].get("train_seconds", float("nan"))
            steps, half_loss, loss = losses(run)
            r = score(model, run_cfg, args.data, num_samples, seed)
            rows.append({"config": name, "adds": adds, "overrides": overrides, "seed": seed, "steps": steps,
                         "train_seconds": train_s, "loss_half": half_loss, "loss": loss, **r})
            print(f"{name:13s} seed {seed} loss {loss:.4f} agreement {r['agreement']:.3f} FD {r['fd']:.3f} "
                  f"(train {train_s:.0f}s, {steps} steps; sample {r['sample_seconds']:.0f}s)", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / "modern_options.json").write_text(json.dumps(
                {"torch": torch.__version__, "data": args.data, "device": device, "steps": args.steps,
                 "minutes": args.minutes, "num_samples": num_samples, "rows": merged(out, rows)}, indent=2))
            if os.environ.get("OUT"):
                Path(os.environ["OUT"], f"modern_options_{args.data}.json").write_text(
                    (out / "modern_options.json").read_text())
    print(f"\n| config | adds | seed | steps | loss at half | loss at end | agreement | {args.data} FD | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['config']} | {r['adds']} | {r['seed']} | {r['steps']} | {r['loss_half']:.4f} | {r['loss']:.4f} | "
              f"{r['agreement']:.1%} | {r['fd']:.2f} | {r['train_seconds']:.0f} |")
    limit = f"{args.minutes:g} training minutes (at most {args.steps} steps)" if args.minutes else f"{args.steps} steps"
    print(f"\n{limit} per config on {device}, {num_samples} samples ({cfg.sample.sampler} {cfg.sample.steps} steps, "
          f"guidance {cfg.sample.cfg_scale}); real vs real FD {rows[0]['real_vs_real_fd']:.2f}; torch {torch.__version__}")
    return rows


if __name__ == "__main__":
    main()
