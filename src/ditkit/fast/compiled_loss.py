"""``TrainSpeed.compile_loss``: the training loss compiled as one function with the network inside it.

``TrainSpeed.compile`` alone compiles the network; the objective's draws (t, the noise), the noising and the
loss terms around it (the DDPM hybrid loss: MSE and the variational bound) then run eagerly, as ~190
small kernels per step forward and backward.  Compiled with the network, they fuse into a few kernels
inside the same graphs (with CUDA graphs, the same replays).  Measured on an H100 at DiT-XL/2 batch 32:
1,432 → 1,244 kernels per step, the host's time to issue a step 22.8 → 14.1 ms, 545.4 → 548.9 img/s
(``benchmarks/bench.py`` lever ``+loss``).  The random draws come from compiled code, so they differ
from an eager run's with the same seed (as with any compiled random op).
"""
from __future__ import annotations

import torch


class CompiledLoss:
    """``objective`` whose ``loss(model, x0, model_kwargs)`` is ``torch.compile``d (``compile_kwargs``): the
    model's forward is traced into it.  Everything else (sampling) stays with ``objective``."""

    def __init__(self, objective, **compile_kwargs):
        self.objective = objective
        self.loss = torch.compile(objective.loss, **compile_kwargs)
