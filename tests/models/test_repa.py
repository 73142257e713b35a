"""REPA's side of the DiT: the projector exists only with ``repa_depth`` (the official state dict is
untouched), ``return_repa`` gives the projection of block k's tokens computed by hand, and REPA's
gradient reaches the projector and blocks 1..k, never the blocks after k or the output layer."""
import pytest
import torch
from torch import nn

from ditkit.models.dit import DiT

SMALL = {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 3, "num_heads": 2,
         "num_classes": 10}


def inputs(B=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 4, 8, 8, generator=g), torch.tensor([3.0, 700.0][:B]), torch.tensor([1, 10][:B])


def test_without_repa_the_state_dict_is_the_official_one():
    torch.manual_seed(0)
    plain = DiT(**SMALL).state_dict()
    torch.manual_seed(0)
    off = DiT(**SMALL, repa_depth=None, repa_dim=1024).state_dict()
    assert list(off) == list(plain)
    assert all(torch.equal(off[k], plain[k]) for k in plain)
    assert not any("repa" in k for k in plain)


def test_the_projector_is_the_papers_mlp_and_adds_only_its_keys():
    model = DiT(**SMALL, repa_depth=2, repa_dim=24)
    p = model.repa_projector
    assert [type(m) for m in p] == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    shapes = [(m.in_features, m.out_features) for m in p if isinstance(m, nn.Linear)]
    assert shapes == [(32, 2048), (2048, 2048), (2048, 24)]
    extra = set(model.state_dict()) - set(DiT(**SMALL).state_dict())
    assert extra == {f"repa_projector.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}


@pytest.mark.parametrize("cond_mode", ["adaln", "in_context"])
def test_return_repa_projects_the_tokens_after_block_k(cond_mode):
    torch.manual_seed(0)
    model = DiT(**SMALL, repa_depth=2, repa_dim=24, cond_mode=cond_mode).eval()
    for p in model.parameters():  # leave adaLN-Zero's identity blocks, so that the blocks matter
        p.data.add_(0.02 * torch.randn_like(p))
    x, t, y = inputs()
    captured = []
    model.blocks[1].register_forward_hook(lambda m, args, out: captured.append(out))
    out, z_hat = model(x, t, y, return_repa=True)
    assert torch.equal(out, model(x, t, y))  # the output does not change
    h = captured[0][:, :16]  # (B, N, D): block 2's output, the image tokens (in-context ones follow)
    assert z_hat.shape == (2, 16, 24)
    torch.testing.assert_close(z_hat, model.repa_projector(h))


def test_repa_gradient_reaches_blocks_up_to_k_only():
    torch.manual_seed(0)
    model = DiT(**SMALL, repa_depth=2, repa_dim=24)
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    x, t, y = inputs()
    _, z_hat = model(x, t, y, return_repa=True)
    z_hat.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if n.startswith("repa_projector."))
    for k in (0, 1):
        assert grads[f"blocks.{k}.attn.qkv.weight"].abs().sum() > 0
    assert all(g is None for n, g in grads.items() if n.startswith(("blocks.2.", "final_layer.")))


def test_repa_arguments_are_checked():
    with pytest.raises(ValueError, match="repa_depth must be a block in 1..3"):
        DiT(**SMALL, repa_depth=4)
    with pytest.raises(ValueError, match="repa_depth must be a block in 1..3"):
        DiT(**SMALL, repa_depth=0)
    x, t, y = inputs()
    with pytest.raises(ValueError, match="return_repa needs a model built with repa_depth"):
        DiT(**SMALL)(x, t, y, return_repa=True)
