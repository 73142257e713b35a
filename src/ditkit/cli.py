"""The ``ditkit`` command: train, sample, eval, extract, export, config, fields benchmark.

Every failure a user can cause or meet (a bad config, a missing or corrupt file, a full disk, too
little GPU memory, a stopped run) ends in one line ``ditkit: error: ...`` that names the file, key or
value, and a non-zero exit: 2 for bad input, ``EXIT_STOPPED`` (3) for a run that stopped itself,
``EXIT_PREEMPTED`` (75) for one checkpointed after a stop signal, 130 for Ctrl-C.  Anything else is
a bug and keeps its traceback; ``ditkit --debug ...`` keeps the traceback of every failure."""
from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

EXIT_USAGE = 2  # what argparse uses: the input was wrong, nothing ran or the run could not go on
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's code for Ctrl-C


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless it has none (None, off, empty) or says it already."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    from ditkit.config import preset_names

    p.add_argument("--preset", help=f"a packaged config: {', '.join(preset_names())}")
    p.add_argument("--config", help="a YAML config file (applied after the preset), or the cosmology framework's dit.ini")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--objective", choices=["ddpm", "flow"],
                   help="shortcut for --set objective.name=...; also picks that objective's default sampler "
                        "(ddpm: ddpm 250 steps; flow: heun 25 steps) unless --set sample.sampler=... is given")
    p.add_argument("--data", metavar="PATH",
                   help="shortcut for --set data.path=...: an image folder, a labels file, a latent cache, or the "
                        "fields' x array; the data's kind, sizes, channels and classes are read from it")
    p.add_argument("--model", help="shortcut for --set model.name=... (e.g. DiT-B/2)")
    p.add_argument("--steps", type=int, help="shortcut for --set train.steps=...")


def _resolve_config(args, fallback: Path | None = None, required: bool = True):
    """The config of ``--preset``/``--config`` (else ``fallback``, a run's config.yaml) with the shortcuts
    and ``--set`` overrides; with neither, the defaults unless ``required``."""
    from ditkit.config import ConfigError, load_config

    shortcuts = []
    if args.objective:  # the objective's default sampler, unless the user names one
        sampler, steps = {"ddpm": ("ddpm", 250), "flow": ("heun", 25)}[args.objective]
        for key, value in (("sample.sampler", sampler), ("sample.steps", steps)):
            if not any(o.startswith(f"{key}=") for o in args.overrides):
                shortcuts.append(f"{key}={value}")
    for flag, key in (("objective", "objective.name"), ("model", "model.name"), ("steps", "train.steps"), ("data", "data.path"),
                      ("speed", "train.speed")):
        value = getattr(args, flag, None)
        if value is not None:
            shortcuts.append(f"{key}={value}")
    overrides = shortcuts + list(args.overrides)  # the user's --set come last and win
    path = args.config
    if args.preset is None and path is None:
        if fallback is not None and fallback.is_file():
            path = fallback
        elif required:
            raise ConfigError("give --preset NAME or --config FILE (try --preset digits)")
    return load_config(args.preset, overrides, path=path)


