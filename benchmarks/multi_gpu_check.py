"""The checks of scripts/multi_gpu.sh: a many-GPU run against a one-GPU run.

    python benchmarks/multi_gpu_check.py losses RUN_A RUN_B    # same loss at every logged step? same final weights?
    python benchmarks/multi_gpu_check.py samples MANY.npz ONE.npz  # every sample once; the first ones equal
    python benchmarks/multi_gpu_check.py fake-checkpoint DIR     # a random DiT-S/2 latent model and SD VAE
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch


# Largest relative loss difference accepted between an N-GPU run and its 1-GPU twin: about 2.5× bf16's rounding (2^-8)
# (the digits preset runs in float32); two identical 1-GPU runs differ by ≤ 3e-4 (GPU kernels'
# nondeterminism, docs/results/multi_gpu_dryrun_1xh100.txt).
LOSS_TOL = 1e-2


def losses(a: Path, b: Path) -> bool:
    la, lb = ({r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())} for run in (a, b))
    common = sorted(la.keys() & lb.keys())
    rel = [abs(la[s] - lb[s]) / abs(lb[s]) for s in common]
    worst = int(np.argmax(rel))
    print(f"losses {a.name} vs {b.name}: {len(common)} logged steps ({common[0]}..{common[-1]}); "
          f"largest relative difference {rel[worst]:.2e} at step {common[worst]}; median {np.median(rel):.2e}")
    wa, wb = (torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True) for run in (a, b))
    flat = {(w, p): torch.cat([w_[p][k].float().flatten() for k in sorted(wb[p])]) for w, w_ in (("a", wa), ("b", wb))
            for p in ("model", "ema")}
    rel_w = {p: ((flat["a", p] - flat["b", p]).norm() / flat["b", p].norm()).item() for p in ("model", "ema")}
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
    bottom.set(xlabel="step", ylabel="relative difference")
    fig.savefig(a / f"loss_vs_{b.name}.png", dpi=120, bbox_inches="tight")
    print(f"plot: {a / f'loss_vs_{b.name}.png'}")
    return rel[worst] <= LOSS_TOL


def samples(many: Path, one: Path) -> bool:
    a, b = np.load(many), np.load(one)
    x, y = a["arr_0"], a["arr_1"]
    digests = {hashlib.sha1(img.tobytes()).hexdigest() for img in x}
    n = len(b["arr_0"])
    same = np.array_equal(x[:n], b["arr_0"]) and np.array_equal(y[:n], b["arr_1"])
    diff = np.abs(x[:n].astype(np.int16) - b["arr_0"].astype(np.int16)).max()
    print(f"{many}: arr_0 {x.shape} {x.dtype}, arr_1 {y.shape}; distinct images {len(digests)} of {len(x)}; "
          f"labels per class {np.bincount(y).min()}..{np.bincount(y).max()}")
    print(f"first {n} against the one-GPU run {one}: {'identical' if same else f'differ (max |Δ| {diff})'}")
    counts = np.bincount(y)
    return same and len(digests) == len(x) and counts.min() == counts.max()


def fake_checkpoint(out: Path) -> None:
    """A DiT-S/2 on 8×8×4 latents (64-pixel images) with random weights, saved
    as ditkit's ema.safetensors (with its run config), and a randomly initialised AutoencoderKL of the SD VAE's architecture: the real sampling path
    (DiT, guidance, DDIM, VAE decoder, ADM .npz) with numbers that mean nothing."""
    from diffusers import AutoencoderKL

    from ditkit.checkpoints import save_weights
    from ditkit.config import load_config
    from ditkit.models.dit import build_model
    from ditkit.models.vae import SD_VAE_CONFIG

    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(out / "vae")
    cfg = load_config("imagenet256", overrides=["model.name=DiT-S/2", "model.input_size=8"])
    model = build_model(cfg.model.name, input_size=8, in_channels=4, num_classes=1000)
    for m in model.modules():  # adaLN-Zero starts at zero output: give the network something to say
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.02)
    save_weights(model.state_dict(), model, cfg, out / "dit.safetensors")
    print(f"wrote {out / 'dit.safetensors'} and {out / 'vae'}")


if __name__ == "__main__":
    cmd, *paths = sys.argv[1:]
    ok = {"losses": losses, "samples": samples, "fake-checkpoint": fake_checkpoint}[cmd](*map(Path, paths))
    if ok is False:
        sys.exit(f"multi_gpu_check {cmd}: FAILED")
