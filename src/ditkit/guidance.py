"""Classifier-free guidance as a wrapper around any conditional network.

The wrapper evaluates the network on [x; x] with the conditioning kept on the first half and
dropped on the second (``force_drop_ids``: labels -> null class, params and fields -> their
learned nulls), then returns  out_u + s (out_c − out_u)  on the guided channels.  Samplers call
the wrapper like the network itself, ``fn(x, t) -> output``, so they never know guidance exists.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NFECounter:
    """Counts network function evaluations (one per batch the network is called on)."""

    def __init__(self) -> None:
        self.nfe = 0


def conditional_fn(model: nn.Module, model_kwargs: dict | None = None, counter: NFECounter | None = None) -> ModelFn:
    """fn(x, t) = model(x, t, **model_kwargs), no guidance."""
    kwargs = model_kwargs or {}

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if counter is not None:
            counter.nfe += 1
        return model(x, t, **kwargs)

    return fn


def guided_fn(
    model: nn.Module,
    model_kwargs: dict,
    cfg_scale: float,
    guided_channels: int | None = None,
    interval: tuple[float, float] | None = None,
    noise_level: Callable[[torch.Tensor], torch.Tensor] | None = None,
    counter: NFECounter | None = None,
) -> ModelFn:
    """fn(x, t) = out_u + s·(out_c − out_u) on the first ``guided_channels`` output channels
    (``None``: the input's channel count, i.e. ε or v but never the learned variance, which is
    taken from the conditional half).

    ``interval=(a, b)`` guides only where the noise level lies in [a, b] (Kynkäänniemi et al.
    2024), with ``noise_level(t)`` mapping network time to [0, 1] (1 = pure noise); elsewhere the
    conditional output alone is used, costing one evaluation instead of two."""
    if cfg_scale == 1.0:
        return conditional_fn(model, model_kwargs, counter)
    if interval is not None and noise_level is None:
        raise ValueError("a guidance interval needs the objective's noise_level(t)")

    def doubled(v):
        return torch.cat([v, v], dim=0) if torch.is_tensor(v) else v

    kwargs2 = {k: doubled(v) for k, v in model_kwargs.items()}

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if interval is not None:
            level = noise_level(t[:1]).item()  # one host read per step, outside the network call
            if not interval[0] <= level <= interval[1]:
                if counter is not None:
                    counter.nfe += 1
                return model(x, t, **model_kwargs)
        if counter is not None:
            counter.nfe += 1  # the doubled batch is one evaluation of the network, as in ADM/DiT
        B = x.shape[0]
        if guided_channels is not None and guided_channels > x.shape[1]:
            raise ValueError(f"guided_channels={guided_channels} exceeds the {x.shape[1]} predicted channels: "
                             "guidance would reach the learned variance")
        drop = torch.cat([torch.zeros(B, dtype=torch.long, device=x.device), torch.ones(B, dtype=torch.long, device=x.device)])
        out = model(torch.cat([x, x]), torch.cat([t, t]), **kwargs2, force_drop_ids=drop)
        cond, uncond = out[:B], out[B:]
        k = x.shape[1] if guided_channels is None else guided_channels
        guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)

    return fn
