"""AdamWEMA against its independent reference: torch's fused AdamW with clip_grad_norm_, the
found_inf skip and a foreach EMA, run side by side on the same gradients."""
import copy
import shutil

import pytest
import torch
from torch import nn

from ditkit.train.adamw_ema import AdamWEMA


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(approximate="tanh"), nn.Linear(16, 3))


def _run_pair(clip: float, weight_decay: float, steps: int, nan_at: int | None = None, compile: bool = False):
    ref, fused = _net(), _net()
    ref_ema, fused_ema = copy.deepcopy(ref), copy.deepcopy(fused)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=weight_decay, fused=True)
    opt = AdamWEMA(fused.parameters(), fused_ema.parameters(), lr=1e-2, weight_decay=weight_decay, max_norm=clip,
                   compile=compile)
    gen = torch.Generator().manual_seed(1)
    norms = []
    for step in range(steps):
        x = torch.randn(32, 8, generator=gen)
        for net in (ref, fused):
            net(x).square().mean().backward()
            if step == nan_at:
                net[0].weight.grad[0, 0] = float("nan")
        lr = 1e-2 * min(1.0, (step + 1) / 5)  # a warmup: the lr changes every step
        decay = min(0.99, (1 + step) / (10 + step))
        ref_opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), clip if clip > 0 else float("inf"))
        ref_opt.found_inf = (~torch.isfinite(norm)).float()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(list(ref_ema.parameters()), list(ref.parameters()), 1 - decay)
        opt.ema_decay = decay
        norms.append((norm, opt.step()))
        opt.zero_grad(set_to_none=True)
    return (ref, ref_ema, ref_opt), (fused, fused_ema, opt), norms


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("clip,weight_decay", [(0.0, 0.0), (0.1, 0.1)])
def test_matches_torch_adamw_clip_and_ema(clip, weight_decay):
    (ref, ref_ema, ref_opt), (fused, fused_ema, opt), norms = _run_pair(clip, weight_decay, steps=20)
    for expected, got in norms:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)
    assert _max_diff(ref, fused) < 1e-5 and _max_diff(ref_ema, fused_ema) < 1e-5
    p = next(fused.parameters())
    assert opt.state[p]["step"].item() == ref_opt.state[next(ref.parameters())]["step"].item() == 20
    if clip:  # clipping was active: some step's norm exceeded it, so the clip path is exercised
        assert max(e.item() for e, _ in norms) > clip


def test_nonfinite_gradient_skips_the_update_but_not_the_ema():
    (ref, ref_ema, ref_opt), (fused, fused_ema, opt), norms = _run_pair(0.5, 0.0, steps=6, nan_at=3)
    assert not torch.isfinite(norms[3][1])
    assert all(torch.isfinite(p).all() for p in [*fused.parameters(), *fused_ema.parameters()])
    assert opt.state[next(fused.parameters())]["step"].item() == 5  # the skipped step is not counted
    assert _max_diff(ref, fused) < 1e-5 and _max_diff(ref_ema, fused_ema) < 1e-5
    state = opt.state[next(fused.parameters())]
    assert torch.isfinite(state["exp_avg"]).all() and torch.isfinite(state["exp_avg_sq"]).all()


def test_state_dict_moves_between_adamw_and_adamwema():
    _, (fused, fused_ema, opt), _ = _run_pair(0.0, 0.0, steps=3)
    plain = torch.optim.AdamW(fused.parameters(), lr=1e-2)
    plain.load_state_dict(opt.state_dict())
    again = AdamWEMA(fused.parameters(), fused_ema.parameters(), lr=1e-2)
    again.load_state_dict(plain.state_dict())
    p = next(fused.parameters())
    assert again.state[p]["step"].item() == 3
    torch.testing.assert_close(again.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])


def test_errors_name_the_problem():
    net, ema = _net(), _net()
    with pytest.raises(ValueError, match="EMA parameters must match"):
        AdamWEMA(net.parameters(), list(ema.parameters())[:-1])
    opt = AdamWEMA(net.parameters(), ema.parameters())
    net[0](torch.randn(2, 8)).sum().backward()  # the last layer gets no gradient
    with pytest.raises(RuntimeError, match="needs a gradient"):
        opt.step()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None, reason="inductor needs a C++ compiler on the CPU")
def test_compiled_update_equals_eager():
    """torch.compile fuses the update (one kernel per tensor on a GPU); the numbers stay the same."""
    _, (eager, eager_ema, _), eager_norms = _run_pair(0.5, 0.1, steps=4)
    _, (comp, comp_ema, _), comp_norms = _run_pair(0.5, 0.1, steps=4, compile=True)
    assert _max_diff(eager, comp) < 1e-6 and _max_diff(eager_ema, comp_ema) < 1e-6
    for (_, a), (_, b) in zip(eager_norms, comp_norms):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
