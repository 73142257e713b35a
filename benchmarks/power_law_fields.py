"""Power-law random fields on a grid of 1, 2 or 3 axes (`ditkit.data.power_law`, a known answer): a DiT conditioned
on the variance and slope (σ², n_s) of the spectrum learns a Gaussian and a log-normal channel, and its samples are
scored by the error of their radially binned power spectra against the exact ones, averaged over k-bins and
parameter points, beside the error of as many true draws (the sampling-noise floor).

    PYTHONPATH=src python benchmarks/power_law_fields.py --out runs/volumes data --axes 3 --size 32 --n 20000
    PYTHONPATH=src python benchmarks/power_law_fields.py --out runs/volumes --device cuda train --minutes 20
    PYTHONPATH=src python benchmarks/power_law_fields.py --out runs/volumes score --points 8 --samples 32

1D spectra: `data --axes 1 --size 1024` and `score --samples 1024` (a 1D bin holds two modes, so its floor needs
more samples).  Mixed lengths in one training set: `data --lengths 64,128,256,512,1024` writes a folder of sequences
(`data.kind=sequences` with their parameters), and `score` reports each length.  `train --minutes` is the
budget of the whole run, summed over resumes: with `--call-minutes` a long budget runs as several calls of
the same command, each resuming where the last stopped.  Everything runs through the public API: `ditkit.load_config`, `ditkit.train` and the checkpoint's
normaliser; `train --set KEY=VALUE` passes any other config key."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import ditkit
from ditkit.checkpoints import load_run
from ditkit.data.power_law import PowerLawFields, write_power_law, write_power_law_sequences
from ditkit.eval.field_benchmark import field_generator, field_normalizer
from ditkit.eval.fields import plot_power_spectra, score_power_law, score_power_law_lengths

# model size by grid: (input tokens are size^axes / patch^axes)
PATCH = {1: 8, 2: 2, 3: 4}


def bench_of(out: Path) -> PowerLawFields:
    return PowerLawFields.from_dict(json.loads((out / "data" / "benchmark.json").read_text())["benchmark"])


def mixed_lengths(out: Path) -> list[int] | None:
    return json.loads((out / "data" / "benchmark.json").read_text()).get("lengths")


def config(out: Path, steps: int, minutes: float, extra: list[str], call_minutes: float = 0.0):
    bench = bench_of(out)
    data = out / "data"
    patch = PATCH[bench.axes]
    lengths = mixed_lengths(out)
    if lengths:  # a folder of sequences of mixed lengths with a params table
        return ditkit.load_config("fields64", [
            "data.kind=sequences", f"data.path={data / 'seqs'}", f"data.params_file={data / 'params.csv'}",
            "data.field_file=null", "data.log_transform=[]", "data.flip=false", "data.length_buckets=8",
            "model.name=custom", "model.hidden_size=384", "model.depth=12", "model.num_heads=6",
            f"model.patch_size={patch}", "model.cond_channels=0",
            f"train.steps={steps}", f"train.budget_minutes={minutes}", f"train.max_minutes={call_minutes}",
            f"train.ckpt_every={steps}", *extra])
    return ditkit.load_config("fields64", [
        f"data.path={data / 'x.npy'}", f"data.params_file={data / 'params.csv'}", "data.field_file=null",
        f"data.axes={bench.axes}", f"data.flip={'true' if bench.axes > 1 else 'false'}", "data.log_transform=[1]",
        "model.name=custom", "model.hidden_size=384", "model.depth=12", "model.num_heads=6",
        f"model.input_size={list(bench.shape)}", f"model.patch_size={patch}", "model.cond_channels=0",
        f"train.steps={steps}", f"train.budget_minutes={minutes}", f"train.max_minutes={call_minutes}",
        f"train.ckpt_every={steps}", f"train.sample_every={steps}", *extra])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/power_law")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write the fields, their parameters and the generator's settings")
    d.add_argument("--axes", type=int, default=3, choices=[1, 2, 3])
    d.add_argument("--size", type=int, default=32)
    d.add_argument("--n", type=int, default=20000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--lengths", help="1D fields of these mixed lengths, e.g. 64,128,256,512,1024 (a sequence folder)")
    t = sub.add_parser("train", help="train on the written data")
    t.add_argument("--steps", type=int, default=100000)
    t.add_argument("--minutes", type=float, default=20.0,
                   help="the training budget, summed over resumes (train.budget_minutes)")
    t.add_argument("--call-minutes", type=float, default=0.0,
                   help="stop this call after this wall time (train.max_minutes); the same command again resumes")
    t.add_argument("--set", nargs="*", default=[], help="further config overrides KEY=VALUE")
    s = sub.add_parser("score", help="sample the checkpoint at fresh parameter points and score the spectra")
    s.add_argument("--points", type=int, default=8)
    s.add_argument("--samples", type=int, default=32)
    s.add_argument("--batch-size", type=int, default=256, help="samples per forward pass")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.cmd == "data" and args.lengths:
        lengths = tuple(int(v) for v in args.lengths.split(","))
        paths = write_power_law_sequences(out / "data", args.n, lengths=lengths, seed=args.seed)
        print(f"{args.n} 1D fields of lengths {args.lengths} -> {paths['seqs']}")
    elif args.cmd == "data":
        paths = write_power_law(out / "data", args.n, size=args.size, axes=args.axes, seed=args.seed)
        print(f"{args.n} fields of {args.size}^{args.axes} -> {paths['x']}")
    elif args.cmd == "train":
        cfg = config(out, args.steps, args.minutes, args.set, args.call_minutes)
        ditkit.train(cfg, out / "run", device=args.device, resume=True)  # a new run, or on with the budget left
    else:
        print(score(out, args.device, args.points, args.samples, args.batch_size))


def score(out: Path, device: str, points: int, samples: int, batch_size: int = 256) -> str:
    """Sample the run's last checkpoint, score it, write ``score.json`` and ``spectra.png``; returns the table."""
    bench = bench_of(out)
    ckpt = out / "run" / "checkpoints" / "last.pt"
    if mixed_lengths(out):
        return score_lengths(out, ckpt, mixed_lengths(out), device, points, samples, batch_size)
    model, cfg, stored = load_run(ckpt, device=device)
    generate = field_generator(model, cfg, field_normalizer(ckpt, stored), device, batch_size=batch_size)
    result = score_power_law(lambda p: generate(p, None).cpu(), bench, points=points, samples=samples)
    rows = ["| channel | spectrum error | floor (true draws) |", "| --- | --- | --- |"]
    for name in bench.channel_names:
        rows.append(f"| {name} | {result[f'{name}_spectrum_err']:.4f} | {result[f'{name}_spectrum_err_floor']:.4f} |")
    table = "\n".join(rows)
    summary = {k: v for k, v in result.items() if isinstance(v, float)} | {
        "benchmark": bench.to_dict(), "points": points, "samples": samples, "step": stored.get("step"),
        "checkpoint": str(ckpt)}
    for folder in [out, *([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])]:
        (folder / "score.json").write_text(json.dumps(summary, indent=2))
        plot_power_spectra(result["k"], {"generated, Gaussian": result["spectrum"][0, 0],
                                         "exact, Gaussian": result["spectrum_exact"][0, 0],
                                         "generated, log-normal": result["spectrum"][0, 1],
                                         "exact, log-normal": result["spectrum_exact"][0, 1]},
                           folder / "spectra.png", title=f"{bench.axes}D power-law fields, first parameter point")
    return table


