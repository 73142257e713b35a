"""Swapping a model's modules for fused or quantized forms: where a module sits, a subclass that shares
another's submodules (or the same module retyped), and the dtype a layer computes in."""
from __future__ import annotations

import torch
from torch import nn

AUTOCAST_CAST = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # layers whose weights autocast casts to its dtype on every call


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the qualified ``name`` points inside ``model``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def rebuilt_as(cls: type[nn.Module], module: nn.Module) -> nn.Module:
    """A ``cls`` holding ``module``'s own submodules (same Parameters, same state dict), for a subclass
    that only changes ``forward``."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, child in module.named_children():
        setattr(new, name, child)
    return new.train(module.training)


def swap_modules(model: nn.Module, classes: dict[type[nn.Module], type[nn.Module]]) -> int:
    """Rebuild every submodule whose exact type is a key of ``classes`` as the class it maps to (``rebuilt_as``,
    in place); returns how many."""
    targets = [(n, m) for n, m in model.named_modules() if type(m) in classes]
    for name, m in targets:
        replace_module(model, name, rebuilt_as(classes[type(m)], m))
    return len(targets)


def retype_modules(model: nn.Module, classes: dict[type[nn.Module], type[nn.Module]]) -> int:
    """Give every submodule whose exact type is a key of ``classes`` the class it maps to, in place (the same
    object: its Parameters, buffers and attributes stay), for a subclass that only changes methods; returns
    how many.  Unlike ``swap_modules`` this also suits modules that hold Parameters themselves (``nn.Linear``)."""
    targets = [m for m in model.modules() if type(m) in classes]
    for m in targets:
        m.__class__ = classes[type(m)]
    return len(targets)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in at this point: autocast's, else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
