"""A second CUDA stream for the backward's weight-gradient products, which nothing else in the layer's backward
waits for: run beside the products and kernels that carry the gradient on to the layer below, they fill the
multiprocessors those leave idle at the end of each wave.

Measured at DiT-XL/2 batch-128 shapes (``benchmarks/stream_overlap.py``, H100): a hand-written copy of the fused
MLP's backward took 2.100 ms in order and 1.989 with ∂W₂ and ∂W₁ on the side stream; the library's operator, timed
later on power-capped H100s, −0.097 to +0.161 ms per layer (the in-order time itself 2.006–2.656 ms), so its gain is
inside the noise; its outputs are bit-equal either way.  A memory-bound kernel beside a ∂W product
gained nothing (the norm backward next to fc1's ∂W: 0.691 ms in order, 0.698 at once): the gain is the products'
tails, not bandwidth shared with arithmetic.

Use: ``with beside(side):`` forks (the side stream waits for all the current stream has queued), ``join(side)``
makes the current stream wait for the side's work.  Every tensor the side's work reads or writes is then
ordered: it is made before the fork and used (or freed) after the join.  Captured into a CUDA graph, the fork and
the join become the graph's edges.  ``None`` for ``side`` (a CPU tensor, or the overlap switched off) runs the
work in place.
"""
from __future__ import annotations

import contextlib

import torch

_streams: dict[int, torch.cuda.Stream] = {}  # one per device: the caching allocator keeps each stream's blocks apart


def side_stream(device: torch.device, wanted: bool = True) -> torch.cuda.Stream | None:
    """The side stream of ``device`` (made once), or None off CUDA or where not ``wanted``."""
    if not wanted or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _streams:
        _streams[index] = torch.cuda.Stream(device=index)
    return _streams[index]


@contextlib.contextmanager
def beside(side: torch.cuda.Stream | None):
    """Queue the block's work on ``side`` after everything queued so far on the current stream."""
    if side is None:
        yield
        return
    side.wait_stream(torch.cuda.current_stream(side.device))
    with torch.cuda.stream(side):
        yield


def join(side: torch.cuda.Stream | None) -> None:
    """The current stream waits for everything queued on ``side``."""
    if side is not None:
        torch.cuda.current_stream(side.device).wait_stream(side)
