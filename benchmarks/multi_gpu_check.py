"""The checks of scripts/multi_gpu.sh: a many-GPU run against a one-GPU run.

    python benchmarks/multi_gpu_check.py losses RUN_A RUN_B    # same loss at every logged step? same final weights?
    python benchmarks/multi_gpu_check.py throughput RUN:GPUS ...  # img/s per GPU over each run's second half
    python benchmarks/multi_gpu_check.py samples MANY.npz ONE.npz  # every sample once; the first ones equal
    python benchmarks/multi_gpu_check.py cache DIR [LATENT]      # a synthetic latent cache in the real format
    python benchmarks/multi_gpu_check.py fake-checkpoint DIR [LATENT]  # a random DiT-S/2 latent model and SD VAE
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from bench import rel_err  # benchmarks/, on the path when run as a script

# Largest relative loss difference accepted between an N-GPU run and its 1-GPU twin at any logged
# step: about 2.5× bf16's rounding (2^-8).  The twins may differ only in the order in which the per-GPU
# gradients are summed: on 2 H200s they were bit-identical (for two terms a + b = b + a); with more GPUs
# the order can change the rounding, and such a difference would grow step by step.
LOSS_TOL = 1e-2


def losses(a: Path, b: Path) -> bool:
    la, lb = ({r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())} for run in (a, b))
    common = sorted(la.keys() & lb.keys())
    rel = [abs(la[s] - lb[s]) / abs(lb[s]) for s in common]
    worst = int(np.argmax(rel))
    print(f"losses {a.name} vs {b.name}: {len(common)} logged steps ({common[0]}..{common[-1]}); "
          f"largest relative difference {rel[worst]:.2e} at step {common[worst]}; median {np.median(rel):.2e}")
    if not all((run / "checkpoints" / "last.pt").exists() for run in (a, b)):
        print(f"final weights not compared: no checkpoints/last.pt in {a} or {b}")
    else:
        wa, wb = (torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True) for run in (a, b))
        flat = {(w, p): torch.cat([w_[p][k].flatten() for k in sorted(wb[p])]) for w, w_ in (("a", wa), ("b", wb))
                for p in ("model", "ema")}
        rel_w = {p: rel_err(flat["a", p], flat["b", p]) for p in ("model", "ema")}
        print(f"final weights (step {wa['step']} vs {wb['step']}): relative L2 difference, all parameters: "
              f"model {rel_w['model']:.2e}, EMA {rel_w['ema']:.2e}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return rel[worst] <= LOSS_TOL
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for run, curve, ls in ((a, la, "-"), (b, lb, "--")):
        top.plot(common, [curve[s] for s in common], ls, label=run.name)
    top.set(ylabel="training loss", yscale="log", title=f"{a.name} vs {b.name}")
    top.legend()
    bottom.semilogy(common, np.maximum(rel, 1e-9))
    bottom.set(xlabel="step", ylabel="relative difference (0 drawn at 1e-9)", ylim=(5e-10, 1))
    bottom.axhline(LOSS_TOL, color="gray", ls=":", label=f"accepted ({LOSS_TOL:g})")
    bottom.legend()
    fig.savefig(a / f"loss_vs_{b.name}.png", dpi=120, bbox_inches="tight")
    print(f"plot: {a / f'loss_vs_{b.name}.png'}")
    return rel[worst] <= LOSS_TOL


def samples(many: Path, one: Path) -> bool:
    a, b = np.load(many), np.load(one)
    x, y = a["arr_0"], a["arr_1"]
    digests = {hashlib.sha1(img.tobytes()).hexdigest() for img in x}
    counts = np.bincount(y)
    n = len(b["arr_0"])
    same = np.array_equal(x[:n], b["arr_0"]) and np.array_equal(y[:n], b["arr_1"])
    diff = np.abs(x[:n].astype(np.int16) - b["arr_0"].astype(np.int16)).max()
    print(f"{many}: arr_0 {x.shape} {x.dtype}, arr_1 {y.shape}; distinct images {len(digests)} of {len(x)}; "
          f"labels per class {counts.min()}..{counts.max()}")
    print(f"first {n} against the one-GPU run {one}: {'identical' if same else f'differ (max |Δ| {diff})'}")
    return same and len(digests) == len(x) and counts.max() - counts.min() <= 1  # balanced: classes in turn


def throughput(*runs: str) -> bool:
    """img/s of each ``RUN:GPUS[:LAST]`` from the trainer's metrics.jsonl over steps LAST/2+1..LAST (default:
    the run's last step; all images over all time, whatever the logging interval), per GPU, and against the
    first run's.  LAST leaves out steps a later --resume appended."""
    print("| run | GPUs | global batch | img/s | img/s per GPU | scaling efficiency | GPU mem GiB |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    base = None
    for spec in runs:
        path, gpus, *last = spec.split(":")
        run, gpus = Path(path), int(gpus)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if not last or r["step"] <= int(last[0])]
        batch = yaml.safe_load((run / "config.yaml").read_text())["train"]["global_batch_size"]
        half = records[-1]["step"] / 2
        images = seconds = 0.0
        for prev, rec in zip([{"step": 0}] + records, records):
            if prev["step"] >= half:
                images += (rec["step"] - prev["step"]) * batch
                seconds += (rec["step"] - prev["step"]) * batch / rec["img_per_s"]
        per_gpu = images / seconds / gpus
        base = base or per_gpu
        print(f"| {run.name} | {gpus} | {batch} | {images / seconds:.1f} | {per_gpu:.1f} | {per_gpu / base:.1%} | "
              f"{records[-1].get('gpu_mem_gib', 0):.1f} |")
    return True


def cache(out: Path, latent: str = "32") -> None:
    from train_throughput import write_synthetic_cache

    out.mkdir(parents=True, exist_ok=True)
    write_synthetic_cache(out, count=4096, latent=int(latent), num_classes=1000)
    print(f"wrote a synthetic {latent}×{latent}×4 latent cache of 4096 samples to {out}")


def fake_checkpoint(out: Path, latent: str = "8") -> None:
    """A DiT-S/2 on latent×latent×4 latents (8·latent-pixel images) with random weights, saved
    as ditkit's ema.safetensors (with its run config), and a randomly initialised AutoencoderKL of the SD VAE's architecture: the real sampling path
    (DiT, guidance, DDIM, VAE decoder, ADM .npz) with numbers that mean nothing."""
    from diffusers import AutoencoderKL

    from ditkit.checkpoints import save_weights
    from ditkit.config import load_config
    from ditkit.models.dit import build_model
    from ditkit.models.vae import SD_VAE_CONFIG

    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(out / "vae")
    cfg = load_config("imagenet256", overrides=["model.name=DiT-S/2", f"model.input_size={latent}"])
    model = build_model(cfg.model.name, input_size=int(latent), in_channels=4, num_classes=1000)
    for m in model.modules():  # adaLN-Zero starts at zero output: give the network something to say
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.02)
    save_weights(model.state_dict(), model, cfg, out / "dit.safetensors")
    print(f"wrote {out / 'dit.safetensors'} and {out / 'vae'}")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "throughput":
        ok = throughput(*args)
    else:
        paths = [Path(a) for a in args[:2 if cmd in ("losses", "samples") else 1]]
        ok = {"losses": losses, "samples": samples, "cache": cache, "fake-checkpoint": fake_checkpoint}[cmd](*paths, *args[len(paths):])
    if ok is False:
        sys.exit(f"multi_gpu_check {cmd}: FAILED")
