"""The end of a DiT-XL/2 training step with bf16 weights and float32 masters (``TrainSpeed.master_weights``,
``ditkit.fast.master_weights``) on a GPU: exact against its torch equations at full size, and its
parts' GPU time and bandwidth next to the plain path's (fused AdamW, foreach EMA, gradient norm).

    PYTHONPATH=src python benchmarks/master_weights_check.py [--model DiT-XL/2] [--sweep]

Random gradients (bf16 for the layers autocast casts, float32 for the rest).  Checks, after 3 steps:
the flat update equals ``adamw_ema_reference`` run on copies of the same buffers (float32 state to
2e-6, the bf16 weights bit for bit as the rounded masters), and the Triton sum of squares equals
the float64 norm to 1e-5.  Times are CUDA-event medians of 20 calls; GB/s counts the bytes each pass must
move.  Exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
from bench import median_ms, rel_err  # benchmarks/, on the path when run as a script

from ditkit.fast.master_weights import MasterWeightAdamW, step_scalars
from ditkit.kernels import master as master_kernels
from ditkit.models.dit import build_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--sweep", action="store_true", help="also time the AdamW + EMA kernel at other launch configurations")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(args.model, input_size=32).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]

    # The plain path first, on the float32 model: fused AdamW, the foreach EMA, the gradient norm.
    for p in trained:
        p.grad = torch.randn_like(p) * 1e-3
    plain = torch.optim.AdamW(trained, lr=1e-4, fused=True)
    ema_named = dict(ema.named_parameters())  # the EMA parameter of each trained one, in the same order
    ema_params = [ema_named[n] for n, p in model.named_parameters() if p.requires_grad]
    rows = [("plain: fused AdamW", median_ms(plain.step, 20, device), 28),
            ("plain: EMA (foreach lerp)", median_ms(lambda: torch._foreach_lerp_(ema_params, trained, 1e-4), 20, device), 12),
            ("plain: gradient norm", median_ms(lambda: torch.nn.utils.get_total_norm([p.grad for p in trained]), 20, device), 4)]
    del plain
    for p in trained:
        p.grad = None
    torch.cuda.empty_cache()

    opt = MasterWeightAdamW(model, ema, lr=1e-4, max_norm=1.0)
    low = opt.groups[0]
    print(f"{args.model}: {sum(g.master.numel() for g in opt.groups) / 1e6:.1f} M trained parameters, "
          f"{low.master.numel() / 1e6:.1f} M of them stored in bf16")
    for p in trained:
        p.grad = (torch.randn_like(p, dtype=torch.float32) * 1e-3).to(p.dtype)
    for _ in range(2):
        opt.step()
    ok = True
    grads = [p.grad for p in low.params]
    table, _ = master_kernels.pointer_table(grads, device)
    ref = {k: getattr(low, k).clone() for k in ("master", "exp_avg", "exp_avg_sq", "ema", "weights")}
    norm = master_kernels.sum_squares_triton(table, torch.bfloat16, low.layout).sqrt()  # the bf16 group's norm
    exact_norm = torch.stack([g.double().square().sum() for g in grads]).sum().sqrt()  # torch's foreach norm rounds bf16 norms
    scalars = step_scalars(norm, opt.step_count + 1, 1e-4, (0.9, 0.999), 0.0, 1.0, 0.9999)

    def update() -> None:
        master_kernels.adamw_ema_triton(table, torch.bfloat16, low.layout, low.master, low.exp_avg, low.exp_avg_sq, low.ema,
                                        low.weights, scalars, 0.9, 0.999, 1e-8)

    update()
    master_kernels.adamw_ema_reference(grads, low.layout, ref["master"], ref["exp_avg"], ref["exp_avg_sq"], ref["ema"],
                                       ref["weights"], scalars, 0.9, 0.999, 1e-8)
    checks = [("gradient norm vs float64", rel_err(norm, exact_norm), 1e-5)]
    got_master = master_kernels.join_master(low.weights, low.master)
    ref_master = master_kernels.join_master(ref["weights"], ref["master"])
    for key, a, b in [("master", got_master, ref_master)] + [(k, getattr(low, k), ref[k]) for k in ("exp_avg", "exp_avg_sq", "ema")]:
        checks.append((f"{key} vs reference", (a - b).abs().max().item() / b.abs().max().item(), 2e-6))
    checks.append(("bf16 weights == rounded masters (mismatches)", float((low.weights != got_master.bfloat16()).sum()), 0.0))
    del got_master, ref_master, ref
    for name, value, limit in checks:
        ok &= value <= limit
        print(f"{name}: {value:.3g} (limit {limit:g}) {'ok' if value <= limit else 'FAIL'}")

    n_low = sum(p.numel() for p in low.params)
    rows += [("bf16 weights: the gradients' address table", median_ms(lambda: master_kernels.pointer_table(grads, device),
                                                                     20, device), None),
             ("bf16 weights: sum of squares (Triton)", median_ms(
                 lambda: master_kernels.sum_squares_triton(table, torch.bfloat16, low.layout), 20, device), 2),
             ("bf16 weights: AdamW + EMA + bf16 copy (Triton)", median_ms(update, 20, device), 34),
             ("bf16 weights: whole opt.step (both groups, scalars)", median_ms(opt.step, 20, device), None)]
    numels = [p.numel() for p in low.params]
    for block, warps in [(b, w) for b in (1024, 2048, 4096) for w in (4, 8)] if args.sweep else []:
        layout = master_kernels.flat_layout(numels, device, block, warps)
        ms = median_ms(lambda: master_kernels.adamw_ema_triton(table, torch.bfloat16, layout, low.master, low.exp_avg,
                                                               low.exp_avg_sq, low.ema, low.weights, scalars, 0.9, 0.999,
                                                               1e-8), 20, device)
        rows.append((f"bf16 weights: AdamW + EMA, {block} elements and {warps} warps per program", ms, 34))
    print("\n| pass | ms | bytes/param | GB/s |\n| --- | --- | --- | --- |")
    n_all = sum(p.numel() for p in trained)
    for name, ms, per_param in rows:
        n = n_low if name.startswith("bf16 weights:") else n_all
        gbs = f"{per_param * n / ms / 1e6:,.0f}" if per_param else "—"
        print(f"| {name} | {ms:.2f} | {per_param or '—'} | {gbs} |")
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