def score_lengths(out: Path, ckpt: Path, lengths: list[int], device: str, points: int, samples: int,
                  batch_size: int = 256) -> str:
    """The mixed-length run: one score per length (``score_power_law_lengths``), into ``score.json``."""
    from ditkit.generation import sample_sequences

    def generate(sizes: list[int], params: torch.Tensor) -> list[torch.Tensor]:
        seqs = sample_sequences(ckpt, sizes, params=params.numpy(), device=device, batch_size=batch_size)
        return [torch.from_numpy(s) for s in seqs]

    result = score_power_law_lengths(generate, lengths, points=points, samples=samples)
    rows = ["| length | Gaussian spectrum error | floor | log-normal spectrum error | floor |", "| --- | --- | --- | --- | --- |"]
    for L in [*lengths, "mean"]:
        r = result[L]
        rows.append(f"| {L} | {r['gaussian_spectrum_err']:.4f} | {r['gaussian_spectrum_err_floor']:.4f} | "
                    f"{r['lognormal_spectrum_err']:.4f} | {r['lognormal_spectrum_err_floor']:.4f} |")
    summary = {str(k): v for k, v in result.items()} | {"points": points, "samples": samples, "checkpoint": str(ckpt)}
    for folder in [out, *([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])]:
        (folder / "score.json").write_text(json.dumps(summary, indent=2))
    return "\n".join(rows)


if __name__ == "__main__":
    main()
