"""Training objectives.  Each owns its noise process, its loss and how its samplers are driven:

    objective.loss(model, x0, model_kwargs, mask=None) -> dict of per-sample (B,) tensors, "loss" among them
                                                 (and the LOGGED_TERMS of the options that are on)
    objective.sample(model_fn, noise, sampler=..., steps=..., progress=...) -> (x0, nfe)
    objective.noise_level(t_net) -> (B,) in [0, 1], 1 = pure noise (for guidance intervals)

``model`` is any network ``model(x_t, t_net, **model_kwargs)``; ``model_fn(x, t_net)`` is such a
network with its conditioning (and guidance) bound.  The network never sees which objective it serves.

``mask`` (B, *size) bool, True at real positions, serves batches of variable lengths: each loss is the mean
over a sample's real positions, and the mask goes on to the network as ``model_kwargs["mask"]``.
"""
import torch

LOGGED_TERMS = ("repa", "cos")  # loss terms an objective reports when its option is on; the trainer logs them


def mean_flat(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over all but the batch dimension: (B, ...) -> (B,).  With ``mask`` (B, *size) over x's positions,
    (B, C, *size) or (B, *size), the mean over the real ones: Σ_real x / (C · #real) per sample (padded entries
    are selected away, so they get no gradient, even where they hold inf or NaN)."""
    dims = list(range(1, x.ndim))
    if mask is None:
        return x.mean(dim=dims)
    keep = (mask if mask.ndim == x.ndim else mask.unsqueeze(1)).expand_as(x)
    return torch.where(keep, x, 0).sum(dim=dims) / keep.sum(dim=dims).to(x.dtype)


def with_mask(model_kwargs: dict | None, mask: torch.Tensor | None) -> dict:
    """The network's keyword arguments with ``mask`` among them (when given)."""
    return {**(model_kwargs or {}), **({"mask": mask} if mask is not None else {})}


def direction_loss(pred: torch.Tensor, target: torch.Tensor, floor: float = 0.01,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """LightningDiT's velocity-direction term: 1 − cos(p, u) along the channel axis at each position,
    averaged over the positions, (B, C, ...) -> (B,); 0 along the target, 2 opposite.  Per position,
    cos = ⟨p, u⟩ / (max(‖p‖, floor·‖u‖) ‖u‖) over the C channels (``F.cosine_similarity(p, u, dim=1)``
    wherever ‖p‖ ≥ floor·‖u‖).  The floor is for stability: a fresh adaLN-Zero DiT outputs exactly 0, where
    the exact cosine's gradient is u / (eps ‖u‖) per position with torch's eps = 1e-8 (of order 1e5 per entry
    at step 0 for a 32×32 latent, once averaged over its 1024 positions), which would wreck Adam's second
    moments; below 1% of the target's norm the term pulls
    along u with a bounded gradient instead.  ``mask``: average over the real positions only (``mean_flat``)."""
    p, u = pred.float(), target.float()
    u_norm = u.norm(dim=1).clamp_min(1e-12)  # (B, ...): one norm per position
    p_norm = torch.maximum(p.norm(dim=1), floor * u_norm)
    return mean_flat(1 - (p * u).sum(dim=1) / (p_norm * u_norm), mask)


def build_objective(cfg):
    """The objective a run's config names (``cfg.objective``), for its model (``cfg.model``)."""
    o = cfg.objective
    if o.name == "ddpm":
        from ditkit.objectives.ddpm import create_ddpm

        return create_ddpm(noise_schedule=o.noise_schedule, learn_sigma=cfg.model.learn_sigma,
                           diffusion_steps=o.diffusion_steps, cos_weight=o.cos_weight, time_sampling=o.time_sampling,
                           logit_mean=o.logit_mean, logit_std=o.logit_std, shift=o.shift)
    if o.name == "flow":
        from ditkit.objectives.flow import FlowMatching

        return FlowMatching(path=o.path, prediction=o.prediction, time_sampling=o.time_sampling,
                            logit_mean=o.logit_mean, logit_std=o.logit_std, shift=o.shift, time_scale=o.time_scale,
                            cos_weight=o.cos_weight)
    raise ValueError(f"unknown objective {o.name!r}; known: ddpm, flow")
