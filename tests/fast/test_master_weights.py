"""bf16 weights with float32 masters (ditkit.fast.master_weights) against torch: the flat kernels
against their torch equations (Triton's interpreter on the CPU), and the optimizer against
torch.optim.AdamW + clip_grad_norm_ + found_inf + a foreach EMA on the same model under autocast."""
import copy

import pytest
import torch
from torch import nn

from ditkit.fast.master_weights import MasterWeightAdamW
from ditkit.kernels import master as master_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels: compiled on a GPU, else Triton's interpreter


SIZES = [3 * master_kernels.BLOCK + 77, 5, master_kernels.BLOCK, 300]  # ragged, tiny and exact blocks


def _flat_state(grad_dtype: torch.dtype, seed: int = 0):
    """Per-parameter gradients (one of them a transposed view), their layout and flat float32 state."""
    gen = torch.Generator().manual_seed(seed)
    layout = master_kernels.flat_layout(SIZES, torch.device(DEVICE))
    n = layout.size
    master = torch.randn(n, generator=gen)
    grads = [(torch.randn(k, generator=gen) * 3).to(grad_dtype).to(DEVICE) for k in SIZES]
    grads[-1] = grads[-1].view(20, 15).t()  # not contiguous: read through a contiguous copy
    state = {"master": master, "exp_avg": torch.randn(n, generator=gen) * 0.1,
             "exp_avg_sq": torch.rand(n, generator=gen) * 0.01, "ema": master + 0.01 * torch.randn(n, generator=gen)}
    pad = torch.ones(n, dtype=torch.bool)
    for start, k in zip(layout.offsets, SIZES):
        pad[start:start + k] = False
    for v in state.values():
        v[pad] = 0  # as MasterWeightAdamW's buffers: zeros between parameters
    state["weights"] = None
    if grad_dtype == torch.bfloat16:  # the master as the bf16 weight and its int16 remainder
        state["weights"], state["master"] = master_kernels.split_master(master)
    return grads, layout, {k: (v.to(DEVICE) if v is not None else None) for k, v in state.items()}


def _master(state: dict) -> torch.Tensor:
    """The float32 master of a ``_flat_state``."""
    if state["weights"] is None:
        return state["master"]
    return master_kernels.join_master(state["weights"], state["master"])


def _rounding_cases() -> torch.Tensor:
    """float32 values whose low 16 bits are every rounding case (exact, just above, just below and at a tie,
    past it, all ones), with even and odd upper halves, both signs, near one and near zero."""
    base = torch.tensor([1.0, 1.0078125, -1.0, -3.0e-3, 2.0e-38, 0.0], dtype=torch.float32).view(torch.int32)
    low = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int32)
    return ((base[:, None] & ~0xFFFF) | low[None, :]).reshape(-1).view(torch.float32)


def test_master_split_is_exact_but_for_ties_rounded_down():
    """w = bf16(p) to nearest even; p = join(w, lo) exactly, except an exact tie that rounded down,
    stored one float32 step toward w."""
    p = _rounding_cases()
    bits = p.view(torch.int32)
    w, lo = master_kernels.split_master(p)
    assert torch.equal(w, p.bfloat16())
    joined = master_kernels.join_master(w, lo)
    assert torch.equal(joined.bfloat16(), w)  # the weight is still the stored master rounded to nearest even
    tie_down = ((bits & 0xFFFF) == 0x8000) & ((bits >> 16) & 1 == 0)
    assert tie_down.sum() >= 4
    same = joined.view(torch.int32) == p.view(torch.int32)
    assert torch.equal(~same, tie_down)
    assert torch.equal(joined.view(torch.int32)[tie_down], p.view(torch.int32)[tie_down] - 1)


