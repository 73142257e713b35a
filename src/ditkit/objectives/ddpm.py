"""The DDPM process of the official DiT (ADM's ``GaussianDiffusion`` + ``SpacedDiffusion``): same
schedule, same noising, same hybrid loss, same respacing, same float32/float64 arithmetic.

    process = create_ddpm()                       # official create_diffusion(""): 1000 linear steps,
                                                  # ε prediction, learned-range variance
    process.loss(model, x0, {"y": y})             # {"mse", "vb", "loss"}: (B,) each, t ~ U{0..T−1}
                                                  # (or ``sample_timesteps``' logit-normal / shifted t)
    process.training_losses(model, x0, t, model_kwargs, noise)
    x_t = process.q_sample(x0, t, noise)
    out = process.p_mean_variance(model_output, x_t, t)   # mean, variance, log_variance, pred_xstart
    x0, nfe = process.sample(model_fn, noise, sampler="ddpm" | "ddim", steps=250, eta=0.0)
    fast = process.respaced("ddim25")             # a shorter process on the kept steps
    process.noise_level(t_net)                    # (B,) in [0, 1] for guidance intervals

``model(x_t, t_net, **model_kwargs)`` and ``model_fn(x_t, t_net)`` are called with the ORIGINAL
timestep index t_net = timestep_map[t] (0..999), as the official ``_WrappedModel`` does
(rescale_timesteps=False).  A learned-sigma network outputs 2C channels: ε, then v ∈ [-1, 1] with
log σ² = ((v+1)/2) log β_t + (1 − (v+1)/2) log β̃_t (Nichol & Dhariwal 2021, Eq. 15).

Schedule tables are float64, built once on the CPU and copied once per device; a coefficient is
gathered in float64 and cast to float32 (float64 for float64 data) before it touches x, which is
the official rounding.  The losses are per sample, in the units of the official code (vb in bits).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ditkit.objectives import direction_loss, mean_flat, with_mask
from ditkit.objectives.schedules import named_betas, respace_betas, space_timesteps
from ditkit.samplers.ddpm import sample_ddim, sample_ddpm

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


#################################################################################
#                        Gaussian likelihood helpers (bits)                      #
#################################################################################


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(μ₁, e^{ℓ₁}) ‖ N(μ₂, e^{ℓ₂})) = ½ (−1 + ℓ₂ − ℓ₁ + e^{ℓ₁−ℓ₂} + (μ₁ − μ₂)² e^{−ℓ₂}), in nats, elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) ≈ ½ (1 + tanh(√(2/π) (x + 0.044715 x³))), the tanh approximation ADM uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) of N(means, e^{2·log_scales}) integrated over x's 8-bit bin [x − 1/255, x + 1/255]
    (data in [-1, 1]); the edge bins extend to ±∞ (Ho et al. 2020, Eq. 13).  Nats, elementwise."""
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}")
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


#################################################################################
#                          Training timesteps                                    #
#################################################################################

TIME_SAMPLINGS = ("uniform", "logit_normal")


def sample_timesteps(n: int, num_timesteps: int, time_sampling: str = "uniform", logit_mean: float = 0.0,
                     logit_std: float = 1.0, shift: float = 1.0, device=None) -> torch.Tensor:
    """(n,) training steps t ∈ {0, …, T−1}, T − 1 the noisiest.  Uniform without a shift: t ~ U{0..T−1}
    (``torch.randint``, the official draw).  Otherwise a noise level u on (0, 1) is drawn from the density
    flow matching uses, u ~ U(0, 1) or u = sigmoid(m + s·n), n ~ N(0, 1) (SD3's logit-normal), moved by
    SD3's shift u' = shift·u / (1 + (shift − 1) u), and t = floor(u'·T)."""
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"unknown time_sampling {time_sampling!r}; choose one of {TIME_SAMPLINGS}")
    if time_sampling == "uniform" and shift == 1.0:
        return torch.randint(0, num_timesteps, (n,), device=device)
    if time_sampling == "uniform":
        u = torch.rand(n, device=device)
    else:
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(n, device=device))
    u = shift * u / (1 + (shift - 1) * u)
    return (u * num_timesteps).floor().long().clamp_(0, num_timesteps - 1)  # u rounds to 1.0 in float32 far out


#################################################################################
#                                 The process                                    #
#################################################################################


