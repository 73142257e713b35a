"""ditkit's DDPM process against what the official DiT diffusion code computes (golden file)."""
import pytest
import torch

from ditkit.models.dit import DiT
from ditkit.objectives.ddpm import create_ddpm
from tests.conftest import rel_err


@pytest.fixture(scope="module")
def small(golden):
    """The golden small DiT in eval mode: no label dropout, y = 10 is the null class, as recorded."""
    model = DiT(**golden["small"]["config"])
    model.load_state_dict(golden["small"]["state_dict"], strict=True)
    return model.eval()


def test_betas_are_bit_identical(golden):
    assert torch.equal(create_ddpm().betas, golden["train_losses"]["betas"])


def test_q_sample(golden):
    g = golden["train_losses"]
    assert rel_err(create_ddpm().q_sample(g["x0"], g["t"], g["noise"]), g["x_t"]) < 1e-5


@pytest.mark.parametrize("key", ["mse", "vb", "loss"])
def test_training_losses(golden, small, key):
    g = golden["train_losses"]
    with torch.no_grad():
        terms = create_ddpm().training_losses(small, g["x0"], g["t"], {"y": g["y"]}, noise=g["noise"])
    assert terms[key].shape == (6,)
    assert rel_err(terms[key], g[key]) < 1e-5


def test_respaced_250_p_mean_variance(golden, small):
    g = golden["p_mean_variance_250"]
    process = create_ddpm("250")
    assert torch.equal(process.timestep_map, g["timestep_map"])
    with torch.no_grad():
        # The network sees the ORIGINAL indices (the official _WrappedModel).
        out = process.p_mean_variance(small(g["x_t"], process.net_time(g["t"]), g["y"]), g["x_t"], g["t"])
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        assert rel_err(out[key], g[key]) < 1e-5, key


def test_respacing_a_1000_step_objective_is_the_official_250(golden):
    """sample() respaces the training objective; that must be create_diffusion("250") exactly."""
    assert torch.equal(create_ddpm().respaced("250").betas, create_ddpm("250").betas)


def test_ddim_25_loop(golden, small):
    g = golden["ddim_25"]
    x0, nfe = create_ddpm().sample(
        lambda x, t: small(x, t, g["y"]), g["noise"], sampler="ddim", steps=25, eta=0.0, clip_denoised=False
    )
    assert nfe == 25
    assert rel_err(x0, g["sample"]) < 1e-4
