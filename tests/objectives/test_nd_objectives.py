"""The objectives and samplers on (B, C, L) and (B, C, T, H, W) data: each broadcasts its time over any
number of axes (checked by oracles whose loss is exactly zero and whose samples land exactly on the data),
and a tiny 1D or 3D DiT trains and samples through ``ditkit``'s own functions, guidance included."""
import pytest
import torch

from ditkit.config import load_config
from ditkit.models.dit import build_model
from ditkit.objectives import build_objective
from ditkit.objectives.ddpm import create_ddpm
from ditkit.objectives.flow import FlowMatching
from ditkit.sampling import generate

SHAPES = {"1d": (3, 16), "3d": (3, 4, 8, 12)}  # (C, *size), non-cubic


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, …, 1), written out here so the oracles do not lean on the objectives' own broadcasting."""
    return values.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_ddpm_loss_of_the_exact_noise_is_zero(shape):
    process = create_ddpm(learn_sigma=False)
    torch.manual_seed(0)
    x0, noise = torch.randn(3, *SHAPES[shape]), torch.randn(3, *SHAPES[shape])
    t = torch.tensor([0, 500, 999])
    alpha_bar = torch.cumprod(1 - process.betas, 0)[t].float()

    def oracle(x_t, t_net):  # ε = (x_t − √ᾱ x0) / √(1 − ᾱ), each sample at its own step
        return (x_t - _per_sample(alpha_bar.sqrt(), x0) * x0) / _per_sample((1 - alpha_bar).sqrt(), x0)

    terms = process.training_losses(oracle, x0, t, noise=noise)
    assert terms["loss"].shape == (3,) and terms["loss"].max() < 1e-8


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prediction", ["velocity", "score"])
def test_flow_loss_of_the_exact_target_is_zero(shape, prediction):
    flow = FlowMatching(prediction=prediction, cos_weight=0.5)
    torch.manual_seed(0)
    x1, x0 = torch.randn(3, *SHAPES[shape]), torch.randn(3, *SHAPES[shape])
    t = torch.tensor([0.1, 0.5, 0.9])

    def oracle(x_t, t_net):  # linear path x_t = t x1 + (1 − t) x0: u = x1 − x0, score = −x0 / σ_t, σ_t = 1 − t
        return x1 - x0 if prediction == "velocity" else -x0 / _per_sample(1 - t, x0)

    terms = flow.loss(oracle, x1, noise=x0, t=t)
    assert terms["mse"].max() < 1e-10 and terms["cos"].abs().max() < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_samplers_of_an_exact_prediction_land_on_the_data(shape):
    """DDIM fed the ε of a point mass x* at every step, and Euler fed its velocity (x* − x)/(1 − t), end on x*."""
    torch.manual_seed(0)
    target, noise = torch.randn(2, *SHAPES[shape]), torch.randn(2, *SHAPES[shape])
    process = create_ddpm(learn_sigma=False)
    alpha_bar = torch.cumprod(1 - process.betas, 0).float()

    def eps(x, t_net):
        a = _per_sample(alpha_bar[t_net.long()], x)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    x, nfe = process.sample(eps, noise, sampler="ddim", steps=10)
    assert nfe == 10 and x.shape == noise.shape
    torch.testing.assert_close(x, target, rtol=1e-4, atol=1e-4)
    flow = FlowMatching()
    x, _ = flow.sample(lambda x, t_net: (target - x) / _per_sample(1 - t_net / 1000, x), noise, sampler="euler", steps=8)
    torch.testing.assert_close(x, target, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("objective, sampler", [("ddpm", "ddim"), ("flow", "heun")])
@pytest.mark.parametrize("shape", SHAPES)
def test_a_tiny_dit_trains_and_samples_with_guidance(shape, objective, sampler):
    C, *size = SHAPES[shape]
    patch = [4] if len(size) == 1 else [1, 4, 4]
    cfg = load_config("digits", [
        f"model.input_size={size}", f"model.patch_size={patch}", f"model.in_channels={C}", "model.num_classes=3",
        "model.hidden_size=32", "model.depth=1", "model.num_heads=2", f"objective.name={objective}",
        "objective.cos_weight=0.1", f"sample.sampler={sampler}", "sample.steps=3", "sample.cfg_scale=2.0"])
    torch.manual_seed(0)
    model = build_model(cfg.model.name, **cfg.model.kwargs())
    obj = build_objective(cfg)
    y = torch.tensor([0, 2])
    terms = obj.loss(model, torch.randn(2, C, *size), {"y": y})
    assert terms["loss"].shape == (2,) and torch.isfinite(terms["loss"]).all()
    terms["loss"].mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0  # adaLN-Zero: the first gradient reaches the output
    x, nfe = generate(model.eval(), obj, torch.randn(2, C, *size), {"y": y}, cfg.sample, progress=False)
    assert x.shape == (2, C, *size) and torch.isfinite(x).all() and nfe == (3 if sampler == "ddim" else 6)
