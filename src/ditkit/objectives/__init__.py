"""Training objectives.  Each owns its noise process, its loss and how its samplers are driven:

    objective.loss(model, x0, model_kwargs) -> dict of per-sample (B,) tensors, "loss" among them
    objective.sample(model_fn, noise, sampler=..., steps=..., progress=...) -> (x0, nfe)
    objective.noise_level(t_net) -> (B,) in [0, 1], 1 = pure noise (for guidance intervals)

``model`` is any network ``model(x_t, t_net, **model_kwargs)``; ``model_fn(x, t_net)`` is such a
network with its conditioning (and guidance) bound.  The network never sees which objective it serves.
"""
import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: (B, ...) -> (B,)."""
    return x.mean(dim=list(range(1, x.ndim)))


def build_objective(cfg):
    """The objective a run's config names (``cfg.objective``), for its model (``cfg.model``)."""
    o = cfg.objective
    if o.name == "ddpm":
        from ditkit.objectives.ddpm import create_ddpm

        return create_ddpm(noise_schedule=o.noise_schedule, learn_sigma=cfg.model.learn_sigma,
                           diffusion_steps=o.diffusion_steps)
    if o.name == "flow":
        from ditkit.objectives.flow import FlowMatching

        return FlowMatching(path=o.path, prediction=o.prediction, time_sampling=o.time_sampling,
                            logit_mean=o.logit_mean, logit_std=o.logit_std, shift=o.shift, time_scale=o.time_scale)
    raise ValueError(f"unknown objective {o.name!r}; known: ddpm, flow")
