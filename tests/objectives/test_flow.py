"""FlowMatching: loss by hand, time sampling laws, guidance intervals, exact-Gaussian sampling, a tiny DiT."""
import math

import pytest
import torch
from scipy import stats
from torch import nn

from ditkit.guidance import NFECounter, conditional_fn, guided_fn
from ditkit.models.dit import DiT
from ditkit.objectives.flow import FlowMatching
from ditkit.objectives.paths import VPPath
from tests.samplers.gaussian import GaussianFlow, assert_gaussian, gvp_coefficients, linear_coefficients


class StandIn(nn.Module):
    """out = [w x + b t_net ; e x]: 2C channels like a DiT with learn_sigma=True."""

    def __init__(self):
        super().__init__()
        self.w, self.b, self.e = (nn.Parameter(torch.tensor(v)) for v in (0.7, 0.002, 3.0))
        self.seen = {}

    def forward(self, x, t, y=None):
        self.seen = {"x": x, "t": t, "y": y}
        return torch.cat([self.w * x + self.b * t.reshape(-1, 1, 1, 1), self.e * x], dim=1)


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g)
    return x1, x0, torch.tensor([0.1, 0.5, 0.9])


def test_velocity_loss_by_hand():
    x1, x0, t = fixed_batch()
    net, y = StandIn(), torch.tensor([1, 2, 3])
    out = FlowMatching().loss(net, x1, {"y": y}, noise=x0, t=t)
    tt = t.reshape(-1, 1, 1, 1)
    x_t = tt * x1 + (1 - tt) * x0
    pred = 0.7 * x_t + 0.002 * 1000 * tt
    expected = ((pred - (x1 - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(net.seen["t"], 1000 * t)
    assert net.seen["y"] is y
    out["loss"].sum().backward()
    assert net.e.grad == 0  # the learned-σ channels are ignored by flow
    assert net.w.grad != 0


@pytest.mark.parametrize("prediction, weight", [("noise", "likelihood"), ("score", "velocity"), ("noise", None)])
def test_gvp_noise_and_score_losses_by_hand(prediction, weight):
    x1, x0, t = fixed_batch()
    out = FlowMatching("gvp", prediction, loss_weight=weight).loss(StandIn(), x1, noise=x0, t=t)
    a, s = torch.sin(math.pi * t / 2).reshape(-1, 1, 1, 1), torch.cos(math.pi * t / 2).reshape(-1, 1, 1, 1)
    x_t = a * x1 + s * x0
    pred = 0.7 * x_t + 2.0 * t.reshape(-1, 1, 1, 1)
    err = pred - x0 if prediction == "noise" else s * pred + x0
    half_g2 = (math.pi / 2) * s / a  # σ² α̇/α − σσ̇ on the GVP path
    lam = {None: 1.0, "likelihood": half_g2 / s**2, "velocity": (half_g2 / s) ** 2}[weight]
    torch.testing.assert_close(out["loss"], (lam * err**2).mean(dim=(1, 2, 3)))


def ks_pvalue(samples, cdf):
    return stats.kstest(samples.double().numpy(), cdf).pvalue


def test_uniform_time_sampling_and_training_interval():
    g = torch.Generator().manual_seed(0)
    t = FlowMatching().sample_time(20_000, generator=g)
    assert ks_pvalue(t, stats.uniform.cdf) > 1e-3
    t = FlowMatching(prediction="noise").sample_time(20_000, generator=g)  # SiT keeps noise/score off the ends
    assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3
    assert FlowMatching("vp").interval(FlowMatching("vp").train_eps) == (0.0, 1 - 1e-5)


def test_logit_normal_time_sampling_is_sd3s_on_the_noise_level():
    t = FlowMatching(time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8).sample_time(20_000, generator=torch.Generator().manual_seed(1))
    tau = 1 - t.double()  # SD3's noise level
    logit = torch.log(tau / (1 - tau))
    assert ks_pvalue(logit, stats.norm(0.5, 0.8).cdf) > 1e-3
    assert t.median() < 0.5  # logit_mean > 0 favours noisy inputs, as in SD3


def test_shift_time_sampling_law():
    """Uniform t shifted by s:  P(t' ≤ y) = P(t ≤ s y / (1 + (s − 1) y))."""
    s = 3.0
    t = FlowMatching(shift=s).sample_time(20_000, generator=torch.Generator().manual_seed(2))
    assert ks_pvalue(t, lambda y: s * y / (1 + (s - 1) * y)) > 1e-3
    assert abs(t.median().item() - 0.25) < 0.01  # τ' = 0.75 at τ = 0.5


def test_noise_level():
    fm = FlowMatching()
    torch.testing.assert_close(fm.noise_level(torch.tensor([0.0, 250.0, 1000.0])), torch.tensor([1.0, 0.75, 0.0]))
    torch.testing.assert_close(FlowMatching(time_scale=1.0).noise_level(torch.tensor([0.25])), torch.tensor([0.75]))


# --------------------------------------------------------------- sampling with the exact Gaussian network

def exact_network(coefficients, prediction, time_scale=1000.0):
    flow = GaussianFlow(coefficients)

    def model_fn(x, t_net):
        t = t_net / time_scale
        v, s = flow.velocity_score(x, t)
        return {"velocity": v, "score": s, "noise": flow.noise(x, t)}[prediction]

    return model_fn


CASES = [
    ("linear", linear_coefficients, "velocity", "euler", {}),
    ("linear", linear_coefficients, "noise", "heun", {}),
    ("linear", linear_coefficients, "score", "dopri5", {}),
    ("linear", linear_coefficients, "noise", "sde", {"diffusion": "SBDM"}),
    ("gvp", gvp_coefficients, "score", "heun", {}),
    ("gvp", gvp_coefficients, "velocity", "sde", {}),
    ("vp", VPPath().coefficients, "noise", "heun", {}),
    ("vp", VPPath().coefficients, "velocity", "sde", {"diffusion": "SBDM"}),
]


@pytest.mark.parametrize("path, coefficients, prediction, sampler, opts", CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES])
def test_objective_samples_gaussian_data_with_the_exact_network(path, coefficients, prediction, sampler, opts):
    """The exact ε̂ / s / v of N(μ, Σ) data, converted by the objective and integrated by every
    sampler kind, lands on N(μ, Σ): the conversions, the time scale and the intervals agree."""
    fm = FlowMatching(path, prediction)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(20_000, 2, generator=gen, dtype=torch.float64)
    if sampler == "sde":
        opts = {**opts, "generator": gen}
    x, nfe = fm.sample(exact_network(coefficients, prediction), noise, sampler=sampler, steps=100 if sampler == "sde" else 40, **opts)
    assert nfe == {"euler": 40, "heun": 80, "sde": 100}.get(sampler, nfe)
    assert_gaussian(x)


def test_bad_sampler_options():
    fm, fn, x = FlowMatching(), exact_network(linear_coefficients, "velocity"), torch.zeros(2, 2)
    with pytest.raises(ValueError, match="takes no option"):
        fm.sample(fn, x, sampler="euler", rtol=1e-3)
    with pytest.raises(ValueError, match="SBDM"):
        fm.sample(fn, x, sampler="sde", diffusion="SBDM")  # velocity on the linear path: sample_eps = 0
    with pytest.raises(ValueError, match="unknown sampler"):
        fm.sample(fn, x, sampler="ddim")


# --------------------------------------------------------------- a tiny DiT

def tiny_dit(**kw):
    torch.manual_seed(0)
    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10, **kw)


class Recorder(nn.Module):
    """Records the batch size and time of every network call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, **kw):
        self.calls.append((x.shape[0], t[0].item()))
        return self.model(x, t, **kw)


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde", "dopri5"])
def test_guidance_only_inside_the_interval(sampler):
    fm, net = FlowMatching(), Recorder(tiny_dit().eval())
    B, counter = 2, NFECounter()
    fn = guided_fn(net, {"y": torch.tensor([3, 7])}, cfg_scale=4.0, interval=(0.25, 0.75), noise_level=fm.noise_level, counter=counter)
    with torch.no_grad():
        x, nfe = fm.sample(fn, torch.randn(B, 4, 8, 8), sampler=sampler, steps=10)
    assert x.shape == (B, 4, 8, 8) and nfe == counter.nfe == len(net.calls)
    for batch, t_net in net.calls:
        level = 1 - t_net / 1000
        assert batch == (2 * B if 0.25 <= level <= 0.75 else B), (level, batch)
    assert {b for b, _ in net.calls} == {B, 2 * B}


def test_guided_inside_conditional_outside():
    fm, net = FlowMatching(), tiny_dit().eval()
    with torch.no_grad():
        for p in net.final_layer.parameters():  # leave adaLN-zero's zero output, so guidance shows
            p.normal_(0, 0.1)
        y, x = torch.tensor([3, 7]), torch.randn(2, 4, 8, 8)
        fn = guided_fn(net, {"y": y}, cfg_scale=4.0, interval=(0.25, 0.75), noise_level=fm.noise_level)
        cond = conditional_fn(net, {"y": y})
        for t_net, inside in [(500.0, True), (100.0, False), (900.0, False)]:
            t = torch.full((2,), t_net)
            c, u = cond(x, t), net(x, t, y=torch.tensor([10, 10]))
            expected = u[:, :4] + 4.0 * (c[:, :4] - u[:, :4]) if inside else c[:, :4]
            torch.testing.assert_close(fn(x, t)[:, :4], expected, atol=1e-5, rtol=1e-4)


def test_tiny_dit_trains_with_the_flow_loss():
    model, fm = tiny_dit(learn_sigma=True), FlowMatching(time_sampling="logit_normal")
    g = torch.Generator().manual_seed(0)
    y = torch.arange(8) % 10
    x1 = torch.sin(torch.arange(8.0).reshape(8, 1, 1, 1) + torch.linspace(0, 3, 64).reshape(1, 1, 8, 8)).expand(8, 4, 8, 8).contiguous()
    noise, t = torch.randn(x1.shape, generator=g), fm.sample_time(8, generator=g)

    def held_out():
        with torch.no_grad():
            return fm.loss(model, x1, {"y": y}, noise=noise, t=t)["loss"].mean().item()

    before = held_out()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = fm.loss(model, x1, {"y": y})["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out() < 0.8 * before


def test_noise_level_is_snr_matched_on_every_path():
    import torch

    from ditkit.objectives.flow import FlowMatching

    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(FlowMatching(path="linear").noise_level(1000 * t), 1 - t)
    vp = FlowMatching(path="vp")
    alpha, sigma = vp.path.coefficients(t)[:2]
    assert torch.allclose(vp.noise_level(1000 * t), sigma / (alpha + sigma))
