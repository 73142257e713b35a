"""Flow matching / rectified flow / SiT's stochastic interpolants as a training objective.

Convention (SiT's; see ``paths``): t = 0 pure noise, t = 1 data,

    x_t = α_t x1 + σ_t x0,   x1 data, x0 ~ N(0, I);   linear path: x_t = t x1 + (1 − t) x0,
    velocity target  u_t = α̇_t x1 + σ̇_t x0  (linear: x1 − x0).

The network sees t_net = time_scale·t (1000·t by default, so DiT's timestep embedder sees the
range it sees under DDPM; SiT's own checkpoints were trained with t_net = t: time_scale=1).
Sampling integrates from noise (t ≈ 0) to data (t = 1).  In the rectified-flow / SD3 papers'
convention x_τ = (1 − τ) x_data + τ ε:  τ = 1 − t and v_SD3 = −v.
"""
from __future__ import annotations

import torch
from torch import nn

from ditkit.objectives import direction_loss, mean_flat, with_mask
from ditkit.objectives.paths import PREDICTIONS, VPPath, convert, expand_like, g2, interpolate, make_path
from ditkit.samplers.ode import dopri5, euler, heun, shift_time, shifted_grid, uniform_grid
from ditkit.samplers.sde import diffusion_fn, euler_maruyama

SAMPLERS = ("euler", "heun", "dopri5", "sde")
_SAMPLER_OPTS = {
    "euler": {"shift"},
    "heun": {"shift", "euler_last"},
    "dopri5": {"rtol", "atol", "max_steps"},
    "sde": {"shift", "diffusion", "diffusion_norm", "last_step_size", "generator"},
}


