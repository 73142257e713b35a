"""Does a video DiT follow a class and a velocity?  Clips of 8 frames of 16×16, one handwritten digit moving in a
straight line at a whole-pixel velocity (v_y, v_x) ∈ {−1, 0, 1}² (`ditkit.data.moving_digits`), generated from the
digit's class (one-hot) and its velocity, 12 parameters (`data.params_file`, `model.num_params`).  The answer is
known: `ditkit.eval.moving_digits` finds the digit's 8×8 window in every frame and reads it with the digits
classifier, and fits a line to the frames' centres of mass.  A clip is right when every frame is read as the asked
class and the fitted velocity is within 0.5 px/frame of the asked one on both axes.  Yardsticks printed beside the
model: real clips of held-out digits under the same conditions score 0.99; clips against shuffled conditions
(chance) 0.01.

Three steps, each a subcommand, all through the public API (`ditkit.load_config`, `ditkit.train`,
`ditkit.checkpoints.load_run`, `ditkit.sample`):

    PYTHONPATH=src python benchmarks/moving_digits.py --out runs/moving_digits data [--num 30000]
    PYTHONPATH=src python benchmarks/moving_digits.py --out runs/moving_digits --device cuda train [--steps 8000]
    PYTHONPATH=src python benchmarks/moving_digits.py --out runs/moving_digits score [--per-condition 4]
                                                              [--cfg-scales 1 2 3]

`data` writes --out/data (x.npy, params.csv, clips.json) from the training split of the digits; `train` trains flow
matching on it into --out/run (a custom DiT on (T, H, W) = (8, 16, 16) in 1×4×4 patches: 128 tokens); `score`
samples --per-condition clips of each (class, velocity) pair (the same list for every run) at each guidance scale,
undoes the run's normalisation, prints a Markdown table and writes --out/moving_digits.json, a PNG per scale
(--out/clips_cfg<scale>.png: each row one clip's frames, two velocities per class) and a GIF of ten of its clips
(--out/clips_cfg<scale>.gif, one per class)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import ditkit
from ditkit.checkpoints import load_run
from ditkit.data.fields import FieldNormalizer
from ditkit.data.moving_digits import (
    clip_params,
    compose_clips,
    max_speed,
    random_starts,
    write_moving_digits,
)
from ditkit.data.numbers import digit_pool
from ditkit.eval.moving_digits import score_clips
from ditkit.eval.numbers import split_digits, to_number_pixels
from ditkit.utils.benchmark_cli import run_step, three_step_parser

TEST_SEED = 1234  # the real clips of the yardstick and the shuffled conditions of chance


def asked_clips(per_condition: int, frames: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed list to score: ``per_condition`` clips of every (class, velocity), class-major: labels (N,),
    velocities (N, 2)."""
    s = max_speed(frames, size)
    velocities = [(vy, vx) for vy in range(-s, s + 1) for vx in range(-s, s + 1)]
    pairs = [(d, v) for d in range(10) for v in velocities for _ in range(per_condition)]
    return np.array([d for d, _ in pairs]), np.array([v for _, v in pairs])


def train_config(data: Path, steps: int, batch: int, hidden: int, depth: int, extra: list[str]) -> ditkit.Config:
    meta = json.loads((data / "clips.json").read_text())
    frames, size = meta["frames"], meta["size"]
    return ditkit.load_config("digits", [
        "data.kind=fields", f"data.path={data / 'x.npy'}", f"data.params_file={data / 'params.csv'}",
        "data.flip=false",  # a mirrored clip would move against its v_x
        "model.name=custom", "model.num_classes=0", f"model.input_size=[{frames}, {size}, {size}]",
        "model.patch_size=[1, 4, 4]", "model.learn_sigma=false",
        f"model.hidden_size={hidden}", f"model.depth={depth}", "model.num_heads=4",
        "objective.name=flow", "sample.sampler=heun", "sample.steps=25", "sample.cfg_scale=2.0",
        f"train.steps={steps}", f"train.global_batch_size={batch}", f"train.ckpt_every={steps}", "train.log_to=none",
        f"train.log_every={max(1, min(100, steps // 10))}", *extra])


def shown(per_condition: int, velocities: int) -> list[int]:
    """Two clips per class of ``asked_clips`` for the frame grid, at velocities that go round all of them."""
    return [(d * velocities + (2 * d + k) % velocities) * per_condition for d in range(10) for k in range(2)]


