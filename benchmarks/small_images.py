"""Which objective and sampler train a small image dataset best from scratch: the `images32` preset on
the shapes dataset (`ditkit.data.shapes`, 32×32, six classes), DDPM against flow matching with the
same model, data and number of steps, each scored with every sampler by `ditkit.eval.shapes`
(classifier agreement and Fréchet distance in a CNN trained on real draws).  Prints a Markdown table,
writes JSON and one PNG grid per row under --out.

    PYTHONPATH=src python benchmarks/small_images.py --out runs/small_images [--steps 6000] [--device cuda]

Everything runs through the public API: `ditkit.load_config`, `ditkit.train`, `ditkit.checkpoints.load_run`,
`ditkit.sample`.  A run cut short (a job's time limit) goes on from its last checkpoint when the same command runs
again; `training s` is the training time summed over such calls."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import ditkit
from ditkit.checkpoints import load_run
from ditkit.data.shapes import CLASSES, write_shapes
from ditkit.eval.shapes import evaluate_shapes

# (objective, sampler, sampling steps, guidance scale); DDPM keeps the official learned variance.
RUNS = [("ddpm", "ddpm", 250, 1.5), ("ddpm", "ddim", 50, 1.5), ("ddpm", "ddim", 50, 1.0),
        ("flow", "heun", 25, 1.5), ("flow", "euler", 50, 1.5), ("flow", "heun", 25, 1.0)]


def grid(images: np.ndarray, labels: np.ndarray, per_class: int = 10) -> Image.Image:
    rows = [np.concatenate(list(images[labels == k][:per_class]), axis=1) for k in range(len(CLASSES))]
    return Image.fromarray(np.concatenate(rows, axis=0))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/small_images")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=6000, help="training steps per objective")
    ap.add_argument("--per-class", type=int, default=1000, help="training images per class")
    ap.add_argument("--num-samples", type=int, default=600, help="samples per row, balanced over the classes")
    ap.add_argument("--speed", default="reference", help="train.speed (the comparison does not depend on it)")
    ap.add_argument("--objectives", nargs="+", default=["ddpm", "flow"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further overrides for every run")
    args = ap.parse_args(argv)
    out = Path(args.out)
    data = out / "shapes"
    if not data.is_dir():
        write_shapes(data, args.per_class)
    rows = []
    for objective in args.objectives:
        extra = ["model.learn_sigma=true", "sample.sampler=ddpm", "sample.steps=250"] if objective == "ddpm" else []
        cfg = ditkit.load_config("images32", [f"data.path={data}", f"objective.name={objective}", *extra,
                                              f"train.steps={args.steps}", f"train.speed={args.speed}",
                                              f"train.sample_every={args.steps}",
                                              f"train.ckpt_every={min(args.steps, 2000)}", *args.set])
        run = out / objective
        ditkit.train(cfg, run, device=args.device, resume=True)  # a cut run goes on; a finished one trains nothing
        model, cfg, stored = load_run(run / "checkpoints" / "last.pt", device=args.device)  # the file, read once
        train_s = stored["extra"].get("train_seconds", float("nan"))
        labels = np.arange(args.num_samples) % len(CLASSES)
        for obj, sampler, steps, scale in RUNS:
            if obj != objective:
                continue
            t0 = time.perf_counter()
            s = ditkit.sample(model, cfg, labels=labels.tolist(), sampler=sampler, steps=steps, cfg_scale=scale,
                              seed=0, batch_size=300, progress=False)
            seconds = time.perf_counter() - t0
            metrics = evaluate_shapes(s.images, labels)
            name = f"{objective}_{sampler}{steps}_cfg{scale:g}"
            grid(s.images, labels).save(out / f"{name}.png")
            rows.append({"objective": objective, "sampler": sampler, "steps": steps, "cfg_scale": scale, "nfe": s.nfe,
                         "train_steps": args.steps, "train_seconds": train_s, "sample_seconds": seconds, **metrics})
            print(f"{name}: agreement {metrics['classifier_agreement']:.3f} FD {metrics['shapes_fd']:.3f}", flush=True)
    (out / "small_images.json").write_text(json.dumps(rows, indent=2))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "small_images.json").write_text(json.dumps(rows, indent=2))
    print(f"\nshapes, {args.per_class} images per class; {args.steps} training steps per objective on {args.device}; "
          f"{args.num_samples} samples per row; real draws: classifier {rows[0]['real_accuracy']:.1%}, "
          f"real-vs-real FD {rows[0]['real_vs_real_fd']:.3f}")
    print("| objective | sampler | steps | NFE | guidance | agreement | shapes FD | training s | sampling s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['objective']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['cfg_scale']:g} | "
              f"{r['classifier_agreement']:.1%} | {r['shapes_fd']:.3f} | {r['train_seconds']:.0f} | {r['sample_seconds']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
