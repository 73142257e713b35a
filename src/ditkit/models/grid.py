"""Token grids: how an input with 1, 2 or 3 axes, (B, C, L), (B, C, H, W) or (B, C, T, H, W), becomes a
sequence of patch tokens (B, N, D) and back.

All of the DiT's bookkeeping between the two lives here: the size and the patch along each axis, the
token order (row-major over the patch grid, the last axis fastest, as the official ``flatten(2)``), the
layout of a token's patch values and each token's coordinates, which the position tables and RoPE read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

AXES = {1: ("L",), 2: ("H", "W"), 3: ("T", "H", "W")}  # the names of an input's axes, by their number


def as_size(size: int | Sequence[int], dims: int = 2) -> tuple[int, ...]:
    """A size per axis: an int is the same on each of ``dims`` axes (2 unless given: a square image), a
    sequence is taken as it is."""
    if isinstance(size, int):
        return (size,) * dims
    return tuple(int(s) for s in size)


def token_coords(shape: Sequence[int], device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """The index of each token along each axis of a patch grid of ``shape``, in token order: one (N,)
    tensor per axis."""
    axes = torch.meshgrid(*[torch.arange(n, device=device) for n in shape], indexing="ij")
    return tuple(a.reshape(-1) for a in axes)


@dataclass(frozen=True)
class TokenGrid:
    """An input of spatial ``size`` cut into patches of ``patch`` (one entry per axis each)."""

    size: tuple[int, ...]
    patch: tuple[int, ...]

    @classmethod
    def of(cls, input_size: int | Sequence[int], patch_size: int | Sequence[int]) -> "TokenGrid":
        """The grid of a model built for ``input_size`` (a sequence: one size per axis, its length the number of
        axes; an int: the same size on every axis of a patch given per axis, else a square H × W) and
        ``patch_size`` (an int for every axis, or one per axis).  A ``ValueError`` names the axis that does not
        fit."""
        size = as_size(input_size, len(patch_size) if isinstance(patch_size, (list, tuple)) else 2)
        if not 1 <= len(size) <= 3:
            raise ValueError(f"input_size must be an int or 1 to 3 sizes (L | H, W | T, H, W), got {input_size!r}")
        patch = as_size(patch_size, len(size))
        if len(patch) != len(size):
            raise ValueError(f"patch_size {patch_size!r} has {len(patch)} axes but the input has {len(size)} "
                             f"({', '.join(AXES[len(size)])}): give one patch size per axis, or one int")
        for what, values in (("input_size", size), ("patch_size", patch)):
            if any(v < 1 for v in values):
                raise ValueError(f"{what} must be positive on every axis, got {values}")
        for axis, (n, p, name) in enumerate(zip(size, patch, AXES[len(size)])):
            if n % p:
                raise ValueError(f"input axis {axis} ({name}) has size {n}, not divisible by patch size {p}")
        return cls(size, patch)

    @property
    def dims(self) -> int:
        return len(self.size)

    @property
    def axes(self) -> tuple[str, ...]:
        return AXES[self.dims]

    @property
    def shape(self) -> tuple[int, ...]:
        """Tokens along each axis."""
        return tuple(n // p for n, p in zip(self.size, self.patch))

    @property
    def num_tokens(self) -> int:
        return math.prod(self.shape)

    @property
    def patch_numel(self) -> int:
        """Cells in one patch (p·p in 2D)."""
        return math.prod(self.patch)

    def coords(self, device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
        """``token_coords`` of this grid: each token's index along each axis, (N,) per axis."""
        return token_coords(self.shape, device)

    def check(self, x: torch.Tensor, name: str = "input") -> None:
        """A ``ValueError`` unless x is (B, C, *size)."""
        if x.ndim != 2 + self.dims or tuple(x.shape[2:]) != self.size:
            expected = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.size))
            raise ValueError(f"{name} of shape {tuple(x.shape)}; the model takes (B, C, {', '.join(self.axes)}) "
                             f"with {expected}")

    def of_input(self, x: torch.Tensor) -> "TokenGrid":
        """The grid of input x: this one, or for an input no larger than the model's size on any axis (a batch
        padded to its longest sequence or largest volume, smaller than the model's size) the grid of its own size,
        whose tokens keep their positions from the origin of every axis.  A ``ValueError`` for any other shape,
        naming the axis that is not a multiple of its patch."""
        size = tuple(x.shape[2:])
        if x.ndim == 2 + self.dims and size != self.size and all(0 < n <= m for n, m in zip(size, self.size)):
            for axis, (n, p, name) in enumerate(zip(size, self.patch, self.axes)):
                if n % p:
                    what = "sequence length" if self.dims == 1 else f"input axis {axis} ({name}) has size"
                    raise ValueError(f"{what} {n} is not a multiple of the patch size {p}: pad every sample (and "
                                     "its mask) to a multiple of the patch size")
            return TokenGrid(size, self.patch)
        self.check(x)
        return self

    def token_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A (B, *size) mask over an input's positions (True = real): (B, L) for sequences, (B, T, H, W) for volumes
        -> (B, N) over its tokens.  A token is real when all its patch's positions are, so each sample's extent must
        be a multiple of the patch on every axis and every sample needs a real token (a query with no key to attend
        to would be NaN): a ``ValueError`` says which rule is broken.  Under ``torch.compile`` the rules are not
        read back (a host read would split the compiled graph every step); the trainer's masks come from the
        collate (``ditkit.data.sequences.pad_batch``), which pads each sample to a multiple of the patch."""
        B = mask.shape[0]
        if mask.dtype != torch.bool or tuple(mask.shape) != (B, *self.size):
            raise ValueError(f"mask must be a bool tensor of shape (B, {', '.join(self.axes)}) = "
                             f"({B}, {', '.join(map(str, self.size))}), got {mask.dtype} {tuple(mask.shape)}")
        cells = self.patchify(mask[:, None])  # (B, N, cells per patch)
        tokens = cells.all(dim=-1)  # (B, N)
        if torch.compiler.is_compiling():
            return tokens
        partial, empty = (cells.any(dim=-1) != tokens).any(), ~tokens.any(dim=-1).all()
        if bool(partial | empty):  # one read on the host for both rules
            what = "a sequence whose length is" if self.dims == 1 else "a sample whose extent is"
            if bool(partial):
                raise ValueError(f"mask has {what} not a multiple of the patch size {'×'.join(map(str, self.patch))}: "
                                 "pad every sample (and its mask) to a multiple of the patch size")
            raise ValueError(f"mask has {what.split(' whose')[0]} without any real position: every sample needs at "
                             "least one token")
        return tokens

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *size) -> (B, N, patch_numel·C): each token's values in the order (p_0, …, p_{d−1}, C),
        that of the final layer's output."""
        B, C, d = x.shape[0], x.shape[1], self.dims
        x = x.reshape(B, C, *[v for g, p in zip(self.shape, self.patch) for v in (g, p)])  # (B, C, g0, p0, g1, p1, …)
        x = x.permute(0, *range(2, 2 + 2 * d, 2), *range(3, 3 + 2 * d, 2), 1)  # (B, g0, g1, …, p0, p1, …, C)
        return x.reshape(B, self.num_tokens, self.patch_numel * C)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, patch_numel·C) -> (B, C, *size), the inverse of ``patchify``; in 2D the official
        ``einsum("nhwpqc->nchpwq")``."""
        B, d = tokens.shape[0], self.dims
        C = tokens.shape[-1] // self.patch_numel
        x = tokens.reshape(B, *self.shape, *self.patch, C)  # (B, g0, g1, …, p0, p1, …, C)
        x = x.permute(0, 2 * d + 1, *[v for a in range(d) for v in (1 + a, 1 + d + a)])  # (B, C, g0, p0, g1, p1, …)
        return x.reshape(B, C, *self.size)