def test_kernel_split_and_join_match_torch_on_every_case():
    """The update kernel's split (rounding, remainder, the clamped tie) and join, against ``split_master``."""
    triton = pytest.importorskip("triton")
    tl = triton.language

    @triton.jit
    def _split_join(p_ptr, w_ptr, lo_ptr, back_ptr, n, BLOCK: tl.constexpr):
        at = tl.arange(0, BLOCK)
        mask = at < n
        p = tl.load(p_ptr + at, mask=mask, other=0.0)
        w = master_kernels._bf16_nearest_even(p)
        lo = master_kernels._remainder(p, w)
        tl.store(w_ptr + at, w, mask=mask)
        tl.store(lo_ptr + at, lo, mask=mask)
        tl.store(back_ptr + at, master_kernels._joined(w, lo), mask=mask)

    p = torch.cat([_rounding_cases(), torch.randn(4000, generator=torch.Generator().manual_seed(0))]).to(DEVICE)
    w, lo, back = torch.empty_like(p, dtype=torch.bfloat16), torch.empty_like(p, dtype=torch.int16), torch.empty_like(p)
    _split_join[(1,)](p, w, lo, back, p.numel(), BLOCK=triton.next_power_of_2(p.numel()))
    w_ref, lo_ref = master_kernels.split_master(p)
    assert torch.equal(w, w_ref) and torch.equal(lo, lo_ref)
    assert torch.equal(back, master_kernels.join_master(w_ref, lo_ref))


def test_layout_pads_every_parameter_to_256_bytes():
    layout = master_kernels.flat_layout(SIZES, torch.device("cpu"))
    assert layout.offsets == [0, 3200, 3328, 4352] and layout.size == 4736
    assert all(o % master_kernels.ALIGN == 0 for o in layout.offsets)
    assert layout.block_param.tolist() == [0, 0, 0, 0, 1, 2, 3]  # a block never straddles two parameters


@pytest.mark.parametrize("keep, grad_dtype", [(1.0, torch.bfloat16), (1.0, torch.float32), (0.0, torch.bfloat16)])
def test_update_kernel_matches_its_equations(keep, grad_dtype):
    pytest.importorskip("triton")
    scalars = torch.tensor([0.37, keep, 1e-3 * 0.05, 1e-3 / (1 - 0.9 ** 3), (1 - 0.999 ** 3) ** 0.5, 1e-2], device=DEVICE)
    grads, layout, ref = _flat_state(grad_dtype)
    got = copy.deepcopy(ref)
    before = copy.deepcopy(ref)
    master_kernels.adamw_ema_reference(grads, layout, *ref.values(), scalars, 0.9, 0.999, 1e-8)
    table, _ = master_kernels.pointer_table(grads, torch.device(DEVICE))
    master_kernels.adamw_ema_triton(table, grad_dtype, layout, *got.values(), scalars, 0.9, 0.999, 1e-8)
    for key, a, b in [("master", _master(got), _master(ref))] + [(k, got[k], ref[k]) for k in ("exp_avg", "exp_avg_sq", "ema")]:
        # a GPU contracts a·b + c into one rounding (FMA): one float32 step of the operands where terms cancel
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7 * b.abs().max().item(), msg=key)
    if grad_dtype == torch.bfloat16:  # the model's weight is the master rounded to nearest even, as autocast casts it
        assert torch.equal(got["weights"], _master(got).bfloat16())
    pad = torch.ones(layout.size, dtype=torch.bool, device=DEVICE)
    for start, k in zip(layout.offsets, SIZES):
        pad[start:start + k] = False
    assert torch.equal(got["master"][pad], before["master"][pad])  # the padding is never written
    if keep:
        assert not torch.equal(_master(ref), _master(before))
    else:  # a skipped step: only the EMA moves
        for key in ("master", "exp_avg", "exp_avg_sq", "weights"):
            assert torch.equal(got[key], before[key]), key
        assert not torch.equal(got["ema"], before["ema"])