class FlowMatching:
    """Flow-matching objective on an interpolant path, predicting a velocity, noise or score.

    - ``path``: "linear" (rectified flow), "gvp" or "vp" (SiT's three), or a path object.
    - ``prediction``: what the network outputs: "velocity" (v), "noise" (ε̂ = E[x0|x_t]) or
      "score"; samplers always receive the velocity (and the score for the SDE), converted with
      the path's α, σ, α̇, σ̇.  A network with learn_sigma=True has 2C output channels: flow uses
      the first C and ignores the rest (SiT drops them the same way); they get no gradient.
    - ``time_sampling``: "uniform" or "logit_normal" (SD3: the noise level τ = 1 − t is
      sigmoid(N(logit_mean, logit_std)), so logit_mean > 0 trains more on noisy inputs), then
      ``shift`` (SD3's τ' = shift·τ/(1 + (shift − 1)τ); > 1 for larger inputs).
    - ``loss_weight``: SiT's weighting of noise / score losses, None, "velocity" ((g²/2σ)²) or
      "likelihood" (g²/2σ²); a velocity loss is never weighted (as in SiT).
    - ``train_eps`` / ``sample_eps``: keep t off the singular ends; None picks SiT's defaults
      (0 for velocity on linear/GVP, 1e-3 for noise/score there, train 1e-5 / sample 1e-3 on VP).
    - ``cos_weight``: w of the direction term w · (1 − cos(prediction, target)), the cosine along the
      channels at each position averaged over the positions, added to the loss (LightningDiT's
      velocity-direction loss, ``direction_loss``; 0: off).
    """

    def __init__(
        self,
        path="linear",
        prediction: str = "velocity",
        time_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        loss_weight: str | None = None,
        train_eps: float | None = None,
        sample_eps: float | None = None,
        time_scale: float = 1000.0,
        cos_weight: float = 0.0,
    ):
        self.path = make_path(path)
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown time_sampling {time_sampling!r}; choose 'uniform' or 'logit_normal'")
        if loss_weight not in (None, "velocity", "likelihood"):
            raise ValueError(f"unknown loss_weight {loss_weight!r}; choose None, 'velocity' or 'likelihood'")
        if logit_std <= 0 or shift <= 0 or time_scale <= 0:
            raise ValueError(f"logit_std, shift and time_scale must be positive, got {logit_std}, {shift}, {time_scale}")
        if cos_weight < 0:
            raise ValueError(f"cos_weight must be non-negative, got {cos_weight}")
        self.prediction, self.time_sampling, self.loss_weight = prediction, time_sampling, loss_weight
        self.cos_weight = cos_weight
        self.logit_mean, self.logit_std, self.shift, self.time_scale = logit_mean, logit_std, shift, time_scale
        self.is_vp = isinstance(self.path, VPPath)
        default_train, default_sample = (1e-5, 1e-3) if self.is_vp else (0.0, 0.0) if prediction == "velocity" else (1e-3, 1e-3)
        self.train_eps = default_train if train_eps is None else train_eps
        self.sample_eps = default_sample if sample_eps is None else sample_eps

    # ------------------------------------------------------------ time

    def interval(self, eps: float, sde: bool = False, sbdm: bool = False, last_step_size: float = 0.0) -> tuple[float, float]:
        """[t0, t1] kept away from the path's singular ends (SiT's check_interval): VP never
        reaches data (σ̇ = −∞ at t = 1); linear/GVP with a noise or score network cannot give a
        velocity at pure noise (α = 0) nor a score at data (σ = 0), nor can the SDE's score at t = 1
        or SBDM's w at t = 0.  An SDE ends at 1 − last_step_size, its deterministic last step."""
        t0 = eps if not self.is_vp and (self.prediction != "velocity" or sbdm) else 0.0
        t1 = 1.0 - (last_step_size if sde else eps if self.is_vp or self.prediction != "velocity" else 0.0)
        return t0, t1

    def sample_time(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) training times: uniform or logit-normal on [0, 1], shifted, mapped onto [t0, t1]."""
        if self.time_sampling == "uniform":
            u = torch.rand(n, device=device, generator=generator)
        else:
            tau = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device, generator=generator))
            u = 1 - tau  # SD3 draws the noise level τ; t = 1 − τ
        t0, t1 = self.interval(self.train_eps)
        return t0 + (t1 - t0) * shift_time(u, self.shift)

    def noise_level(self, t_net: torch.Tensor) -> torch.Tensor:
        """σ_t / (α_t + σ_t) in [0, 1] (1 = pure noise) for guidance intervals, t = t_net / time_scale:
        1 − t on the linear path, and the same signal-to-noise ratio on every path, as DDPM's."""
        t = (t_net / self.time_scale).clamp(0, 1)
        alpha, sigma = self.path.coefficients(t)[:2]
        return sigma / (alpha + sigma)

    def loss(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses (B,).  ``x0`` is the clean data (the protocol's name; x1 in flow
        notation); ``noise`` (flow's x0) and ``t`` (B,) default to fresh draws.

            velocity:  ‖v̂ − u_t‖²      noise:  λ_t ‖ε̂ − x0‖²      score:  λ_t ‖σ_t ŝ + x0‖²

        With ``cos_weight`` w > 0, ``cos`` = 1 − cos(prediction, target) (targets u_t, x0, −x0 /
        σ_t: the score's direction is −x0's) is added as w · cos.  ``mask`` (B, *size): means over the real
        positions only, and the network gets it too (variable lengths)."""
        x1 = x0
        C = x1.shape[1]
        if t is None:
            t = self.sample_time(x1.shape[0], device=x1.device)
        eps = torch.randn_like(x1) if noise is None else noise
        x_t, u_t = interpolate(self.path, t, eps, x1)
        out = model(x_t, self.time_scale * t.to(x1.dtype), **with_mask(model_kwargs, mask))[:, :C]  # learned-σ channels unused
        if self.prediction == "velocity":
            mse = mean_flat((out - u_t) ** 2, mask)
            terms = {"loss": mse, "mse": mse}
        else:
            sigma = expand_like(self.path.coefficients(t)[1], x1)
            err = out - eps if self.prediction == "noise" else sigma * out + eps
            mse = mean_flat(err**2, mask)
            terms = {"loss": self._weight(t).to(mse.dtype) * mse, "mse": mse}
        if self.cos_weight > 0:
            target = {"velocity": u_t, "noise": eps, "score": -eps}[self.prediction]
            terms["cos"] = direction_loss(out, target, mask=mask)
            terms["loss"] = terms["loss"] + self.cos_weight * terms["cos"]
        return terms

    def _weight(self, t: torch.Tensor) -> torch.Tensor:
        if self.loss_weight is None:
            return torch.ones_like(t)
        half_g2, sigma = g2(self.path, t) / 2, self.path.coefficients(t)[1]
        return (half_g2 / sigma) ** 2 if self.loss_weight == "velocity" else half_g2 / sigma**2

    # ------------------------------------------------------------ sampling

    def velocity(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's prediction (first C channels) at (x_t, t) as a velocity."""
        return convert(self.path, out[:, : x.shape[1]], self.prediction, "velocity", x, t)

    def velocity_and_score(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prediction as (velocity, score), both from one network output (each converted
        directly: velocity -> score stays finite at pure noise, where velocity -> noise -> velocity
        would divide by α = 0)."""
        out = out[:, : x.shape[1]]
        return convert(self.path, out, self.prediction, "velocity", x, t), convert(self.path, out, self.prediction, "score", x, t)

    def sample(
        self,
        model_fn,
        noise: torch.Tensor,
        sampler: str = "euler",
        steps: int = 50,
        grid: str = "uniform",
        progress: bool = False,
        **sampler_opts,
    ) -> tuple[torch.Tensor, int]:
        """Integrate from ``noise`` (t ≈ 0) to data (t = 1) with ``model_fn(x, t_net)`` (which may
        be a guidance wrapper).  Returns (x, nfe).

        sampler: "euler", "heun" (``euler_last``), "dopri5" (adaptive; ``rtol``=1e-3,
        ``atol``=1e-6, ``max_steps``; ignores steps and grid) or "sde" (Euler–Maruyama,
        ``diffusion``="sigma", ``diffusion_norm``=1.0, ``last_step_size``=0.04, ``generator``).
        steps: grid intervals (for "sde" the last one is the deterministic last step).
        grid: "uniform" or "shifted" (SD3 shift, ``shift`` defaulting to the objective's)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        unknown = set(sampler_opts) - _SAMPLER_OPTS[sampler]
        if unknown:
            raise ValueError(f"sampler {sampler!r} takes no option(s) {sorted(unknown)}; it takes {sorted(_SAMPLER_OPTS[sampler])}")
        if grid not in ("uniform", "shifted"):
            raise ValueError(f"unknown grid {grid!r}; choose 'uniform' or 'shifted'")

        def network(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model_fn(x, self.time_scale * t)

        shift = sampler_opts.pop("shift", self.shift)

        def make_grid(n: int, t0: float, t1: float) -> torch.Tensor:
            return shifted_grid(n, shift, t0, t1) if grid == "shifted" else uniform_grid(n, t0, t1)

        if sampler == "sde":
            return self._sample_sde(network, noise, steps, make_grid, progress, **sampler_opts)
        t0, t1 = self.interval(self.sample_eps)

        def velocity_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.velocity(network(x, t), x, t)

        if sampler == "dopri5":
            return dopri5(velocity_fn, noise, t0, t1, progress=progress, **sampler_opts)
        t_grid = make_grid(steps, t0, t1)
        if sampler == "euler":
            return euler(velocity_fn, noise, t_grid, progress=progress)
        return heun(velocity_fn, noise, t_grid, progress=progress, **sampler_opts)

    def _sample_sde(
        self, network, noise, steps, make_grid, progress, diffusion="sigma", diffusion_norm=1.0, last_step_size=0.04, generator=None
    ) -> tuple[torch.Tensor, int]:
        if steps < 2:
            raise ValueError(f"the SDE sampler needs steps >= 2 (the last one is deterministic), got {steps}")
        if not 0 < last_step_size < 1:
            raise ValueError(f"last_step_size must lie in (0, 1): the score is infinite at t = 1, got {last_step_size}")
        sbdm = diffusion == "SBDM"
        t0, t1 = self.interval(self.sample_eps, sde=True, sbdm=sbdm, last_step_size=last_step_size)
        if sbdm and t0 == 0 and not self.is_vp:
            raise ValueError("diffusion 'SBDM' is infinite at t = 0 on this path: set sample_eps > 0 (SiT uses 1e-3)")
        # SiT's grid: steps − 1 stochastic steps on [t0, t1], then the deterministic jump to 1.
        t_grid = torch.cat([make_grid(steps - 1, t0, t1), torch.ones(1, dtype=torch.float64)])
        w = diffusion_fn(diffusion, diffusion_norm, sigma=lambda t: self.path.coefficients(t)[1], g2=lambda t: g2(self.path, t))

        def velocity_score_fn(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.velocity_and_score(network(x, t), x, t)

        return euler_maruyama(velocity_score_fn, noise, t_grid, w, generator=generator, progress=progress)
