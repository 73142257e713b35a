"""The command line shared by the benchmarks with known answers (``benchmarks/digit_numbers.py``,
``benchmarks/moving_digits.py``): three subcommands, ``data`` (write the training set), ``train`` (a custom DiT
through ``ditkit.train``) and ``score`` (sample the run and score it against the known answer), with ``--out`` and
``--device`` before them."""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch


def three_step_parser(description: str, out: str, what: str, steps: int) -> tuple[argparse.ArgumentParser, ...]:
    """(the parser, and its ``data``, ``train`` and ``score`` subparsers with their common options); ``what`` names
    the training samples in the help ("numbers", "clips"), ``steps`` is the default of ``train --steps``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default=out)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sub = ap.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write --out/data from the training digits")
    data.add_argument("--num", type=int, default=30000, help=f"training {what}")
    data.add_argument("--seed", type=int, default=0)
    train = sub.add_parser("train", help="train --out/run on --out/data")
    train.add_argument("--steps", type=int, default=steps)
    train.add_argument("--batch", type=int, default=256, help="train.global_batch_size")
    train.add_argument("--hidden", type=int, default=256, help="model.hidden_size")
    train.add_argument("--depth", type=int, default=6, help="model.depth")
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further config overrides")
    score = sub.add_parser("score", help=f"sample the test {what} from --out/run and score them")
    score.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    score.add_argument("--sample-steps", type=int, default=None, help="sampling steps (default: the run's sample.steps)")
    return ap, data, train, score


def run_step(args: argparse.Namespace, write_data: Callable[[Path], str], train_config: Callable, score: Callable):
    """The subcommand ``args.command`` of a ``three_step_parser``: ``data`` prints ``write_data(out/data)``'s line;
    ``train`` runs ``ditkit.train`` on ``train_config(out/data, steps, batch, hidden, depth, overrides)`` into
    out/run and prints its wall time; ``score`` returns ``score(args)``."""
    import ditkit

    out = Path(args.out)
    if args.command == "data":
        print(write_data(out / "data"))
    elif args.command == "train":
        cfg = train_config(out / "data", args.steps, args.batch, args.hidden, args.depth, args.set)
        t0 = time.perf_counter()
        ditkit.train(cfg, out / "run", device=args.device)
        print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s into {out / 'run'}")
    else:
        return score(args)
