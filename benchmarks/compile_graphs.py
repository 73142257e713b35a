"""How many graphs torch.compile makes of the flow loss on sequences of mixed lengths: a 1D DiT (patch 8, up to
1,024 positions) trained on batches drawn as the length buckets draw them (most of one length, some of two, then
padded with a mask), through ``ditkit.fast.compiled_loss.CompiledLoss``.  Prints the length/mask cases seen and the
graphs made; every graph is a compilation, and with CUDA graphs each case is also recorded once.

    PYTHONPATH=src python benchmarks/compile_graphs.py [--steps 40] [--backend aot_eager]

The aot_eager backend makes the same graphs as inductor without generating kernels, so it runs on a CPU."""
from __future__ import annotations

import argparse
import random

import torch

from ditkit.fast.compiled_loss import CompiledLoss
from ditkit.models.dit import DiT
from ditkit.objectives.flow import FlowMatching

LENGTHS = (64, 128, 256, 512, 1024)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--backend", default="aot_eager")
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args(argv)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    rng = random.Random(0)
    model = DiT(input_size=[max(LENGTHS)], patch_size=8, in_channels=2, hidden_size=64, depth=2, num_heads=2,
                num_classes=0, learn_sigma=False, num_params=2)
    loss = CompiledLoss(FlowMatching(), backend=args.backend).loss
    cases = set()
    for _ in range(args.steps):
        one = rng.random() < 0.5  # a bucket of one length, or of two
        lengths = [rng.choice(LENGTHS)] * args.batch if one else [rng.choice(LENGTHS) for _ in range(args.batch)]
        longest = max(lengths)
        mask = torch.arange(longest) < torch.tensor(lengths)[:, None] if len(set(lengths)) > 1 else None
        x = torch.randn(args.batch, 2, longest)
        loss(model, x, {"params": torch.randn(args.batch, 2)}, mask=mask)["loss"].mean().backward()
        cases.add((longest, mask is not None))
    graphs = counters["stats"]["unique_graphs"]
    print(f"{len(cases)} length/mask cases over {args.steps} steps -> {graphs} graphs ({args.backend}); "
          f"torch {torch.__version__}")
    return {"cases": len(cases), "graphs": graphs}


if __name__ == "__main__":
    main()
