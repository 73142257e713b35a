"""ODE samplers for flow models:  dx/dt = v(x, t), integrated from t_grid[0] to t_grid[-1].

Every sampler takes a plain ``velocity_fn(x, t) -> v`` (x (B, ...), t (B,) in path time, the
same value for the whole batch) and returns ``(x, nfe)`` with nfe the number of velocity_fn
calls.  Time grids are data: tensors built by ``uniform_grid`` / ``shifted_grid``; the samplers
know no network, path or objective.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- time grids

def uniform_grid(steps: int, t0: float = 0.0, t1: float = 1.0) -> torch.Tensor:
    """steps + 1 equally spaced times from t0 to t1 (float64; samplers cast to x's dtype)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return torch.linspace(t0, t1, steps + 1, dtype=torch.float64)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift  τ' = shift·τ / (1 + (shift − 1) τ)  on the noise level τ = 1 − t,
    written in ditkit's time (t = 0 noise, t = 1 data):  t' = t / (shift − (shift − 1) t).
    shift > 1 moves every time towards noise (larger inputs need more steps at high noise)."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return t / (shift - (shift - 1) * t)


def shifted_grid(steps: int, shift: float, t0: float = 0.0, t1: float = 1.0) -> torch.Tensor:
    """A uniform grid on [0, 1] passed through ``shift_time`` and mapped onto [t0, t1]."""
    return t0 + (t1 - t0) * shift_time(uniform_grid(steps), shift)


def _check_grid(t_grid: torch.Tensor) -> None:
    if t_grid.ndim != 1 or t_grid.numel() < 2:
        raise ValueError(f"a time grid is a 1-D tensor of at least 2 times, got shape {tuple(t_grid.shape)}")


def _steps(n: int, progress: bool):
    return tqdm(range(n), leave=False) if progress else range(n)


# ---------------------------------------------------------------- fixed-grid solvers

def euler(velocity_fn: VelocityFn, x: torch.Tensor, t_grid: torch.Tensor, progress: bool = False) -> tuple[torch.Tensor, int]:
    """x_{i+1} = x_i + (t_{i+1} − t_i) v(x_i, t_i).  One evaluation per step (order 1)."""
    _check_grid(t_grid)
    t_grid = t_grid.to(device=x.device, dtype=x.dtype)
    ones = x.new_ones(x.shape[0])
    for i in _steps(len(t_grid) - 1, progress):
        x = x + (t_grid[i + 1] - t_grid[i]) * velocity_fn(x, t_grid[i] * ones)
    return x, len(t_grid) - 1


def heun(
    velocity_fn: VelocityFn, x: torch.Tensor, t_grid: torch.Tensor, progress: bool = False, euler_last: bool = False
) -> tuple[torch.Tensor, int]:
    """Heun's method (explicit trapezoid, order 2), two evaluations per step:

        x̃ = x_i + h v(x_i, t_i),     x_{i+1} = x_i + h/2 (v(x_i, t_i) + v(x̃, t_{i+1})).

    ``euler_last`` makes the last step a plain Euler step, as EDM does when the grid ends where
    the prediction is singular (e.g. a score at data, σ = 0); a velocity at t = 1 is finite, so
    it is off by default."""
    _check_grid(t_grid)
    t_grid = t_grid.to(device=x.device, dtype=x.dtype)
    ones = x.new_ones(x.shape[0])
    n, nfe = len(t_grid) - 1, 0
    for i in _steps(n, progress):
        h = t_grid[i + 1] - t_grid[i]
        d = velocity_fn(x, t_grid[i] * ones)
        x_euler = x + h * d
        nfe += 1
        if euler_last and i == n - 1:
            x = x_euler
        else:
            x = x + 0.5 * h * (d + velocity_fn(x_euler, t_grid[i + 1] * ones))
            nfe += 1
    return x, nfe


# ---------------------------------------------------------------- adaptive Dormand–Prince 5(4)

# Butcher tableau (Dormand & Prince 1980; Hairer, Nørsett & Wanner, Table II.5.2).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),  # = the 5th-order weights (FSAL)
)
# 5th-order minus embedded 4th-order weights: the local error estimate.
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


