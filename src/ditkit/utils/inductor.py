"""Inductor choices ditkit makes for its compiled training step.

Inductor keeps a row in registers (a persistent reduction: one read of the row) only for rows of
at most 1024 elements; longer rows are reduced in a loop and read again to normalize.  DiT-XL's
hidden size is 1152, so every LayerNorm, modulation and residual kernel of XL (and their
gradients) takes the looped form, while B (768) gets the persistent one.  ``persistent_rows``
raises that limit for inner (row) reductions; ``train.persistent_rows`` in ``ditkit train``.
"""
from __future__ import annotations


def persistent_rows(max_row: int | None = 2048) -> None:
    """From now on, inductor uses persistent reductions for rows of up to ``max_row`` elements
    (``None``: inductor's own choices again)."""
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    if max_row is None:
        if hasattr(config, "inductor_choices_class"):
            config.inductor_choices_class = None
        V.set_choices_handler(InductorChoices())
        return

    class PersistentRows(InductorChoices):
        @staticmethod
        def uuid() -> str:  # part of inductor's cache key
            return f"ditkit.persistent_rows({max_row})"

        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction):
            if (config.triton.persistent_reductions and not cooperative_reduction
                    and features.get_reduction_hint() == ReductionHint.INNER
                    and V.graph.sizevars.statically_known_leq(features.reduction_numel, max_row)):
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    if hasattr(config, "inductor_choices_class"):  # threads that compile later (a lazily compiled backward)
        config.inductor_choices_class = PersistentRows
    V.set_choices_handler(PersistentRows())
