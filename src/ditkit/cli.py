"""The ``ditkit`` command: train, sample, eval, extract, export, bench.

Errors a user can fix (bad config, missing file, wrong checkpoint) print one line and exit 2;
anything else is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a packaged config: digits, imagenet256, imagenet512, fields64, cosmo128")
    p.add_argument("--config", help="a YAML config file (applied after the preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--objective", choices=["ddpm", "flow"],
                   help="shortcut for --set objective.name=...; also picks that objective's default sampler "
                        "(ddpm: ddpm 250 steps; flow: heun 25 steps) unless --set sample.sampler=... is given")
    p.add_argument("--model", help="shortcut for --set model.name=... (e.g. DiT-B/2)")
    p.add_argument("--steps", type=int, help="shortcut for --set train.steps=...")


def _resolve_config(args):
    from ditkit.config import load_config

    shortcuts = []
    if args.objective:  # the objective's default sampler, unless the user names one
        sampler, steps = {"ddpm": ("ddpm", 250), "flow": ("heun", 25)}[args.objective]
        for key, value in (("sample.sampler", sampler), ("sample.steps", steps)):
            if not any(o.startswith(f"{key}=") for o in args.overrides):
                shortcuts.append(f"{key}={value}")
    for flag, key in (("objective", "objective.name"), ("model", "model.name"), ("steps", "train.steps")):
        value = getattr(args, flag, None)
        if value is not None:
            shortcuts.append(f"{key}={value}")
    overrides = shortcuts + list(args.overrides)  # the user's --set come last and win
    if args.preset is None and args.config is None:
        raise SystemExit("ditkit: give --preset NAME or --config FILE (try --preset digits)")
    return load_config(args.preset, args.config, overrides)


def cmd_train(args) -> None:
    from ditkit.train.trainer import train

    cfg = _resolve_config(args)
    result = train(cfg, args.run_dir, resume=args.resume, device=args.device, init_from=args.init_from)
    print(f"trained to step {result['step']}; checkpoints in {Path(args.run_dir) / 'checkpoints'}")


def cmd_sample(args) -> None:
    from ditkit.checkpoints import load_run
    from ditkit.config import from_dict
    from ditkit.models.inference import compiled
    from ditkit.objectives import build_objective
    from ditkit.sampling import grid_labels, sample_to_npz
    from ditkit.train.distributed import barrier, cleanup, setup_distributed

    info = setup_distributed(args.device)
    model, cfg, stored = load_run(args.ckpt, use_ema=not args.no_ema, device=info.device)
    overrides = {k: v for k, v in {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale,
                                   "eta": args.eta, "guided_channels": args.guided_channels, "grid": args.grid,
                                   "sde_diffusion": args.sde_diffusion,
                                   "guidance_interval": args.guidance_interval, "precision": args.precision,
                                   "compile": args.compile}.items() if v is not None}
    cfg = from_dict({"sample": overrides}, cfg).validate()
    net, fp8 = _inference_network(model, cfg.sample.precision, args.fp8, info.device)
    if cfg.model.num_params or cfg.model.cond_channels:
        return _sample_fields(args, model, net, cfg, stored, info.device, fp8)
    objective = build_objective(cfg)
    if fp8:
        from ditkit.sampling import generate, sample_labels, sample_noise

        idx = range(8)  # a calibration run on 8 samples of their own (seed 12345), not the ones written
        noise = sample_noise(idx, (cfg.model.in_channels, *model.input_size), 12345).to(info.device)
        kwargs = {"y": sample_labels(idx, cfg.model.num_classes, "random", 12345).to(info.device)} if cfg.model.num_classes else {}
        _calibrate_fp8(model, lambda: generate(net, objective, noise, kwargs, cfg.sample, progress=False), cfg, len(idx))
    net = compiled(net, cfg.sample.compile)
    decode = _decoder(cfg, args.vae, info.device)
    labels = args.labels if args.labels in ("balanced", "random") else _class_ids(args.labels, cfg.model.num_classes)
    out = Path(args.out)
    path = sample_to_npz(net, objective, cfg, args.num_samples, out, args.batch_size, seed=args.seed, labels=labels,
                         decode=decode, rank=info.rank, world_size=info.world_size, device=info.device,
                         barrier=lambda: barrier(info),
                         source=f"{Path(args.ckpt).resolve()} ema={not args.no_ema}" + (" fp8" if fp8 else ""))
    if path is not None:
        import numpy as np

        data = np.load(path)
        images, y = data["arr_0"], data["arr_1"]
        if cfg.model.num_classes > 0:
            wanted = grid_labels(min(cfg.model.num_classes, 10), per_class=10)
            picks = [int(np.flatnonzero(y == c)[k]) for c, k in zip(wanted.tolist(), list(range(10)) * 10)
                     if (y == c).sum() > k]
            images = images[picks]
        from ditkit.utils.images import save_grid

        save_grid(images[:100], out / "grid.png", nrow=10, scale=max(1, 64 // images.shape[1]))
        print(f"{len(data['arr_0'])} samples ({cfg.sample.sampler}, {cfg.sample.steps} steps, "
              f"guidance {cfg.sample.cfg_scale}) -> {path}; grid -> {out / 'grid.png'}")
    cleanup(info)


def _sample_fields(args, model, net, cfg, stored: dict, device, fp8: bool) -> None:
    """A model conditioned on parameters and/or fields: one sample per condition of --cond, all in
    physical units (the run's normaliser is applied on the way in and undone on the way out)."""
    import numpy as np
    import torch

    from ditkit.eval.field_benchmark import field_generator, field_normalizer
    from ditkit.models.inference import compiled
    from ditkit.sampling import save_sample_grid
    from ditkit.utils.io import atomic_save_npz

    if args.cond is None:
        raise ValueError(f"{args.ckpt} is conditioned on parameters/fields: give --cond FILE.npz with 'params' "
                         "(N, P) and/or 'field' (N, C, H, W) in physical units")
    norm = field_normalizer(args.ckpt, stored)
    with np.load(args.cond) as cond:
        need = [k for k, on in (("params", cfg.model.num_params), ("field", cfg.model.cond_channels)) if on]
        missing = [k for k in need if k not in cond.files]
        if missing:
            raise ValueError(f"{args.cond} lacks {', '.join(missing)} (it has: {', '.join(cond.files)})")
        arrays = {k: torch.from_numpy(np.asarray(cond[k], dtype=np.float64)) for k in need}
    if fp8:  # calibrated on the first 8 conditions, with noise of its own (seed 12345)
        first = {k: v[:8] for k, v in arrays.items()}
        calibration = field_generator(net, cfg, norm, device, batch_size=8, seed=12345)
        _calibrate_fp8(model, lambda: calibration(first.get("params"), first.get("field")),
                       cfg, len(next(iter(first.values()))))
    generate_fields = field_generator(compiled(net, cfg.sample.compile), cfg, norm, device, batch_size=args.batch_size,
                                      seed=args.seed)
    x = generate_fields(arrays.get("params"), arrays.get("field")).float()
    out = Path(args.out)
    atomic_save_npz(out / "samples.npz", samples=x.numpy(), **{k: v.numpy() for k, v in arrays.items()})
    save_sample_grid(x[:64], cfg, out / "grid.png", nrow=8)
    print(f"{len(x)} fields in physical units ({cfg.sample.sampler}, {cfg.sample.steps} steps) -> {out / 'samples.npz'}")


def _inference_network(model, precision: str, fp8: bool, device):
    """``--precision`` and ``--fp8`` (block linears to FP8, ditkit.models.fp8): the network to sample
    with, and whether any layer became FP8."""
    from ditkit.models.fp8 import fp8_matmul_supported
    from ditkit.models.inference import for_inference

    if fp8 and device.type == "cuda" and not fp8_matmul_supported(device):
        print("fp8: warning: this GPU has no FP8 tensor cores (compute capability < 8.9); the FP8 products "
              "are emulated in float32, slower than without --fp8", file=sys.stderr)
    net = for_inference(model, precision, fp8=fp8)
    if fp8:
        print(f"fp8: {net.fp8_layers} block linears quantized to float8_e4m3fn (row-wise weight scales; fc1 per tensor, "
              "its GELU and fc2's input cast in its product)")
        if not net.fp8_layers:
            print("fp8: warning: no layer has sizes that are multiples of 16; sampling without FP8", file=sys.stderr)
    return net, net.fp8_layers > 0


def _calibrate_fp8(model, run, cfg, n: int) -> None:
    """Static FP8 activation scales from ``run()``, one run of the sampler on n samples."""
    from ditkit.models.fp8 import calibrate_fp8

    layers = calibrate_fp8(model, run)
    print(f"fp8: static activation scales of {layers} layers calibrated on {n} samples ({cfg.sample.sampler}, "
          f"{cfg.sample.steps} steps)")


def _class_ids(text: str, num_classes: int) -> list[int]:
    try:
        ids = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--labels must be balanced, random or comma-separated class ids, got {text!r}") from None
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise ValueError(f"label {bad[0]} is out of range: the model has {num_classes} classes (0..{num_classes - 1})")
    return ids


def _decoder(cfg, vae_path: str | None, device):
    """x -> (uint8 N×H×W×3, raw float array or None) for the data kind of the run."""
    from ditkit.utils.images import to_uint8

    if cfg.data.kind == "latents":
        if vae_path is None:
            raise SystemExit("ditkit: this model samples VAE latents; give --vae PATH (a local sd-vae-ft-ema/-mse folder)")
        from ditkit.models.vae import decode, load_vae

        vae = load_vae(vae_path, device=device)
        return lambda x: (to_uint8(decode(vae, x)), None)
    return lambda x: (to_uint8(x), x.float().cpu().numpy())


def cmd_eval(args) -> None:
    from ditkit.eval.evaluate import write_json

    if args.ref is None:
        from ditkit.eval.digits import evaluate_digits, format_digits, load_digit_samples

        result = evaluate_digits(*load_digit_samples(args.samples))
        print(format_digits(result))
    else:
        from ditkit.eval.evaluate import evaluate, format_table

        if args.inception is None:
            raise SystemExit("ditkit: image metrics need --inception PATH (pt_inception-2015-12-05-6726825d.pth, see README)")
        result = evaluate(args.samples, args.ref, args.inception, batch_size=args.batch_size, device=args.device,
                          resize=args.resize, progress=True)
        print(format_table(result))
    if args.json:
        write_json(result, args.json)


def cmd_extract(args) -> None:
    import torch

    from ditkit.data.latents import build_latent_cache

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    manifest = build_latent_cache(args.data, args.vae, args.out, image_size=args.image_size, labels_file=args.labels_file,
                                  num_classes=args.num_classes, vae_dtype=dtypes[args.vae_dtype], device=args.device,
                                  batch_size=args.batch_size, shard_size=args.shard_size, num_workers=args.workers,
                                  rank=args.rank, world_size=args.world_size, progress=True)
    print(f"{manifest['count']} images -> latents {manifest['latent_shape']} in {args.out}")


def cmd_export(args) -> None:
    from ditkit.checkpoints import load_for_sampling, save_weights
    from ditkit.interop import export_diffusers

    model, cfg = load_for_sampling(args.ckpt, use_ema=not args.no_ema)
    if args.to == "diffusers":
        labels = json.loads(Path(args.id2label).read_text()) if args.id2label else None
        export_diffusers(model, args.out, vae=args.vae, id2label=labels)
    else:
        save_weights(model.state_dict(), model, cfg, args.out)
    print(f"exported {args.ckpt} -> {args.out} ({args.to})")


def cmd_fields_benchmark(args) -> None:
    from ditkit.data.random_fields import write_benchmark

    paths = write_benchmark(args.out, args.n, size=args.size, seed=args.seed)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def cmd_eval_fields(args) -> None:
    from ditkit.eval.evaluate import write_json
    from ditkit.eval.field_benchmark import evaluate_field_checkpoint

    result = evaluate_field_checkpoint(args.ckpt, args.data, args.out, points=args.points, samples=args.samples,
                                       device=args.device)
    for k, v in result.items():
        print(f"{k:<28} {v:.4f}")
    write_json(result, Path(args.out) / "fields_eval.json")


def build_parser() -> argparse.ArgumentParser:
    from ditkit.config import COMPILE_MODES, PRECISIONS
    from ditkit.samplers.sde import DIFFUSION_FORMS

    parser = argparse.ArgumentParser(prog="ditkit", description="Diffusion Transformers: train, sample, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a DiT (one process, or many under torchrun)")
    _add_config_args(p)
    p.add_argument("--run-dir", required=True, help="folder for checkpoints, config.yaml, metrics and samples")
    p.add_argument("--resume", action="store_true", help="continue from run-dir/checkpoints/last.pt")
    p.add_argument("--init-from", help="start from these weights (ditkit, official .pt, safetensors)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: this rank's GPU if any)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample into an ADM-style .npz and a PNG grid")
    p.add_argument("--ckpt", required=True, help="ditkit checkpoint, official DiT .pt, safetensors or diffusers folder")
    p.add_argument("--out", required=True, help="output folder (samples.npz, grid.png, parts/)")
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun", "dopri5", "sde"])
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--eta", type=float, help="DDIM eta")
    p.add_argument("--grid", choices=["uniform", "shifted"], help="euler/heun/sde time grid (shifted: the objective's shift)")
    p.add_argument("--sde-diffusion", choices=DIFFUSION_FORMS,
                   help="diffusion coefficient of the sde sampler (SiT's forms)")
    p.add_argument("--guided-channels", type=int, help="guide only the first N channels (3: the official code)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("A", "B"), help="guide only for noise level in [A, B]")
    p.add_argument("--fp8", action="store_true", help="FP8 (e4m3) matrix products in the transformer blocks "
                   "(ditkit.models.fp8, and the MLP's GELU and fc2's input cast in fc1's product: ditkit.models.fp8_mlp; "
                   "fastest on Hopper/Ada GPUs, emulated elsewhere)")
    p.add_argument("--precision", choices=PRECISIONS, help="fp32 (default: the official numerics), amp-bf16 "
                   "(autocast; the fast path, with --fp8 and --compile cudagraphs) or bf16 (weights too: less memory, "
                   "more error, not faster)")
    p.add_argument("--compile", choices=COMPILE_MODES, help="torch.compile the network; cudagraphs: also replay each "
                   "call as a CUDA graph (GPU)")
    p.add_argument("--labels", default="balanced", help="balanced, random, or a comma-separated list of class ids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", help="local VAE (folder or file) to decode latents")
    p.add_argument("--cond", help="models on params/fields: .npz with 'params' (N, P) and/or 'field' (N, C, H, W), "
                                  "physical units; one sample per row")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="score samples: digits metrics, or FID/sFID/IS/precision/recall against --ref")
    p.add_argument("--samples", required=True, help="a samples .npz (ADM: arr_0 uint8 N×H×W×3; digits: samples, labels)")
    p.add_argument("--ref", help="reference batch: ADM .npz (its mu/sigma are used), another .npz or a folder of images")
    p.add_argument("--inception", help="local InceptionV3 weights (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resize", choices=["pytorch-fid", "tf1"], default="pytorch-fid")
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("extract", help="encode an image dataset once into a sharded VAE latent cache")
    p.add_argument("--data", required=True, help="ImageFolder root, or the base folder of --labels-file")
    p.add_argument("--labels-file", help="train_labels.txt: one 'image_path class_id' per line")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--vae", required=True, help="local sd-vae-ft-ema / -mse folder or file")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--vae-dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--device")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("export", help="write a checkpoint as a diffusers folder or a safetensors file")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--to", choices=["diffusers", "safetensors"], default="diffusers")
    p.add_argument("--out", required=True)
    p.add_argument("--vae", help="with --to diffusers: a local VAE folder, to write a whole DiTPipeline")
    p.add_argument("--id2label", help="JSON file {class id: name} for the pipeline")
    p.add_argument("--no-ema", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("fields-benchmark", help="write the random-field benchmark (known answer) to disk")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_fields_benchmark)

    p = sub.add_parser("eval-fields", help="score a field model on the random-field benchmark, with plots")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True, help="the benchmark folder (benchmark.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--points", type=int, default=8)
    p.add_argument("--samples", type=int, default=64, help="generated fields per parameter point (the noise "
                   "floor of the spectrum errors falls as 1/sqrt(samples); the JSON reports it as *_floor)")
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.set_defaults(func=cmd_eval_fields)
    return parser


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> None:
    from ditkit.config import ConfigError
    from ditkit.train.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"ditkit: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as err:  # bad user input surfaced at a boundary (labels, sizes, names)
        print(f"ditkit: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
