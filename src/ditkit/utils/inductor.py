"""Inductor's choice of persistent reductions, widened for DiT-XL's rows (``train.persistent_rows``).

Inductor keeps a row in registers (a persistent reduction: the row is read once) only for rows of
at most 1024 elements (reductions along contiguous rows: INNER).  DiT-XL's hidden size is 1152, so its LayerNorm
kernels (with the residual add and the adaLN modulation fused in) reduce in a loop and read each row
again to normalize it.  ``persistent_rows(True)``: INNER rows up to 2048 elements.  The same
kernels, another order of summation within a row: the results differ by float rounding only.

Only INNER: with every hint but OUTER (one XL block's step at batch 128: 7.84 → 7.62 ms,
``benchmarks/fp8_block.py``), whole training steps got slower (XL/2 b128 564 → 502 img/s, B/2
2,519 → 2,122, H100): some token-wise sums of the backward do not fit a persistent kernel.
"""
from __future__ import annotations

from torch._inductor import config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

MAX_ROW = 2048


class PersistentRows(InductorChoices):
    @staticmethod
    def uuid() -> str:  # part of inductor's cache key
        return f"ditkit.utils.inductor.PersistentRows({MAX_ROW})"

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction):
        if (not cooperative_reduction and features.get_reduction_hint() == ReductionHint.INNER
                and V.graph.sizevars.statically_known_leq(features.reduction_numel, MAX_ROW)):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)


def persistent_rows(on: bool) -> None:
    """From now on, inductor compiles with ``PersistentRows`` (``on``) or its own choices."""
    if hasattr(config, "inductor_choices_class"):  # threads that start compiling later (a lazily compiled backward)
        config.inductor_choices_class = PersistentRows if on else None
    V.set_choices_handler(PersistentRows() if on else InductorChoices())
