"""One check shared by the data tests: a run trained in one go and a run stopped half-way and resumed log the same
losses and end with the same EMA weights."""
import json
from pathlib import Path

import numpy as np
import torch

import ditkit
from ditkit.checkpoints.training import load_checkpoint


def assert_resumes_exactly(config, root: Path, steps: int) -> tuple[dict, Path]:
    """``config(*overrides)`` builds the run's config; trains ``steps`` into root/ref, and steps // 2 then ``steps``
    with resume into root/run.  Returns (the reference's last checkpoint, loaded; its path)."""
    ref, run = root / "ref", root / "run"
    ditkit.train(config(f"train.steps={steps}"), ref, device="cpu")
    ditkit.train(config(f"train.steps={steps // 2}"), run, device="cpu")
    ditkit.train(config(f"train.steps={steps}"), run, device="cpu", resume=True)
    losses = [[json.loads(r)["loss"] for r in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, run)]
    assert len(losses[0]) == steps and all(np.isfinite(losses[0])) and losses[0] == losses[1]
    a, b = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (ref, run))
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    return a, ref / "checkpoints" / "last.pt"
