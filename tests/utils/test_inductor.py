"""ditkit.utils.inductor: which reductions PersistentRows keeps in registers, and that it can be
switched on and off around a compilation."""
from types import SimpleNamespace

import sympy
import torch
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

from ditkit.utils.inductor import PersistentRows, persistent_rows


def _choose(hint: ReductionHint, numel: int) -> bool:
    features = SimpleNamespace(get_reduction_hint=lambda: hint, reduction_numel=sympy.Integer(numel))
    sizevars = SimpleNamespace(statically_known_leq=lambda a, b: bool(a <= b))
    with V.set_graph_handler(SimpleNamespace(sizevars=sizevars)):
        return PersistentRows.should_use_persistent_reduction(features, False)


def test_inner_rows_up_to_2048_are_persistent():
    assert _choose(ReductionHint.INNER, 1152)  # DiT-XL's rows: inductor's own limit is 1024
    assert _choose(ReductionHint.INNER, 2048)
    assert not _choose(ReductionHint.INNER, 4608)  # longer rows: inductor's choice (looped)
    assert not _choose(ReductionHint.DEFAULT, 1152)  # other reductions: inductor's choice (at most 64 persistent)


def test_switching_on_and_off_around_a_compilation():
    persistent_rows(True)
    try:
        assert isinstance(V.choices, PersistentRows)
        f = torch.compile(lambda x: torch.nn.functional.layer_norm(x, (40,)) * 2)
        x = torch.randn(3, 40)
        torch.testing.assert_close(f(x), torch.nn.functional.layer_norm(x, (40,)) * 2)
    finally:
        persistent_rows(False)
    assert not isinstance(V.choices, PersistentRows)
