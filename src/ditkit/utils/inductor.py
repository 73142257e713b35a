"""Inductor's choice of persistent reductions, widened for DiT-XL's rows (``train.persistent_rows``).

Inductor keeps a row in registers (a persistent reduction: the row is read once) only for rows of
at most 1024 elements, and for those it calls INNER.  DiT-XL's hidden size is 1152, so its LayerNorm
kernels (with the residual add and the adaLN modulation fused in) reduce in a loop and read each row
again to normalize it.  ``persistent_rows(True)``: up to 2048 elements, whatever inductor's hint
(but OUTER).  Measured on one XL block's compiled training step at batch 128 (H100,
``benchmarks/fp8_block.py``): 7.84 → 7.62 ms.  The same kernels, another order of summation within
a row: the results differ by float rounding only.
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
        if (not cooperative_reduction and features.get_reduction_hint() != ReductionHint.OUTER
                and V.graph.sizevars.statically_known_leq(features.reduction_numel, MAX_ROW)):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)


def persistent_rows(on: bool) -> None:
    """From now on, inductor compiles with ``PersistentRows`` (``on``) or its own choices."""
    if hasattr(config, "inductor_choices_class"):  # threads that start compiling later (a lazily compiled backward)
        config.inductor_choices_class = PersistentRows if on else None
    V.set_choices_handler(PersistentRows() if on else InductorChoices())
