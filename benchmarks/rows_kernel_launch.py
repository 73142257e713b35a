"""The launch of the FP8 backward's rows kernels (``fp8_rows.rows_fp8_triton`` for fc1's ∂pre,
``qkv_kernels.stack_rows_fp8`` for ∂qkv) at DiT-XL/2's shapes: programs per multiprocessor, warps and loads in
flight (the loop's ``num_stages``) against time and GB/s.  Each setting's outputs are checked against the default's.

    PYTHONPATH=src:benchmarks python benchmarks/rows_kernel_launch.py [--tokens 8192,32768]
"""
from __future__ import annotations

import argparse
import itertools

import torch
from bench import median_ms
from fp8_backward_products import HIDDEN, D, cudnn_layout_grads

from ditkit.kernels import fp8_rows
from ditkit.kernels import qkv as qkv_kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="8192,32768")
    args = ap.parse_args()
    dev, bf = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("| kernel | tokens | per SM | warps | stages | ms | GB/s | same outputs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in (int(t) for t in args.tokens.split(",")):
        gpre = torch.randn(m, HIDDEN, device=dev, dtype=bf) * torch.rand(m, 1, device=dev, dtype=bf)
        grads = cudnn_layout_grads(m, dev)
        cases = {"fc1 rows": (lambda: fp8_rows.rows_fp8_triton(gpre), m * HIDDEN * 3, HIDDEN),
                 "qkv stack rows": (lambda: qkv_kernels.stack_rows_fp8(*grads), m * 3 * D * 5, 3 * D)}
        for name, (call, moved, width) in cases.items():
            want = call()
            for setting in itertools.product((2, 4, 8), (4, 8, 16), (1, 2)):
                try:
                    got, ms = launched_with(setting, call, dev)
                except Exception as e:  # noqa: BLE001 - a launch the GPU refuses is a row of the table
                    print(f"| {name} | {m} | {' | '.join(map(str, setting))} | refused: {type(e).__name__} | | |", flush=True)
                    continue
                total = moved + programs_bytes(m, dev, width)
                print(f"| {name} | {m} | {' | '.join(map(str, setting))} | {ms:.3f} | {total / ms / 1e6:.0f} | "
                      f"{same_outputs(got, want)} |", flush=True)


def launched_with(setting: tuple[int, int, int], call, dev: torch.device) -> tuple[tuple, float]:
    """call's outputs and median ms with the kernels launched at (programs per SM, warps, stages); the module's
    settings restored afterwards."""
    saved = fp8_rows.PER_SM, fp8_rows.WARPS, fp8_rows.STAGES
    fp8_rows.PER_SM, fp8_rows.WARPS, fp8_rows.STAGES = setting
    try:
        return call(), median_ms(call, 20, dev)
    finally:
        fp8_rows.PER_SM, fp8_rows.WARPS, fp8_rows.STAGES = saved


def same_outputs(got: tuple, want: tuple) -> bool:
    """Every output equal, but the partial column sums (one row per program, float32): equal once summed."""
    return all(torch.equal(a.float(), b.float()) if a.dtype != torch.float32 or a.dim() == 1
               else torch.allclose(a.sum(0), b.sum(0), rtol=1e-5, atol=1e-3) for a, b in zip(got, want))


def programs_bytes(m: int, dev: torch.device, width: int) -> int:
    """The partial column sums' bytes (one float32 row per program)."""
    return fp8_rows.programs_per_rows(m, dev)[1] * width * 4


if __name__ == "__main__":
    main()