def test_sum_squares_kernel():
    pytest.importorskip("triton")
    grads, layout, _ = _flat_state(torch.bfloat16)
    exact = sum(g.double().square().sum() for g in grads).float()
    table, _ = master_kernels.pointer_table(grads, torch.device(DEVICE))
    torch.testing.assert_close(master_kernels.sum_squares_triton(table, torch.bfloat16, layout), exact, rtol=1e-5, atol=0)
    torch.testing.assert_close(master_kernels.sum_squares_reference(grads, layout), exact, rtol=1e-5, atol=0)


class _Net(nn.Module):
    """Linear layers (bf16 under autocast) and an embedding table (float32 under autocast)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(4, 8)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 3)
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x, y):
        return self.fc2(nn.functional.gelu(self.fc1(x + self.table(y)), approximate="tanh")) * self.frozen


def _loss(net, x, y):
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        return net(x, y).float().square().mean()


def _run_pair(clip: float, weight_decay: float, steps: int, nan_at: int | None = None):
    """The bf16-weight model trains; torch's AdamW steps a float32 copy on the same gradients (their
    exact float32 cast), so the two differ only by the optimizers' rounding."""
    torch.manual_seed(0)
    ref = _Net().to(DEVICE)
    net = copy.deepcopy(ref)
    ref_ema, ema = copy.deepcopy(ref), copy.deepcopy(ref)
    trained = [p for p in ref.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(trained, lr=1e-2, weight_decay=weight_decay)
    opt = MasterWeightAdamW(net, ema, lr=1e-2, weight_decay=weight_decay, max_norm=clip)
    gen = torch.Generator().manual_seed(1)
    norms = []
    for step in range(steps):
        x, y = torch.randn(64, 8, generator=gen).to(DEVICE), torch.randint(0, 4, (64,), generator=gen).to(DEVICE)
        _loss(net, x, y).backward()
        if step == nan_at:
            net.fc1.weight.grad[0, 0] = float("nan")
        for p, q in zip(trained, [q for q in net.parameters() if q.requires_grad]):
            p.grad = q.grad.to(torch.float32, copy=True)  # clip_grad_norm_ scales it in place
        lr = 1e-2 * min(1.0, (step + 1) / 5)
        decay = min(0.99, (1 + step) / (10 + step))
        ref_opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(trained, clip if clip > 0 else float("inf"))
        if torch.isfinite(norm):  # found_inf's skip, as the fused CUDA AdamW does it
            ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(list(ref_ema.parameters()), list(ref.parameters()), 1 - decay)
        opt.ema_decay = decay
        norms.append((norm, opt.step()))
        opt.zero_grad(set_to_none=True)
    return (ref, ref_ema, ref_opt), (net, ema, opt), norms


def _assert_close_to_reference(ref, ref_ema, net, ema, opt):
    master = opt.master_state_dict(net)  # on the CPU
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(master[name], p.cpu(), rtol=1e-5, atol=1e-6, msg=name)  # ≤ 1 float32 step per update
        assert master[name].dtype == torch.float32
    for (name, p), q in zip(ref_ema.named_parameters(), ema.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=f"ema.{name}")


def test_bf16_weights_compute_what_autocast_computes():
    """After some steps, a float32 model holding the master weights, run under autocast, gives the
    bf16-weight model's loss and gradients bit for bit: autocast's casts are the stored weights."""
    _, (net, _, opt), _ = _run_pair(0.0, 0.0, steps=4)
    plain = _Net().to(DEVICE)
    plain.load_state_dict(opt.master_state_dict(net))
    x, y = torch.randn(16, 8, device=DEVICE), torch.randint(0, 4, (16,), device=DEVICE)
    a, b = _loss(plain, x, y), _loss(net, x, y)
    a.backward()
    b.backward()
    assert torch.equal(a, b)
    for (name, p), q in zip(plain.named_parameters(), net.parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad.float()), name
    assert torch.equal(net.fc1.weight.cpu(), opt.master_state_dict(net)["fc1.weight"].bfloat16())


@pytest.mark.parametrize("clip, weight_decay", [(0.0, 0.0), (0.1, 0.1)])
def test_matches_torch_adamw_clip_and_ema_under_autocast(clip, weight_decay):
    (ref, ref_ema, ref_opt), (net, ema, opt), norms = _run_pair(clip, weight_decay, steps=12)
    assert net.fc1.weight.dtype == net.fc2.bias.dtype == torch.bfloat16  # what autocast computed with
    assert net.table.weight.dtype == net.frozen.dtype == torch.float32  # what autocast leaves in float32
    for expected, got in norms:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    _assert_close_to_reference(ref, ref_ema, net, ema, opt)
    if clip:
        assert max(e.item() for e, _ in norms) > clip


def test_nonfinite_gradient_skips_the_update_but_not_the_ema():
    (ref, ref_ema, ref_opt), (net, ema, opt), norms = _run_pair(0.5, 0.0, steps=6, nan_at=3)
    assert not torch.isfinite(norms[3][1])
    assert opt.step_count.item() == 5
    assert all(torch.isfinite(p).all() for p in [*net.parameters(), *ema.parameters()])
    _assert_close_to_reference(ref, ref_ema, net, ema, opt)


def test_state_dict_moves_to_torch_adamw_and_back():
    (ref, _, ref_opt), (net, ema, opt), _ = _run_pair(0.0, 0.0, steps=3)
    saved = opt.state_dict()
    plain_net = _Net().to(DEVICE)
    plain_net.load_state_dict(opt.master_state_dict(net))
    plain = torch.optim.AdamW([p for p in plain_net.parameters() if p.requires_grad], lr=1e-2)
    plain.load_state_dict(saved)
    for i, p in enumerate(ref_opt.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(plain.state[plain.param_groups[0]["params"][i]][key], ref_opt.state[p][key],
                                       rtol=1e-3, atol=1e-7)
    torch.manual_seed(0)
    fresh = _Net().to(DEVICE)
    again = MasterWeightAdamW(fresh, copy.deepcopy(fresh), lr=1e-2)
    again.load_state_dict(plain.state_dict())
    assert again.step_count.item() == 3
    for key in ("exp_avg", "exp_avg_sq"):
        for a, b in zip(again._flat_views(key).values(), opt._flat_views(key).values()):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="expected one group of 5 parameters"):
        again.load_state_dict({"state": {}, "param_groups": [{"params": [0, 1]}]})
    again.load_state_dict({"state": {}, "param_groups": [{**saved["param_groups"][0]}]})  # saved before any step
    assert again.step_count.item() == 0
    assert all(not g.exp_avg.any() and not g.exp_avg_sq.any() for g in again.groups)


def test_weights_are_aligned_and_shared_parameters_checkpoint_in_float32():
    torch.manual_seed(0)
    net = _Net().to(DEVICE)
    net.head = nn.Linear(32, 3)
    net.head.weight = net.fc2.weight  # one parameter under two names
    opt = MasterWeightAdamW(net, copy.deepcopy(net))
    base = opt.groups[0].weights.data_ptr()  # (a CUDA allocation itself starts 512 bytes in)
    assert all((p.data_ptr() - base) % 256 == 0 for p in net.parameters() if p.dtype == torch.bfloat16)
    saved = opt.master_state_dict(net)
    assert saved["head.weight"].dtype == saved["fc2.weight"].dtype == torch.float32
    assert torch.equal(saved["head.weight"], saved["fc2.weight"])


def test_ema_model_must_match():
    torch.manual_seed(0)
    net, other = _Net(), _Net()
    other.fc1 = nn.Linear(8, 16)
    with pytest.raises(ValueError, match="EMA model's 'fc1.weight' is missing or has another shape"):
        MasterWeightAdamW(net, other)


def test_missing_gradient_names_the_parameter():
    torch.manual_seed(0)
    net = _Net().to(DEVICE)
    opt = MasterWeightAdamW(net, copy.deepcopy(net))
    _loss(net, torch.randn(4, 8, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE)).backward()
    net.fc2.bias.grad = None
    with pytest.raises(RuntimeError, match="fc2.bias has no gradient"):
        opt.step()