class DDPM:
    """A discrete Gaussian diffusion q(x_t | x_{t−1}) = N(√(1−β_t) x_{t−1}, β_t I), t = 0..T−1,
    with an ε-predicting network.

    ``learn_sigma``: the network also outputs the variance interpolation v (learned range);
    otherwise the variance is fixed: β_t ("large", official default) or β̃_t (``sigma_small``).
    ``timestep_map[t]`` is the original index the network is called with (identity if None);
    ``original_alpha_bar`` the ᾱ of the process the network was trained on (for noise_level and
    respacing; this process's own ᾱ if None).  ``cos_weight`` w adds the direction term
    w · (1 − cos(ε_θ, ε)) to the training loss, the cosine along the channels at each position averaged
    over the positions (LightningDiT's velocity-direction loss, on the ε prediction).  ``time_sampling``,
    ``logit_mean``, ``logit_std`` and ``shift`` choose how ``loss`` draws t (``sample_timesteps``)."""

    def __init__(
        self,
        betas: torch.Tensor,
        learn_sigma: bool = True,
        sigma_small: bool = False,
        timestep_map: torch.Tensor | None = None,
        original_alpha_bar: torch.Tensor | None = None,
        cos_weight: float = 0.0,
        time_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
    ):
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        T = betas.numel()
        if betas.ndim != 1 or T < 2:
            raise ValueError(f"betas must be a 1-D sequence of at least 2 values, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        if cos_weight < 0:
            raise ValueError(f"cos_weight must be non-negative, got {cos_weight}")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; choose one of {TIME_SAMPLINGS}")
        if logit_std <= 0 or shift <= 0:
            raise ValueError(f"logit_std and shift must be positive, got {logit_std}, {shift}")
        self.time_sampling, self.logit_mean, self.logit_std, self.shift = time_sampling, logit_mean, logit_std, shift
        self.num_timesteps = T
        self.learn_sigma = learn_sigma
        self.cos_weight = cos_weight
        self.sigma_small = sigma_small

        alpha_bar = torch.cumprod(1.0 - betas, dim=0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        # Posterior q(x_{t−1} | x_t, x_0) = N(c₁ x_0 + c₂ x_t, β̃_t):  β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t).
        posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        # β̃_0 = 0: its log is clipped to log β̃_1 so the learned range stays finite at t = 0.
        posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        if sigma_small:
            fixed_variance, fixed_log_variance = posterior_variance, posterior_log_variance
        else:
            # Fixed large: β_t, with β̃_1 at t = 0 for a better decoder likelihood (as ADM).
            fixed_variance = torch.cat([posterior_variance[1:2], betas[1:]])
            fixed_log_variance = torch.log(fixed_variance)
        self.timestep_map = torch.arange(T) if timestep_map is None else torch.as_tensor(timestep_map, dtype=torch.long).cpu()
        if self.timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have {T} entries (one per step), got shape {tuple(self.timestep_map.shape)}")
        self.original_alpha_bar = alpha_bar if original_alpha_bar is None else original_alpha_bar.double().cpu()
        self._cpu = {
            "betas": betas,
            "log_betas": torch.log(betas),
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": torch.sqrt(alpha_bar),
            "sqrt_one_minus_alpha_bar": torch.sqrt(1.0 - alpha_bar),
            "sqrt_recip_alpha_bar": torch.sqrt(1.0 / alpha_bar),
            "sqrt_recipm1_alpha_bar": torch.sqrt(1.0 / alpha_bar - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance,
            "posterior_mean_coef1": betas * torch.sqrt(alpha_bar_prev) / (1.0 - alpha_bar),
            "posterior_mean_coef2": (1.0 - alpha_bar_prev) * torch.sqrt(1.0 - betas) / (1.0 - alpha_bar),
            "fixed_variance": fixed_variance,
            "fixed_log_variance": fixed_log_variance,
            "timestep_map": self.timestep_map,
            "original_alpha_bar": self.original_alpha_bar,
        }
        self._by_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    @property
    def betas(self) -> torch.Tensor:
        return self._cpu["betas"]

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """A schedule table on ``device``, copied there the first time it is asked for."""
        tables = self._by_device.get(device)
        if tables is None:
            tables = self._by_device[device] = {k: v.to(device) for k, v in self._cpu.items()}
        return tables[name]

    def _at(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] as (B, 1, ..., 1), gathered in float64 then cast to float32 (the official
        ``_extract_into_tensor``), or kept in float64 for float64 data."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return self._table(name, t.device)[t].to(dtype).view(-1, *([1] * (x.ndim - 1)))

    # --------------------------------------------------------------------- time

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The original timestep index the network sees for step t of this process."""
        return self._table("timestep_map", t.device)[t]

    def noise_level(self, t_net: torch.Tensor) -> torch.Tensor:
        """(B,) in [0, 1], 1 = pure noise: the rectified-flow time with the same signal-to-noise
        ratio, σ/(1 + σ) with σ = √((1−ᾱ)/ᾱ), so a guidance interval means the same noise levels
        for the DDPM and flow objectives.  ``t_net`` is the network's (original) timestep."""
        alpha_bar = self._table("original_alpha_bar", t_net.device)[t_net.round().long()]
        return (torch.sqrt(1 - alpha_bar) / (torch.sqrt(alpha_bar) + torch.sqrt(1 - alpha_bar))).float()

    def alpha_bar(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """ᾱ_t broadcast against x."""
        return self._at("alpha_bar", t, x)

    def alpha_bar_prev(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """ᾱ_{t−1} (1 at t = 0) broadcast against x."""
        return self._at("alpha_bar_prev", t, x)

    # ------------------------------------------------------------ forward process

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε."""
        return self._at("sqrt_alpha_bar", t, x0) * x0 + self._at("sqrt_one_minus_alpha_bar", t, x0) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t−1} | x_t, x_0) = N(μ̃, β̃_t):  μ̃ = β_t √ᾱ_{t−1}/(1−ᾱ_t) x_0 + (1−ᾱ_{t−1}) √α_t/(1−ᾱ_t) x_t.
        Returns (mean, variance, clipped log-variance)."""
        mean = self._at("posterior_mean_coef1", t, x_t) * x0 + self._at("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._at("posterior_variance", t, x_t), self._at("posterior_log_variance_clipped", t, x_t)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = x_t/√ᾱ_t − √(1/ᾱ_t − 1) ε."""
        return self._at("sqrt_recip_alpha_bar", t, x_t) * x_t - self._at("sqrt_recipm1_alpha_bar", t, x_t) * eps

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε = (x_t/√ᾱ_t − x̂_0) / √(1/ᾱ_t − 1)."""
        return (self._at("sqrt_recip_alpha_bar", t, x_t) * x_t - x0) / self._at("sqrt_recipm1_alpha_bar", t, x_t)

    # ------------------------------------------------------------ reverse process

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> dict[str, torch.Tensor]:
        """p(x_{t−1} | x_t) from the network's raw output at (x_t, t): a dict of ``mean``,
        ``variance``, ``log_variance`` and ``pred_xstart`` (x̂_0, clamped to [-1, 1] if
        ``clip_denoised``), each shaped like x_t."""
        C = x_t.shape[1]
        expected = 2 * C if self.learn_sigma else C
        if model_output.shape[1] != expected:
            raise ValueError(
                f"model output has {model_output.shape[1]} channels; a DDPM with learn_sigma={self.learn_sigma} "
                f"on {C}-channel data needs {expected}"
            )
        if self.learn_sigma:
            eps, v = torch.split(model_output, C, dim=1)
            # v ∈ [-1, 1] interpolates log σ² between log β̃_t (v = −1) and log β_t (v = 1).
            min_log = self._at("posterior_log_variance_clipped", t, x_t)
            max_log = self._at("log_betas", t, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = model_output
            variance = self._at("fixed_variance", t, x_t).expand_as(x_t)
            log_variance = self._at("fixed_log_variance", t, x_t).expand_as(x_t)
        pred_xstart = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    # -------------------------------------------------------------------- losses

    def vb_terms_bpd(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) term L_t of the variational bound, in bits per dimension:
        KL(q(x_{t−1} | x_t, x_0) ‖ p(x_{t−1} | x_t)) for t > 0, −log p(x_0 | x_1) (discretized) at t = 0;
        with ``mask``, bits per real dimension."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]), mask) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(nll, mask) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses at steps t (B,): ``mse`` = ‖ε − ε_θ(x_t, t)‖² / D, and with a learned
        sigma ``vb`` = L_t of the bound, ``loss`` = mse + vb (IDDPM's L_hybrid; vb is a single
        term, i.e. λ = 1/T of L_vlb = T·E_t[L_t], IDDPM's λ = 0.001 at T = 1000); with ``cos_weight``
        w > 0 also ``cos`` = 1 − cos(ε_θ, ε), and w · cos in ``loss``.  ``mask`` (B, *size): every term a
        mean over the real positions only, and the network gets it too (variable lengths)."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        model_output = model(x_t, self.net_time(t), **with_mask(model_kwargs, mask))
        terms = {}
        if self.learn_sigma:
            C = x0.shape[1]
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"model output has {model_output.shape[1]} channels; learn_sigma needs 2 × {C}")
            eps, v = torch.split(model_output, C, dim=1)
            # The bound trains only the variance: it sees a detached ε, so the mean is learned by
            # the MSE alone (IDDPM §3.1).
            terms["vb"] = self.vb_terms_bpd(torch.cat([eps.detach(), v], dim=1), x0, x_t, t, mask)
        else:
            eps = model_output
        terms["mse"] = mean_flat((noise - eps) ** 2, mask)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        if self.cos_weight > 0:
            terms["cos"] = direction_loss(eps, noise, mask=mask)
            terms["loss"] = terms["loss"] + self.cos_weight * terms["cos"]
        return terms

    def loss(self, model: Callable[..., torch.Tensor], x0: torch.Tensor, model_kwargs: dict | None = None,
             mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The objective protocol's training loss: t per sample from ``sample_timesteps`` (U{0, …, T−1} by
        default), on x0's device; ``mask`` as in ``training_losses``."""
        t = sample_timesteps(x0.shape[0], self.num_timesteps, self.time_sampling, self.logit_mean, self.logit_std,
                             self.shift, device=x0.device)
        return self.training_losses(model, x0, t, model_kwargs, mask=mask)

    # ------------------------------------------------------------------ sampling

    def respaced(self, section_counts: str | int | Sequence[int]) -> "DDPM":
        """The process on a subset of the ORIGINAL steps (``space_timesteps``: "250", "10,15,20",
        "ddim25"), with β'_j = 1 − ᾱ_{k_j}/ᾱ_{k_{j−1}} and timestep_map = the kept indices k_j."""
        kept = space_timesteps(self.original_alpha_bar.numel(), section_counts)
        return DDPM(
            respace_betas(self.original_alpha_bar, kept),
            learn_sigma=self.learn_sigma,
            sigma_small=self.sigma_small,
            timestep_map=torch.tensor(kept),
            original_alpha_bar=self.original_alpha_bar,
            cos_weight=self.cos_weight,
            time_sampling=self.time_sampling,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            shift=self.shift,
        )

    def sample(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        sampler: str = "ddpm",
        steps: int | str = 250,
        eta: float = 0.0,
        clip_denoised: bool = False,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, int]:
        """x_0 from x_T = ``noise`` by ancestral DDPM or DDIM (η = ``eta``) on the process
        respaced to ``steps`` ("250", "ddim25", ...); returns (x0, number of network evaluations)."""
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown DDPM sampler {sampler!r}; known: ddpm, ddim")
        if sampler == "ddpm" and eta != 0.0:
            raise ValueError("eta applies to the ddim sampler only")
        process = self.respaced(str(steps))
        if sampler == "ddpm":
            x0 = sample_ddpm(model_fn, noise, process, clip_denoised=clip_denoised, generator=generator, progress=progress)
        else:
            x0 = sample_ddim(model_fn, noise, process, eta=eta, clip_denoised=clip_denoised, generator=generator, progress=progress)
        return x0, process.num_timesteps


def create_ddpm(
    timestep_respacing: str | int | Sequence[int] = "",
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    sigma_small: bool = False,
    diffusion_steps: int = 1000,
    cos_weight: float = 0.0,
    **time_sampling,
) -> DDPM:
    """The official ``create_diffusion``: the named schedule on ``diffusion_steps`` steps, respaced
    to ``timestep_respacing`` ("" keeps all steps, and, as officially, still recomputes the betas
    from ᾱ, which changes them in the last bits).  ``time_sampling``: ``DDPM``'s time_sampling, logit_mean,
    logit_std and shift (how training draws t)."""
    base = DDPM(named_betas(noise_schedule, diffusion_steps), learn_sigma=learn_sigma, sigma_small=sigma_small,
                cos_weight=cos_weight, **time_sampling)
    return base.respaced(timestep_respacing or [diffusion_steps])
