"""Training objectives.  Each owns its noise process, its loss and how its samplers are driven:

    objective.loss(model, x0, model_kwargs) -> dict of per-sample (B,) tensors, "loss" among them
                                                 (and the LOGGED_TERMS of the options that are on)
    objective.sample(model_fn, noise, sampler=..., steps=..., progress=...) -> (x0, nfe)
    objective.noise_level(t_net) -> (B,) in [0, 1], 1 = pure noise (for guidance intervals)

``model`` is any network ``model(x_t, t_net, **model_kwargs)``; ``model_fn(x, t_net)`` is such a
network with its conditioning (and guidance) bound.  The network never sees which objective it serves.
"""
import torch

LOGGED_TERMS = ("repa", "cos")  # loss terms an objective reports when its option is on; the trainer logs them


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: (B, ...) -> (B,)."""
    return x.mean(dim=list(range(1, x.ndim)))


def direction_loss(pred: torch.Tensor, target: torch.Tensor, floor: float = 0.01) -> torch.Tensor:
    """1 − ⟨p, u⟩ / (max(‖p‖, floor·‖u‖) ‖u‖) per sample, each sample's channels and positions as one
    vector p (pred) or u (target): (B, ...) -> (B,).  LightningDiT's velocity-direction term 1 − cos(p, u):
    0 along the target, 2 opposite.  The floor matters only for a prediction under 1% of the target's
    norm, e.g. the zero output of a fresh adaLN-Zero DiT, where the exact cosine's gradient grows as 1/‖p‖
    (about 1e12 at step 0, which would wreck Adam's second moments); there the term pulls along u."""
    p, u = pred.flatten(1).float(), target.flatten(1).float()
    u_norm = u.norm(dim=1).clamp_min(1e-12)
    p_norm = torch.maximum(p.norm(dim=1), floor * u_norm)
    return 1 - (p * u).sum(dim=1) / (p_norm * u_norm)


def build_objective(cfg):
    """The objective a run's config names (``cfg.objective``), for its model (``cfg.model``)."""
    o = cfg.objective
    if o.name == "ddpm":
        from ditkit.objectives.ddpm import create_ddpm

        return create_ddpm(noise_schedule=o.noise_schedule, learn_sigma=cfg.model.learn_sigma,
                           diffusion_steps=o.diffusion_steps, cos_weight=o.cos_weight)
    if o.name == "flow":
        from ditkit.objectives.flow import FlowMatching

        return FlowMatching(path=o.path, prediction=o.prediction, time_sampling=o.time_sampling,
                            logit_mean=o.logit_mean, logit_std=o.logit_std, shift=o.shift, time_scale=o.time_scale,
                            cos_weight=o.cos_weight)
    raise ValueError(f"unknown objective {o.name!r}; known: ddpm, flow")
