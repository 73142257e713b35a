"""The cosmology framework's spelling of a DiT, building ditkit's own network.

That framework writes its model as

    DiT(input_size=128, patch_size=4, in_channels=3, hidden_size=384, depth=12, num_heads=6,
        mlp_ratio=4.0, cond_channels=4, use_cross_attention=True, n_params=6)

and ``from ditkit.models.cosmology import DiT`` accepts exactly that call.  Each argument maps onto
an argument of ``ditkit.models.dit.DiT``; the result is that class, with its state dict, forward
``(x, t, params=..., field=...)``, checkpoints and fast paths.  The defaults are the ``cosmo128``
preset's, so ``DiT()`` is the cosmology setting's DiT-S/4.
"""
from __future__ import annotations

import inspect
from typing import Sequence

from ditkit.models.dit import DiT as _DiT

# The framework's names that ditkit spells differently; the others are ditkit's names already.
RENAMED = {"n_params": "num_params", "use_cross_attention": "field_mode"}


def DiT(
    input_size: int | Sequence[int] = 128,
    patch_size: int = 4,
    in_channels: int = 3,
    hidden_size: int = 384,
    depth: int = 12,
    num_heads: int = 6,
    mlp_ratio: float = 4.0,
    cond_channels: int = 4,
    use_cross_attention: bool = True,
    n_params: int = 6,
    *,
    learn_sigma: bool = True,
    param_dropout_prob: float = 0.1,
    **unknown,
) -> _DiT:
    """ditkit's ``DiT`` from the framework's arguments:

    - ``in_channels``: the generated fields (e.g. DM_hydro, Gas, Stars);
    - ``cond_channels``: spatial conditioning fields of the input's size (e.g. DM + 3 large-scale);
    - ``use_cross_attention``: the blocks cross-attend to the conditioning fields' tokens
      (``field_mode="cross_attention"``); false concatenates the fields to the input channels
      (``field_mode="concat"``), the framework's other way;
    - ``n_params``: the length of the vector of cosmological parameters (``num_params``), embedded
      into adaLN's conditioning vector c = t + p;
    - no class labels (``num_classes=0``).

    ``learn_sigma`` and ``param_dropout_prob`` are ditkit's own (the ``cosmo128`` values); any
    other keyword is refused, so a misspelt argument never builds a different model silently."""
    if unknown:
        accepted = [n for n, a in inspect.signature(DiT).parameters.items() if a.kind != a.VAR_KEYWORD]
        hint = "; ".join(f"{k} is spelt {a} here" for a, k in RENAMED.items() if k in unknown)
        raise ValueError(f"unknown argument(s) {', '.join(sorted(unknown))} of the cosmology DiT; it accepts "
                         f"{', '.join(accepted)}" + (f" ({hint})" if hint else ""))
    return _DiT(
        input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=0, learn_sigma=learn_sigma, num_params=n_params,
        param_dropout_prob=param_dropout_prob, cond_channels=cond_channels,
        field_mode="cross_attention" if use_cross_attention else "concat",
    )


__all__ = ["DiT"]
