"""Beta schedules and respacing against numpy, their defining formulas and the official examples."""
import math

import numpy as np
import pytest
import torch

from ditkit.objectives.schedules import cosine_betas, named_betas, respace_betas, space_timesteps


@pytest.mark.parametrize("T", [1000, 250, 4000])
def test_linear_is_numpy_linspace_scaled(T):
    scale = 1000 / T
    expected = np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    betas = named_betas("linear", T)
    assert betas.dtype == torch.float64 and torch.equal(betas, torch.from_numpy(expected))


def test_cosine_reaches_its_alpha_bar():
    """cumprod(1 − β) = ᾱ((i+1)/T)/ᾱ(0) with ᾱ(s) = cos²((s + 0.008)/1.008 · π/2), wherever β is not clipped."""
    T = 1000
    betas = cosine_betas(T)
    assert torch.equal(betas, named_betas("squaredcos_cap_v2", T))
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    target = torch.tensor([f((i + 1) / T) / f(0) for i in range(T)], dtype=torch.float64)
    unclipped = int((betas < 0.999).sum())
    assert unclipped > 990 and betas.max() == 0.999
    torch.testing.assert_close(torch.cumprod(1 - betas, 0)[:unclipped], target[:unclipped], rtol=1e-12, atol=0)


def test_space_timesteps_official_examples():
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(1000, "250") == [round(i * 999 / 249) for i in range(250)]
    assert space_timesteps(1000, [1000]) == space_timesteps(1000, 1000) == list(range(1000))
    # The docstring example of ADM: 300 steps in three sections of 100 -> 10, 15 and 20 steps.
    kept = space_timesteps(300, "10,15,20")
    assert len(kept) == 45 and kept[0] == 0 and kept[9] == 99 and kept[10] == 100 and kept[24] == 199 and kept[-1] == 299


@pytest.mark.parametrize("spec, message", [("ddim600", "no integer stride"), ("2000", "cannot divide"), ("fast", "expected")])
def test_space_timesteps_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        space_timesteps(1000, spec)


def test_respaced_process_hits_the_kept_alpha_bars():
    alpha_bar = torch.cumprod(1 - named_betas("linear", 1000), 0)
    kept = space_timesteps(1000, "ddim50")
    new_alpha_bar = torch.cumprod(1 - respace_betas(alpha_bar, kept), 0)
    torch.testing.assert_close(new_alpha_bar, alpha_bar[kept], rtol=1e-12, atol=0)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        named_betas("quadratic", 1000)
