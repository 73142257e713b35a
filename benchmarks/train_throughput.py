"""Training throughput through the exact command a user runs (`ditkit train --preset imagenet256`),
on a synthetic latent cache in the real format (random posteriors, 32×32×4 latents, 1000 classes:
the data path is the real one, only the numbers are made up, since no ImageNet or VAE weights can
be downloaded here).  img/s is the trainer's own `metrics.jsonl` figure for the last logging
interval (the first interval holds start-up).

    PYTHONPATH=src python benchmarks/train_throughput.py [--models DiT-B/2 DiT-XL/2] [--steps 30] [--nproc 2]

With --nproc N the command runs under torchrun, one process per GPU (the trainer's img/s counts
every process's images); --torchrun launches it so even for one process, where the trainer wraps the
model in DDP or FSDP (train.distributed) all the same: the step N GPUs run, measured on one.  NVLink
multicast stays off in every launch (NCCL_NVLS_ENABLE=0 and its kin).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ditkit.data.latents import FORMAT, MANIFEST, shard_name


def write_synthetic_cache(out: Path, count: int, latent: int, num_classes: int, shard_size: int = 2048,
                          images: bool = False) -> None:
    """A latent cache in the real format with random latents (and, with ``images``, random uint8 images beside them,
    as ``ditkit extract --images`` stores them for REPA's encoder)."""
    g = torch.Generator().manual_seed(0)
    shards = []
    for k, start in enumerate(range(0, count, shard_size)):
        n = min(shard_size, count - start)
        shape = (n, 2, 4, latent, latent)
        tensors = {"mean": torch.randn(shape, generator=g).half(), "std": torch.full(shape, 0.1).half(),
                   "label": torch.randint(num_classes, (n,), generator=g)}
        if images:
            tensors["image"] = torch.randint(0, 256, (n, 3, latent * 8, latent * 8), generator=g, dtype=torch.uint8)
        save_file(tensors, str(out / shard_name(k)))
        shards.append({"name": shard_name(k), "start": start, "count": n})
    manifest = {"format": FORMAT, "count": count, "image_shape": [3, latent * 8, latent * 8],
                "latent_shape": [4, latent, latent], "views": ["image", "hflip"], "scale_factor": 0.18215,
                "dtype": "float16", "num_classes": num_classes, "classes": None, "source": "synthetic",
                "vae": "none", "shard_size": shard_size, "shards": shards, "images": images}
    (out / MANIFEST).write_text(json.dumps(manifest))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["DiT-B/2", "DiT-XL/2"])
    ap.add_argument("--batch", type=int, default=256, help="global batch (the paper's 256)")
    ap.add_argument("--micro", type=int, default=128, help="per-process micro-batch (accumulation = batch / (micro · nproc))")
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs), through torchrun")
    ap.add_argument("--torchrun", action="store_true", help="launch through torchrun even for one process (the wrapper on)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--extra", nargs="*", default=[], help="more --set overrides, e.g. train.speed=fastest")
    ap.add_argument("--tag", default="run", help="in the JSON file's name under $OUT")
    ap.add_argument("--repa", action="store_true", help="REPA on: a randomly initialised DINOv2-B (transformers' "
                    "Dinov2Model of the published configuration) as the encoder, images in the cache, block 8 aligned")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    cache = work / "latents"
    cache.mkdir()
    write_synthetic_cache(cache, count=max(4 * args.batch, 2048), latent=args.latent, num_classes=1000,
                          images=args.repa)
    if args.repa:  # the encoder's weights do not change its cost: a random one of the real architecture
        from transformers import Dinov2Config, Dinov2Model

        Dinov2Model(Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14,
                                 image_size=518)).save_pretrained(str(work / "dinov2-base"))
        args.extra += ["model.repa_depth=8", f"train.repa_encoder={work / 'dinov2-base'}"]
    rows = []
    for model in args.models:
        run_dir = work / model.replace("/", "_")
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)] \
            if args.nproc > 1 or args.torchrun else []
        cmd = [sys.executable, *launch, "-m", "ditkit", "train", "--preset", "imagenet256", "--model", model,
               "--steps", str(args.steps), "--run-dir", str(run_dir),
               "--set", f"data.path={cache}", "--set", f"model.input_size={args.latent}",
               "--set", f"train.global_batch_size={args.batch}", "--set", f"train.grad_accum={args.batch // (args.micro * args.nproc)}",
               "--set", f"train.log_every={args.steps // 2}", "--set", "train.ckpt_every=1000000"]
        for e in args.extra:
            cmd += ["--set", e]
        print("$", " ".join(cmd[1:]), flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
               "NVSHMEM_DISABLE_NVLS": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not set(ln.strip()) <= set("=-")]
            errors = [ln for ln in lines if "Error" in ln or "error:" in ln]  # torchrun ends with a banner of its own
            rows.append({"model": model, "status": (errors or lines or ["failed"])[-1].strip()[:200],
                         "stderr_tail": lines[-60:]})
            print("\n".join(lines[-60:]), flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            continue
        record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        out = os.environ.get("OUT")
        for profile in run_dir.glob("profile_*.txt") if out else []:  # train.profile=A-B: its table is copied to $OUT
            shutil.copy(profile, Path(out, f"{args.tag}_{model.replace('/', '_')}_{profile.name}"))
        shutil.rmtree(run_dir, ignore_errors=True)  # an XL/2 checkpoint is several GB: runs in a row would fill the disk
        said = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith(("speed", "master_weights", "DDP"))]
        rows.append({"model": model, "status": "ok", "speed_lines": said, **record})
        print("\n".join(said), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{device} × {args.nproc}; global batch {args.batch} (micro {args.micro}), {args.steps} steps, extra {args.extra}")
    print("| model | GPUs | run | img/s | img/s per GPU | GPU mem GiB | loss | status |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        r["nproc"] = args.nproc
        print(f"| {r['model']} | {args.nproc} | {args.tag} | {r.get('img_per_s', 0):.1f} | {r.get('img_per_s', 0) / args.nproc:.1f} | "
              f"{r.get('gpu_mem_gib', 0):.1f} | {r.get('loss', 0):.4f} | {r['status']} |")
    out = os.environ.get("OUT")
    if out:
        Path(out, f"train_throughput_{args.nproc}gpu_{args.tag}.json").write_text(json.dumps(rows, indent=2))
    if any(r["status"] != "ok" for r in rows):
        sys.exit("train_throughput: a run failed (status column)")


if __name__ == "__main__":
    main()