def frame_grid(pixels: np.ndarray, labels: np.ndarray, velocities: np.ndarray, rows: list[int],
               zoom: int = 3) -> Image.Image:
    """Clips (N, T, H, W) on 0..16: one row per clip in ``rows``, its frames left to right after its condition."""
    t, h, w = pixels.shape[1], pixels.shape[2] * zoom, pixels.shape[3] * zoom
    label_w, pad = 60, 2
    img = Image.new("L", (label_w + t * (w + pad) + pad, len(rows) * (h + pad) + pad), 64)
    draw = ImageDraw.Draw(img)
    for r, i in enumerate(rows):
        y0 = pad + r * (h + pad)
        draw.text((4, y0 + h // 2 - 5), f"{labels[i]} {velocities[i][0]:+d},{velocities[i][1]:+d}", fill=255)
        for f in range(t):
            tile = Image.fromarray(np.uint8(pixels[i, f] * 255 / 16)).resize((w, h), Image.NEAREST)
            img.paste(tile, (label_w + pad + f * (w + pad), y0))
    return img


def save_gif(pixels: np.ndarray, clips: list[int], path: Path, zoom: int = 4) -> None:
    """The ``clips`` of (N, T, H, W) on 0..16 side by side, one GIF frame per video frame."""
    strip = np.concatenate([np.pad(pixels[i], ((0, 0), (0, 0), (0, 1)), constant_values=4) for i in clips], axis=2)
    frames = [Image.fromarray(np.uint8(f * 255 / 16)).resize((f.shape[1] * zoom, f.shape[0] * zoom), Image.NEAREST)
              for f in strip]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=200, loop=0)


def score(args) -> list[dict]:
    out = Path(args.out)
    model, cfg, stored = load_run(out / "run" / "checkpoints" / "last.pt", device=args.device)
    norm = FieldNormalizer(stored["normalizer"])
    frames, size = cfg.model.input_size[0], cfg.model.input_size[-1]
    labels, velocities = asked_clips(args.per_condition, frames, size)
    rng = np.random.default_rng(TEST_SEED)
    real = compose_clips(labels, velocities, random_starts(velocities, rng, frames, size),
                         digit_pool(*split_digits("test")), rng, frames, size)
    shuffle = rng.permutation(len(labels))
    yard = {"real_right": score_clips(real, labels, velocities)["right"],
            "chance_right": score_clips(real, labels[shuffle], velocities[shuffle])["right"]}
    params = norm.normalize(torch.from_numpy(clip_params(labels, velocities)), "params").float()
    rows, picked = [], shown(args.per_condition, (2 * max_speed(frames, size) + 1) ** 2)
    folders = [out] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for scale in args.cfg_scales:
        t0 = time.perf_counter()
        s = ditkit.sample(model, cfg, params=params, cfg_scale=scale, steps=args.sample_steps, seed=0,
                          batch_size=500, progress=False)
        seconds = time.perf_counter() - t0
        pixels = to_number_pixels(norm.denormalize(s.x)[:, 0].numpy())  # (N, T, H, W) on 0..16
        for folder in folders:
            frame_grid(pixels, labels, velocities, picked).save(folder / f"clips_cfg{scale:g}.png")
            save_gif(pixels, picked[::2], folder / f"clips_cfg{scale:g}.gif")
        rows.append({"cfg_scale": scale, "sampler": cfg.sample.sampler, "steps": args.sample_steps or cfg.sample.steps,
                     "nfe": s.nfe, "sample_seconds": seconds, **score_clips(pixels, labels, velocities), **yard})
    for folder in folders:
        (folder / "moving_digits.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{len(labels)} clips of {frames}×{size}×{size}, {args.per_condition} per (class, velocity); "
          f"real held-out digits: {yard['real_right']:.1%}, chance: {yard['chance_right']:.1%}")
    print("| guidance | sampler | NFE | right | frames read | clips read | velocity error px/frame "
          "| within 0.5 | path residual px | sampling s |")
    print("| --- " * 10 + "|")
    for r in rows:
        print(f"| {r['cfg_scale']:g} | {r['sampler']} {r['steps']} | {r['nfe']} | {r['right']:.1%} | "
              f"{r['frame_agreement']:.1%} | {r['clip_agreement']:.1%} | {r['velocity_error']:.3f} | "
              f"{r['velocity_within']:.1%} | {r['path_residual']:.2f} | {r['sample_seconds']:.1f} |")
    return rows


def main(argv: list[str] | None = None):
    ap, _, _, s = three_step_parser(__doc__.splitlines()[0], "runs/moving_digits", "clips", steps=8000)
    s.add_argument("--per-condition", type=int, default=4, help="clips of each (class, velocity)")
    args = ap.parse_args(argv)

    def write_data(data: Path) -> str:
        meta = write_moving_digits(data, args.num, args.seed, *split_digits("train"))
        return f"{len(meta['clips'])} clips of {meta['frames']}×{meta['size']}×{meta['size']} in {data}"

    return run_step(args, write_data, train_config, score)


if __name__ == "__main__":
    main()
