"""Training objectives.  Each owns its noise process, its loss and how its samplers are driven:

    objective.loss(model, x0, model_kwargs) -> dict of per-sample (B,) tensors, "loss" among them
    objective.sample(model_fn, noise, sampler=..., steps=..., progress=...) -> (x0, nfe)
    objective.noise_level(t_net) -> (B,) in [0, 1], 1 = pure noise (for guidance intervals)

``model`` is any network ``model(x_t, t_net, **model_kwargs)``; ``model_fn(x, t_net)`` is such a
network with its conditioning (and guidance) bound.  The network never sees which objective it serves.
"""
