"""The ``ditkit`` command: train, sample, eval, extract, export, bench.

Errors a user can fix (bad config, missing file, wrong checkpoint) print one line and exit 2;
anything else is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a packaged config: digits, imagenet256, imagenet512, fields64")
    p.add_argument("--config", help="a YAML config file (applied after the preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--objective", choices=["ddpm", "flow"], help="shortcut for --set objective.name=...")
    p.add_argument("--model", help="shortcut for --set model.name=... (e.g. DiT-B/2)")
    p.add_argument("--steps", type=int, help="shortcut for --set train.steps=...")


def _resolve_config(args):
    from ditkit.config import load_config

    overrides = list(args.overrides)
    for flag, key in (("objective", "objective.name"), ("model", "model.name"), ("steps", "train.steps")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.preset is None and args.config is None:
        raise SystemExit("ditkit: give --preset NAME or --config FILE (try --preset digits)")
    return load_config(args.preset, args.config, overrides)


def cmd_train(args) -> None:
    from ditkit.train.trainer import train

    cfg = _resolve_config(args)
    result = train(cfg, args.run_dir, resume=args.resume, device=args.device, init_from=args.init_from,
                   stop_after=args.stop_after)
    print(f"trained to step {result['step']}; checkpoints in {Path(args.run_dir) / 'checkpoints'}")


def cmd_sample(args) -> None:
    import torch

    from ditkit.checkpoints import load_for_sampling
    from ditkit.config import from_dict
    from ditkit.objectives import build_objective
    from ditkit.sampling import grid_labels, sample_to_npz, save_sample_grid
    from ditkit.train.distributed import cleanup, setup_distributed

    info = setup_distributed(args.device)
    model, cfg = load_for_sampling(args.ckpt, use_ema=not args.no_ema, device=info.device)
    overrides = {k: v for k, v in {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale,
                                   "eta": args.eta, "guided_channels": args.guided_channels,
                                   "guidance_interval": args.guidance_interval}.items() if v is not None}
    cfg = from_dict({"sample": overrides}, cfg).validate()
    objective = build_objective(cfg)
    decode = _decoder(cfg, args.vae, info.device)
    labels = args.labels if args.labels in ("balanced", "random") else [int(v) for v in args.labels.split(",")]
    out = Path(args.out)
    path = sample_to_npz(model, objective, cfg, args.num_samples, out, args.batch_size, seed=args.seed, labels=labels,
                         decode=decode, rank=info.rank, world_size=info.world_size, device=info.device)
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
    import numpy as np

    if args.ref is None:
        from ditkit.eval.digits import evaluate_digit_samples

        data = np.load(args.samples)
        if "samples" not in data or data["samples"].shape[-2:] != (8, 8):
            raise SystemExit(f"ditkit: {args.samples} holds no 8×8 digit samples; give --ref for image metrics")
        result = evaluate_digit_samples(data["samples"], data["arr_1"])
    else:
        from ditkit.eval.evaluate import evaluate

        result = evaluate(args.samples, args.ref, inception_weights=args.inception, batch_size=args.batch_size,
                          device=args.device)
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        from ditkit.utils.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditkit", description="Diffusion Transformers: train, sample, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a DiT (one process, or many under torchrun)")
    _add_config_args(p)
    p.add_argument("--run-dir", required=True, help="folder for checkpoints, config.yaml, metrics and samples")
    p.add_argument("--resume", action="store_true", help="continue from run-dir/checkpoints/last.pt")
    p.add_argument("--init-from", help="start from these weights (ditkit, official .pt, safetensors)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: this rank's GPU if any)")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)
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
    p.add_argument("--guided-channels", type=int, help="guide only the first N channels (3: the official code)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("A", "B"), help="guide only for noise level in [A, B]")
    p.add_argument("--labels", default="balanced", help="balanced, random, or a comma-separated list of class ids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", help="local VAE (folder or file) to decode latents")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="score samples: digits metrics, or FID/sFID/IS/precision/recall against --ref")
    p.add_argument("--samples", required=True, help="a samples .npz (arr_0 uint8 N×H×W×3)")
    p.add_argument("--ref", help="reference batch: ADM .npz, another .npz or a folder of images")
    p.add_argument("--inception", help="local InceptionV3 weights (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=cmd_eval)
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