def _rms(v: torch.Tensor) -> torch.Tensor:
    return v.pow(2).mean().sqrt()


def _combine(x: torch.Tensor, h: float, weights, ks) -> torch.Tensor:
    return x + h * sum(w * k for w, k in zip(weights, ks) if w != 0.0)


def dopri5(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    t0: float = 0.0,
    t1: float = 1.0,
    rtol: float = 1e-3,
    atol: float = 1e-6,
    max_steps: int = 10_000,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Adaptive Runge–Kutta of Dormand–Prince 5(4) with local extrapolation and FSAL: 6 new
    evaluations per attempted step.  The step is accepted when the scaled RMS error of the whole
    batch,  ‖e / (atol + rtol·max(|x|, |x_new|))‖_rms ≤ 1, and resized by
    clamp(0.9·err^(−1/5), 0.2, 10) (no growth right after a rejection).  One step size serves the
    whole batch (as torchdiffeq, which SiT uses); the accept/reject decision is a host read per
    step, inherent to adaptive stepping.  Defaults are SiT's (rtol 1e-3, atol 1e-6).  t1 < t0
    integrates backwards (data -> noise)."""
    if rtol <= 0 or atol < 0:
        raise ValueError(f"dopri5 needs rtol > 0 and atol >= 0, got rtol={rtol}, atol={atol}")
    direction = 1.0 if t1 >= t0 else -1.0
    span = abs(t1 - t0)
    ones = x.new_ones(x.shape[0])
    nfe = 0

    def f(y: torch.Tensor, t: float) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return velocity_fn(y, t * ones)

    if span == 0:
        return x, 0
    k1 = f(x, t0)  # reused as the first stage of every accepted step (FSAL)
    h = _initial_step(f, x, t0, k1, direction, rtol, atol)
    t, done, n_steps, rejected = t0, 0.0, 0, False
    bar = tqdm(total=span, leave=False) if progress else None
    while done < span:
        if n_steps >= max_steps:
            raise RuntimeError(f"dopri5 took more than {max_steps} steps at t={t:.6g}; loosen rtol/atol")
        n_steps += 1
        last = h >= span - done
        h = span - done if last else h
        hs = direction * h
        ks = [k1]
        for i in range(1, 7):
            ks.append(f(_combine(x, hs, _A[i], ks), t + _C[i] * hs))
        x_new = _combine(x, hs, _A[6], ks)  # 5th-order solution; ks[6] = v(x_new, t + h)
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        err = _rms(hs * sum(e * k for e, k in zip(_E, ks) if e != 0.0) / scale).item()
        if not math.isfinite(err):  # shrinking the step cannot cure an infinite velocity
            raise ValueError(f"dopri5: the velocity is not finite between t={t:.6g} and t={t + hs:.6g}")
        if err <= 1.0:
            x, k1 = x_new, ks[6]
            done = span if last else done + h
            t = t1 if last else t + hs
            if bar is not None:
                bar.update(h)
        factor = 10.0 if err == 0.0 else min(10.0, max(0.2, 0.9 * err ** -0.2))
        if err > 1.0 or rejected:
            factor = min(1.0, factor)
        rejected = err > 1.0
        h = h * factor
    if bar is not None:
        bar.close()
    return x, nfe


def _initial_step(f, x: torch.Tensor, t0: float, k1: torch.Tensor, direction: float, rtol: float, atol: float) -> float:
    """Starting step size (Hairer, Nørsett & Wanner, Sec. II.4): an Euler probe of size h0 ≈ 1%
    of ‖x‖/‖v‖, then the step whose 5th-order error term matches the tolerance.  One evaluation."""
    scale = atol + rtol * x.abs()
    d0, d1 = _rms(x / scale).item(), _rms(k1 / scale).item()
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    k_probe = f(x + direction * h0 * k1, t0 + direction * h0)
    d2 = _rms((k_probe - k1) / scale).item() / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** 0.2
    return min(100 * h0, h1)
