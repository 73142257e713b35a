"""Which samples each process sees at each step, as a pure function of (seed, step).

The global batch of a step is split into ``world_size × grad_accum`` shards; rank r takes shards
r·A … r·A + A − 1.  Because the split depends only on the step, a 2-process run and a 1-process
run with 2 accumulation steps see the same samples in the same shards, and a resumed run
continues exactly where the interrupted one stopped (no sampler state to save).
"""
from __future__ import annotations

from typing import Iterator

import torch


def step_seed(seed: int, step: int, shard: int) -> int:
    """A distinct 63-bit seed for the random draws (noise, t, label dropout) of one shard."""
    return ((seed * 1_000_003 + step) * 4099 + shard) % (2**63 - 1)


class ShardBatchSampler:
    """Yields this rank's micro-batches, step after step from ``start_step``, as lists of
    (epoch, index) keys (the epoch seeds each sample's augmentation, see ``EpochIndexed``).

    Epoch e is a permutation of the ``num_samples`` indices seeded by (seed, e).  The last
    incomplete global batch of an epoch is dropped.  With ``lengths`` (one per sample) and ``buckets`` > 0, each
    window of ``buckets`` global batches of the permutation is sorted by length and its batches are shuffled: an
    epoch holds the same samples, and a batch sequences of like lengths (little padding)."""

    def __init__(self, num_samples: int, global_batch_size: int, rank: int = 0, world_size: int = 1,
                 grad_accum: int = 1, seed: int = 0, start_step: int = 0, lengths=None, buckets: int = 0):
        shards = world_size * grad_accum
        if global_batch_size % shards:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                             f"world size × grad_accum = {world_size} × {grad_accum}")
        self.n = num_samples
        if self.n < global_batch_size:
            raise ValueError(f"dataset of {self.n} samples is smaller than the global batch size {global_batch_size}")
        self.global_batch_size = global_batch_size
        self.micro = global_batch_size // shards
        self.first_shard = rank * grad_accum
        self.grad_accum = grad_accum
        self.seed = seed
        self.step = start_step
        self.steps_per_epoch = self.n // global_batch_size
        self.lengths = None if lengths is None or buckets <= 0 else torch.as_tensor(lengths)
        self.buckets = buckets

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step_seed(self.seed, epoch, 7919))
        perm = torch.randperm(self.n, generator=g)
        if self.lengths is None:
            return perm
        G, used = self.global_batch_size, self.steps_per_epoch * self.global_batch_size
        windows = []
        for lo in range(0, used, self.buckets * G):
            w = perm[lo: min(lo + self.buckets * G, used)]
            w = w[torch.argsort(self.lengths[w], stable=True)].view(-1, G)  # (batches, G), by length
            windows.append(w[torch.randperm(len(w), generator=g)].reshape(-1))
        return torch.cat([*windows, perm[used:]])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, perm = -1, None
        while True:
            e, offset = divmod(self.step, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self._permutation(e)
            start = offset * self.global_batch_size
            for m in range(self.grad_accum):
                lo = start + (self.first_shard + m) * self.micro
                yield [(e, i) for i in perm[lo: lo + self.micro].tolist()]
            self.step += 1
