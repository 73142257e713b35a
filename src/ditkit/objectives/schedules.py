"""Noise schedules of the DDPM process and the respacing of its timesteps, as the official DiT
code (ADM's ``gaussian_diffusion.py`` and ``respace.py``) builds them.

    linear_betas(T)              β = linspace(1e-4·1000/T, 0.02·1000/T, T)     (Ho et al. 2020, scaled as ADM)
    cosine_betas(T)              β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), 0.999),
                                 ᾱ(s) = cos²((s + 0.008)/1.008 · π/2)          (Nichol & Dhariwal 2021)
    named_betas(name, T)         "linear" | "cosine" (also "squaredcos_cap_v2", the official DiT's name)
    space_timesteps(T, spec)     the original steps kept by a respacing: "250", "10,15,20" or "ddim25"
    respace_betas(alpha_bar, kept)  the betas of the shorter process whose ᾱ are exactly the kept ᾱ

Everything is a float64 tensor on the CPU, built once; a process moves it to the model's device.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """Ho et al.'s linear schedule, stretched so that any T keeps the shape of T = 1000:
    β_i = β_0 + i (β_end − β_0)/(T − 1), β_0 = 1e-4·1000/T, β_end = 0.02·1000/T.

    Written as start + i·step with the last value set to the end, which is how ``np.linspace``
    rounds: the betas are bit-identical to the official ones."""
    scale = 1000 / num_timesteps
    start, end = scale * 0.0001, scale * 0.02
    betas = torch.arange(num_timesteps, dtype=torch.float64) * ((end - start) / (num_timesteps - 1)) + start
    betas[-1] = end
    return betas


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM's cosine schedule: the betas that make ᾱ_i follow
    ᾱ(s) = cos²((s + 0.008)/1.008 · π/2) at s = i/T; clipped at ``max_beta`` so β never reaches 1."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_timesteps
    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)], dtype=torch.float64
    )


def named_betas(name: str, num_timesteps: int) -> torch.Tensor:
    """The schedule called ``name`` ("linear", "cosine" or its official alias "squaredcos_cap_v2")."""
    if num_timesteps < 2:
        raise ValueError(f"a DDPM process needs at least 2 timesteps, got {num_timesteps}")
    if name == "linear":
        return linear_betas(num_timesteps)
    if name in ("cosine", "squaredcos_cap_v2"):
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown noise schedule {name!r}; known: linear, cosine (squaredcos_cap_v2)")


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """The sorted original timesteps kept by a respacing (ADM's ``space_timesteps``).

    ``section_counts``: an int or "250" (one section), "10,15,20" (the T steps cut into equal
    sections, each strided to its count, ends included), or "ddimN" (the DDIM paper's integer
    stride: range(0, T, k) with exactly N elements)."""
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        spec = section_counts
        if spec.startswith("ddim"):
            desired = int(spec[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"timestep respacing {spec!r}: no integer stride gives exactly {desired} of {num_timesteps} steps")
        try:
            section_counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise ValueError(f"timestep respacing {spec!r}: expected 'N', 'N1,N2,...' or 'ddimN'") from None
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"timestep respacing: cannot divide a section of {size} steps into {count}")
        # Fractional stride so that both ends of the section are hit.  The index is accumulated
        # one stride at a time (not k·stride) and rounded as Python rounds, as the official loop does.
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def respace_betas(alpha_bar: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
    """β'_j = 1 − ᾱ_{k_j} / ᾱ_{k_{j−1}} (ᾱ_{k_{−1}} = 1): the process on the kept steps k_j whose
    cumulative products are exactly the original ᾱ at those steps."""
    alpha_bar_kept = alpha_bar[torch.as_tensor(list(kept), dtype=torch.long)]
    previous = torch.cat([alpha_bar_kept.new_ones(1), alpha_bar_kept[:-1]])
    return 1 - alpha_bar_kept / previous
