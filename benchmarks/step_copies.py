"""Where a training step of the fast path copies tensors: one eager DiT step (the fused MLP, tuned linears,
fused attention and fused norm; bf16 weights; no compile) under torch.profiler, and the aten ops that
copy, grouped by input shapes, with their CUDA time and call counts.

    PYTHONPATH=src:benchmarks python benchmarks/step_copies.py [--model DiT-XL/2] [--batch 32]

Compiled with CUDA graphs the same copies run inside the graph, where the profile (``bench.py --profile``)
names only the kernel (``direct_copy_kernel_cuda``); shapes and counts here narrow down the caller (six
copies of (32, 256, 1152) per step at XL/2 b32: the tokens around the first block's norm operator).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses

import torch
from bench import make_model, random_batch  # benchmarks/, on the path when run as a script
from torch.profiler import ProfilerActivity, profile

from ditkit.config import Config
from ditkit.fast import TRAIN_RECIPES, TrainRun, train_speed
from ditkit.objectives.ddpm import create_ddpm
from ditkit.training.trainer import train_step

COPY_OPS = ("aten::copy_", "aten::contiguous", "aten::clone", "aten::_to_copy", "aten::reshape", "aten::cat", "aten::stack")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--input-size", type=int, default=32)
    args = ap.parse_args()
    device = torch.device(args.device)
    model = make_model(args.model, args.input_size, device).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    plan = train_speed(dataclasses.replace(TRAIN_RECIPES["fast"], compile=False, cuda_graphs=False, compile_loss=False),
                       TrainRun(device, torch.bfloat16))  # the fast recipe's modules, eager
    plan.apply(model)
    opt = plan.optimizer(model, ema, max_norm=0.0, lr=1e-4)
    params = [p for p in model.parameters() if p.requires_grad]
    objective, cfg = create_ddpm(), Config()
    x, y = random_batch(args.batch, args, device)

    def step(i: int) -> None:
        train_step(model, objective, opt, [{"x": x, "y": y}], i, 0, cfg, torch.bfloat16, None, device, params)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(2):
        step(i)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step(2)
        sync()
    print(f"{args.model} batch {args.batch}: copying ops by input shapes (CUDA ms, calls)")
    for row in sorted(prof.key_averages(group_by_input_shape=True), key=lambda r: -r.device_time_total):
        if row.key in COPY_OPS and row.device_time_total > 0:
            print(f"  {row.device_time_total / 1e3:7.3f} ms  {row.count:4d}×  {row.key}  {str(row.input_shapes)[:150]}")


if __name__ == "__main__":
    main()