def cmd_train(args) -> None:
    from ditkit.training.trainer import train

    run_dir = Path(args.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--run-dir {run_dir} is a file, not a folder; choose a folder for the run")
    resuming = args.resume or args.resume_from is not None
    cfg = _resolve_config(args, fallback=run_dir / "config.yaml" if resuming else None)  # a resume needs only the run
    result = train(cfg, args.run_dir, resume=resuming, device=args.device,
                   init_from=args.init_from, resume_from=args.resume_from, allow_changes=args.allow_changes)
    from ditkit.utils.ranks import env_rank

    if env_rank() == 0:  # under torchrun, once for the run, not once per process
        print(f"trained to step {result['step']}; checkpoints in {Path(args.run_dir) / 'checkpoints'}")


def cmd_config(args) -> None:
    from ditkit.config import format_config, to_yaml

    cfg = _resolve_config(args, required=False)
    if args.data is not None or cfg.data.kind == "digits":  # as the trainer will see it
        from ditkit.data.facts import fit_to_data

        cfg, fitted = fit_to_data(cfg)
        for line in fitted:
            print(line, file=sys.stderr)
    print(to_yaml(cfg) if args.yaml else format_config(cfg), end="")


def cmd_sample(args) -> None:
    from ditkit.generation import sample_checkpoint

    settings = {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale, "eta": args.eta,
                "guided_channels": args.guided_channels, "grid": args.grid or ("shifted" if args.shift else None),
                "sde_diffusion": args.sde_diffusion,
                "guidance_interval": args.guidance_interval, "shift": args.shift}
    if args.lengths:
        from ditkit.generation import sequences_to_npz

        if args.num_samples is not None:
            raise ValueError("--num-samples does not apply with --lengths, which makes one sample per length: repeat a "
                             "length for more samples of it (64,64,128)")
        labels = None if args.labels in ("balanced", "random") else [v.strip() for v in args.labels.split(",")]
        try:
            sizes = [tuple(int(n) for n in v.split("x")) for v in args.lengths.split(",")]
        except ValueError:
            raise ValueError(f"--lengths {args.lengths!r}: give lengths or sizes as integers, e.g. 64,128 or "
                             "4x16x16,8x32x32") from None
        sizes = [s[0] if len(s) == 1 else s for s in sizes]
        params = None
        if args.cond:  # models of sequences on parameters: 'params' (N, P), one row per length
            from ditkit.generation import read_npz

            params = read_npz(args.cond, ["params"], "--cond")["params"]
        print(sequences_to_npz(args.ckpt, args.out, sizes, labels=labels, params=params, batch_size=args.batch_size,
                               progress=True, speed=args.speed, seed=args.seed, ema=not args.no_ema, device=args.device,
                               context=args.context, **settings))
        return
    line = sample_checkpoint(args.ckpt, args.out, num_samples=100 if args.num_samples is None else args.num_samples, batch_size=args.batch_size,
                             settings=settings, speed=args.speed, labels=args.labels, seed=args.seed, vae=args.vae,
                             cond=args.cond, ema=not args.no_ema, device=args.device, context=args.context)
    if line:
        print(line)


def cmd_eval(args) -> None:
    from ditkit.eval.evaluate import write_json
    from ditkit.eval.scoring import format_scores, score

    result = score(args.samples, args.ref, args.inception, metric=args.metric, batch_size=args.batch_size,
                   device=args.device, resize=args.resize, progress=True)
    print(format_scores(result))
    if args.json:
        write_json(result, args.json)


def cmd_extract(args) -> None:
    import torch

    from ditkit.data.latents import build_latent_cache

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    manifest = build_latent_cache(args.data, args.vae, args.out, image_size=args.image_size, labels_file=args.labels_file,
                                  num_classes=args.num_classes, vae_dtype=dtypes[args.vae_dtype], device=args.device,
                                  batch_size=args.batch_size, shard_size=args.shard_size, num_workers=args.workers,
                                  rank=args.rank, world_size=args.world_size, images=args.images, progress=True)
    kept = " and the images" if manifest["images"] else ""
    print(f"{manifest['count']} images -> latents {manifest['latent_shape']}{kept} in {args.out}")


def cmd_export(args) -> None:
    from ditkit.checkpoints import export_diffusers, load_model, save_weights
    from ditkit.checkpoints.diffusers import pipeline_decoding_gap

    model, cfg = load_model(args.ckpt, ema=not args.no_ema, device="cpu")
    if args.to == "diffusers":
        labels = None
        if args.id2label:
            try:
                labels = json.loads(Path(args.id2label).read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"--id2label {args.id2label} is not valid JSON ({err})") from None
        if labels is None and cfg.data.class_names:  # the names the training data gave its classes
            labels = dict(enumerate(cfg.data.class_names))
        export_diffusers(model, args.out, vae=args.vae, id2label=labels, data=cfg.data)
        gap = None if args.vae else pipeline_decoding_gap(cfg.data)
        if gap is not None:
            print(f"note: {gap}, and this folder does not record it either; to sample, export with --to safetensors "
                  "and use `ditkit sample --vae`")
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
    from ditkit.config import SPEEDS
    from ditkit.samplers.sde import DIFFUSION_FORMS

    from ditkit import __version__

    parser = argparse.ArgumentParser(prog="ditkit", description="Diffusion Transformers: train, sample, evaluate.")
    parser.add_argument("--version", action="version", version=f"ditkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any failure (before the "
                        "command: ditkit --debug train ...)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=_HelpFormatter, **kw)

    p = add("train", help="train a DiT (one process, or many under torchrun)")
    _add_config_args(p)
    p.add_argument("--run-dir", required=True, help="folder for checkpoints, config.yaml, metrics and samples")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in run-dir/checkpoints "
                   "(a corrupt or truncated one is named and skipped); without --preset or --config, the run's own "
                   "run-dir/config.yaml is used")
    p.add_argument("--resume-from", metavar="PATH", help="continue from this checkpoint instead of the newest")
    p.add_argument("--allow-changes", action="store_true", help="with --resume: accept a changed seed, batch size or data "
                   "(the run is then no longer the one it would have been without the stop)")
    p.add_argument("--init-from", help="start from these weights (ditkit, official .pt, safetensors)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: this rank's GPU if any)")
    p.add_argument("--speed", metavar="|".join(SPEEDS), help="shortcut for --set train.speed=...: a recipe (auto: the "
                   "fastest valid for the run on a GPU, reference on a CPU) or levers joined by + (docs/speed.md)")
    p.set_defaults(func=cmd_train)

    p = add("sample", help="sample into an ADM-style .npz and a PNG grid")
    p.add_argument("--ckpt", required=True, help="ditkit checkpoint, official DiT .pt, safetensors or diffusers folder")
    p.add_argument("--out", required=True, help="output folder (samples.npz, grid.png, parts/)")
    p.add_argument("--num-samples", type=int, help="samples to generate (default 100); not with --lengths, which makes "
                                                      "one sample per length")
    p.add_argument("--batch-size", type=int, default=250, help="samples per forward pass (lower it if out of memory)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun", "dopri5", "sde"],
                   help="the sampler (ddpm, ddim for DDPM models; the others for flow models); default: the checkpoint's "
                   "sample.sampler")
    p.add_argument("--steps", type=int, help="sampling steps; default: the checkpoint's sample.steps")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1: none); default: the checkpoint's "
                   "sample.cfg_scale")
    p.add_argument("--eta", type=float, help="DDIM eta")
    p.add_argument("--grid", choices=["uniform", "shifted"], help="euler/heun/sde time grid (shifted: by --shift, else "
                                                                  "the objective's shift)")
    p.add_argument("--shift", type=float, help="the shifted grid's shift (> 1: more steps at high noise)")
    p.add_argument("--sde-diffusion", choices=DIFFUSION_FORMS,
                   help="diffusion coefficient of the sde sampler (SiT's forms)")
    p.add_argument("--guided-channels", type=int, help="guide only the first N channels (3: the official code)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("A", "B"), help="guide only for noise level in [A, B]")
    p.add_argument("--speed", metavar="|".join(SPEEDS), help="the speed recipe: reference (float32, eager: the official "
                   "numerics), fast (bf16 + CUDA graphs), fastest (+ FP8 products), auto (fastest on a GPU, reference on "
                   "a CPU), or levers joined by + (docs/speed.md); default: the checkpoint's sample.speed, auto")
    p.add_argument("--labels", default="balanced",
                   help="balanced, random, or a comma-separated list of class ids or class names (cat,dog)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (sample i's noise depends only on seed and i)")
    p.add_argument("--vae", help="local VAE (folder or file) to decode latents")
    p.add_argument("--cond", help="models on params/fields: .npz with 'params' (N, P) and/or 'field' (N, C, H, W), "
                                  "physical units; one sample per row")
    p.add_argument("--context", help="models on sequences of embeddings (model.context_dim): a folder of (M, E) "
                                     ".npy/.safetensors files, one sample per file in natural name order (2 before 10)")
    p.add_argument("--lengths", help="models of sequences (data.kind=sequences): one sample per length, 64,128,... "
                                     "(multiples of the patch size), into samples.npz in the data's units; for images "
                                     "or volumes of different sizes one size per sample, 16x32,4x16x16,...")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: this rank's GPU if any)")
    p.set_defaults(func=cmd_sample)

    p = add("eval", help="score samples: FID/sFID/IS/precision/recall (InceptionV3), or the digits metrics for "
                         "digits samples")
    p.add_argument("--samples", required=True, help="an .npz (ADM: arr_0 uint8 N×H×W×3; a ditkit samples.npz) or a "
                   "folder of PNG/JPEG images")
    p.add_argument("--ref", help="reference: an ADM reference batch .npz (its mu/sigma are used), another .npz or a "
                   "folder of images; without it, IS alone (or the digits metrics)")
    p.add_argument("--inception", help="local InceptionV3 weights pt_inception-2015-12-05-6726825d.pth (default: the "
                   "DITKIT_INCEPTION environment variable; docs/sampling.md says where to download it)")
    p.add_argument("--metric", choices=["auto", "digits", "inception"], default="auto",
                   help="auto: the digits metrics for a digits run's samples without --ref, InceptionV3 otherwise")
    p.add_argument("--batch-size", type=int, default=64, help="images per InceptionV3 forward pass")
    p.add_argument("--resize", choices=["pytorch-fid", "tf1"], default="pytorch-fid",
                   help="resize to 299×299 as pytorch-fid does, or as the TF1 graph of ADM's suite does")
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=cmd_eval)

    p = add("extract", help="encode an image dataset once into a sharded VAE latent cache")
    p.add_argument("--data", required=True, help="ImageFolder root, or the base folder of --labels-file")
    p.add_argument("--labels-file", help="train_labels.txt: one 'image_path class_id' per line")
    p.add_argument("--num-classes", type=int, help="if given, every label must lie in [0, N); 0: an unconditional cache (labels not read)")
    p.add_argument("--vae", required=True, help="a local diffusers AutoencoderKL folder (sd-vae-ft-ema / -mse, or any "
                   "other: its scaling_factor and shift_factor are recorded in the cache), or an SD VAE weights file")
    p.add_argument("--image-size", type=int, default=256, help="side of the center-cropped images (latents: side / the "
                   "VAE's downsampling, 8 or 16)")
    p.add_argument("--out", required=True, help="folder of the latent cache (shards and manifest.json)")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward pass")
    p.add_argument("--shard-size", type=int, default=10000, help="latents per shard file")
    p.add_argument("--workers", type=int, default=8, help="DataLoader worker processes that read the images")
    p.add_argument("--vae-dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="precision of the VAE encoder")
    p.add_argument("--images", action="store_true",
                   help="also keep each cropped image as uint8 (3·H·W bytes: 197 KB at 256×256) for REPA's encoder")
    p.add_argument("--rank", type=int, default=0, help="this process's share of the images (with --world-size)")
    p.add_argument("--world-size", type=int, default=1, help="processes that split the images between them")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: the GPU if any)")
    p.set_defaults(func=cmd_extract)

    p = add("export", help="write a checkpoint as a diffusers folder or a safetensors file")
    p.add_argument("--ckpt", required=True, help="ditkit checkpoint, official DiT .pt or safetensors")
    p.add_argument("--to", choices=["diffusers", "safetensors"], default="diffusers", help="the format written")
    p.add_argument("--out", required=True, help="the folder (diffusers) or .safetensors file to write")
    p.add_argument("--vae", help="with --to diffusers: a local VAE folder, to write a whole DiTPipeline")
    p.add_argument("--id2label", help="JSON file {class id: name} for the pipeline")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.set_defaults(func=cmd_export)

    p = add("fields-benchmark", help="write the random-field benchmark (known answer) to disk")
    p.add_argument("--out", required=True, help="folder for the benchmark's arrays and benchmark.json")
    p.add_argument("--n", type=int, default=20000, help="number of fields")
    p.add_argument("--size", type=int, default=64, help="side of each field in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the parameters and the fields")
    p.set_defaults(func=cmd_fields_benchmark)

    p = add("eval-fields", help="score a field model on the random-field benchmark, with plots")
    p.add_argument("--ckpt", required=True, help="a ditkit checkpoint of a field model")
    p.add_argument("--data", required=True, help="the benchmark folder (benchmark.json)")
    p.add_argument("--out", required=True, help="folder for fields_eval.json and the plots")
    p.add_argument("--points", type=int, default=8, help="parameter points at which generated fields are scored")
    p.add_argument("--samples", type=int, default=64, help="generated fields per parameter point (the noise "
                   "floor of the spectrum errors falls as 1/sqrt(samples); the JSON reports it as *_floor)")
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu", help="cpu, cuda, cuda:1")
    p.set_defaults(func=cmd_eval_fields)

    p = add("config", help="print the resolved config: every key with its value, type and help")
    _add_config_args(p)
    p.add_argument("--yaml", action="store_true", help="print only the YAML (a file for --config)")
    p.set_defaults(func=cmd_config)
    for p in sub.choices.values():  # --debug also after the command; SUPPRESS keeps the global one
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _user_error(err: BaseException) -> tuple[str, int] | None:
    """(the one line to print, the exit code) for a failure the user can act on; None for a bug."""
    import torch

    from ditkit.checkpoints.training import CheckpointError
    from ditkit.config import ConfigError
    from ditkit.training.trainer import EXIT_PREEMPTED, EXIT_STOPPED, TrainingPreempted, TrainingStopped

    if isinstance(err, TrainingStopped):
        return _one_line(err), EXIT_STOPPED
    if isinstance(err, TrainingPreempted):  # the trainer's message names the step and the checkpoint
        return _one_line(err) if str(err) else ("checkpointed after a stop signal; run the same command with "
                                                "--resume to continue"), EXIT_PREEMPTED
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)", EXIT_INTERRUPTED
    if isinstance(err, torch.OutOfMemoryError):  # before OSError/RuntimeError: it is a RuntimeError
        # torch's message is one long line; its first three sentences say how much was asked and is free.
        first = ". ".join((str(err).strip() or "CUDA out of memory").splitlines()[0].split(". ")[:3]).rstrip(".")
        return (f"out of GPU memory ({first}); lower the batch: --set train.global_batch_size=N or "
                "train.grad_accum=K for training, --batch-size for sampling"), EXIT_USAGE
    if isinstance(err, (ConfigError, CheckpointError, ValueError, FileNotFoundError, NotADirectoryError,
                        IsADirectoryError, PermissionError)):
        return _one_line(err), EXIT_USAGE
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return _one_line(err), EXIT_USAGE  # ditkit.utils.io names the file it could not write
    return None


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one line.  An OSError of the system ("[Errno 2] No such file or
    directory: 'x'") is given as its strerror and file name."""
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
        if err.errno in (errno.ENOSPC, errno.EDQUOT) and not text.lower().startswith("no space"):
            text = f"no space left on the device ({text}); free some space or choose another folder"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> None:
    """``ditkit ...``: runs one command; a failure the user can act on ends in one line on stderr."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (Exception, KeyboardInterrupt) as err:
        found = None if args.debug else _user_error(err)
        if found is None:
            raise
        line, code = found
        print(f"ditkit: error: {line}", file=sys.stderr)
        raise SystemExit(code) from None


if __name__ == "__main__":
    main()
