"""Does a DiT follow a sequence of tokens?  Images of numbers of one to three handwritten digits side by side
(8×24, `ditkit.data.numbers`), each generated from the token sequence of its digits, e.g. [4, 7] as two one-hot rows
(`model.context_dim=10`, cross-attended with a key mask; the sequence's sin-cos positions carry the order).  The
answer is known: `ditkit.eval.numbers` reads every 8×8 slot with the digits classifier (99.3 % on held-out real
digits) and calls a slot under a mean pixel of 1 (of 16) blank.  A sample is right when every asked digit is read
as asked, in its place, and the unused slots are blank.  Yardsticks printed beside the model: real numbers composed
of held-out digits score 0.98; an image against an unrelated number (chance) 0.012.

Three steps, each a subcommand, all through the public API (`ditkit.load_config`, `ditkit.train`,
`ditkit.checkpoints.load_run`, `ditkit.sample`):

    PYTHONPATH=src python benchmarks/digit_numbers.py --out runs/digit_numbers data [--num 30000]
    PYTHONPATH=src python benchmarks/digit_numbers.py --out runs/digit_numbers --device cuda train [--steps 6000]
    PYTHONPATH=src python benchmarks/digit_numbers.py --out runs/digit_numbers score [--per-length 200] [--cfg-scales 1 2 3]

`data` writes --out/data (x.npy, context/, numbers.json) from the training split of the digits; `train` trains
flow matching on it into --out/run (a 4×12-token custom DiT, the digits preset's optimiser); `score` samples one
image per number of a fixed test list (--per-length numbers of each length, the same for every run) at each guidance
scale, undoes the run's normalisation, prints a Markdown table, writes --out/digit_numbers.json and one PNG grid per
scale (--out/samples_cfg<scale>.png: rows by length, each sample above its asked number)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import ditkit
from ditkit.checkpoints import load_run
from ditkit.data.fields import FieldNormalizer
from ditkit.data.numbers import (
    compose_numbers,
    digit_pool,
    number_tokens,
    write_numbers,
)
from ditkit.eval.numbers import score_numbers, split_digits, to_number_pixels
from ditkit.utils.benchmark_cli import run_step, three_step_parser

TEST_SEED = 1234  # the test list of numbers and the real digits drawn for its yardstick


def asked_numbers(per_length: int, max_digits: int) -> list[list[int]]:
    """The fixed list to score: ``per_length`` numbers of each length 1..max_digits, digits uniform."""
    rng = np.random.default_rng(TEST_SEED)
    return [rng.integers(0, 10, size=k).tolist() for k in range(1, max_digits + 1) for _ in range(per_length)]


def train_config(data: Path, steps: int, batch: int, hidden: int, depth: int, extra: list[str]) -> ditkit.Config:
    max_digits = json.loads((data / "numbers.json").read_text())["max_digits"]
    return ditkit.load_config("digits", [
        "data.kind=fields", f"data.path={data / 'x.npy'}", f"data.context_path={data / 'context'}",
        "model.num_classes=0", "model.context_dim=10", f"model.context_len={max_digits}", "model.learn_sigma=false",
        f"model.hidden_size={hidden}", f"model.depth={depth}", "model.num_heads=4",
        "objective.name=flow", "sample.sampler=heun", "sample.steps=25", "sample.cfg_scale=2.0",
        f"train.steps={steps}", f"train.global_batch_size={batch}", f"train.ckpt_every={steps}", "train.log_to=none",
        f"train.log_every={max(1, min(100, steps // 10))}", *extra])


def grid(pixels: np.ndarray, numbers: list[list[int]], per_row: int = 8, zoom: int = 4) -> Image.Image:
    """Samples (N, 8, W) on 0..16, ``per_row`` of each length, each above its asked number."""
    h, w = pixels.shape[1] * zoom, pixels.shape[2] * zoom
    lengths = sorted({len(n) for n in numbers})
    cell_h, pad = h + 14, 4
    img = Image.new("L", (per_row * (w + pad) + pad, len(lengths) * (cell_h + pad) + pad), 64)
    draw = ImageDraw.Draw(img)
    for r, k in enumerate(lengths):
        for c, i in enumerate([i for i, n in enumerate(numbers) if len(n) == k][:per_row]):
            tile = Image.fromarray(np.uint8(pixels[i] * 255 / 16)).resize((w, h), Image.NEAREST)
            x0, y0 = pad + c * (w + pad), pad + r * (cell_h + pad)
            img.paste(tile, (x0, y0))
            draw.text((x0 + 2, y0 + h + 1), "".join(map(str, numbers[i])), fill=255)
    return img


def score(args) -> list[dict]:
    out = Path(args.out)
    model, cfg, stored = load_run(out / "run" / "checkpoints" / "last.pt", device=args.device)
    norm = FieldNormalizer(stored["normalizer"])
    max_digits = cfg.model.input_size[1] // 8
    asked = asked_numbers(args.per_length, max_digits)
    real = compose_numbers(asked, digit_pool(*split_digits("test")), np.random.default_rng(TEST_SEED), max_digits)
    yard = {"real_exact": score_numbers(real, asked)["exact"],
            "chance_exact": float(sum(np.mean([len(n) == k for n in asked]) ** 2 * 10.0 ** -k
                                      for k in range(1, max_digits + 1)))}
    rows = []
    for scale in args.cfg_scales:
        t0 = time.perf_counter()
        s = ditkit.sample(model, cfg, context=[number_tokens(n) for n in asked], cfg_scale=scale,
                          steps=args.sample_steps, seed=0, batch_size=500, progress=False)
        seconds = time.perf_counter() - t0
        pixels = to_number_pixels(norm.denormalize(s.x)[:, 0].numpy())  # (N, 8, 8·max_digits) on 0..16
        for folder in [out] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
            grid(pixels, asked).save(folder / f"samples_cfg{scale:g}.png")
        rows.append({"cfg_scale": scale, "sampler": cfg.sample.sampler, "steps": args.sample_steps or cfg.sample.steps,
                     "nfe": s.nfe, "sample_seconds": seconds, **score_numbers(pixels, asked), **yard})
    (out / "digit_numbers.json").write_text(json.dumps(rows, indent=2))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "digit_numbers.json").write_text(json.dumps(rows, indent=2))
    lengths = sorted(rows[0]["exact_by_length"])
    print(f"\nnumbers of 1 to {max_digits} digits, {args.per_length} asked numbers per length; "
          f"real held-out digits: {yard['real_exact']:.1%}, chance: {yard['chance_exact']:.1%}")
    print("| guidance | sampler | NFE | right | " + " | ".join(f"{k} digit{'s' * (k > 1)}" for k in lengths)
          + " | digits read | blanks kept | sampling s |")
    print("| --- " * (7 + len(lengths)) + "|")
    for r in rows:
        blanks = "" if r["blank_accuracy"] is None else f"{r['blank_accuracy']:.1%}"
        print(f"| {r['cfg_scale']:g} | {r['sampler']} {r['steps']} | {r['nfe']} | {r['exact']:.1%} | "
              + " | ".join(f"{r['exact_by_length'][k]:.1%}" for k in lengths)
              + f" | {r['digit_accuracy']:.1%} | {blanks} | {r['sample_seconds']:.1f} |")
    return rows


def main(argv: list[str] | None = None):
    ap, d, _, s = three_step_parser(__doc__.splitlines()[0], "runs/digit_numbers", "numbers", steps=6000)
    d.add_argument("--max-digits", type=int, default=3)
    s.add_argument("--per-length", type=int, default=200, help="asked numbers of each length")
    args = ap.parse_args(argv)

    def write_data(data: Path) -> str:
        numbers = write_numbers(data, args.num, args.seed, args.max_digits, digits=split_digits("train"))
        return f"{len(numbers)} numbers of 1 to {args.max_digits} digits in {data}"

    return run_step(args, write_data, train_config, score)


if __name__ == "__main__":
    main()
