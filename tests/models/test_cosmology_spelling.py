"""The cosmology framework's spelling of the DiT builds the same network as ditkit's own arguments:
the same state-dict keys and shapes, and under one torch seed the same parameters and outputs."""
import pytest
import torch

from ditkit.config import load_config
from ditkit.models.cosmology import DiT as CosmoDiT
from ditkit.models.dit import DiT, build_model

B, S = 2, 16  # batch, side of the maps

SPELLING = dict(input_size=S, patch_size=4, in_channels=3, hidden_size=64, depth=2, num_heads=4, mlp_ratio=4.0,
                cond_channels=4, n_params=6)
DITKIT = dict(input_size=S, patch_size=4, in_channels=3, hidden_size=64, depth=2, num_heads=4, mlp_ratio=4.0,
              cond_channels=4, num_params=6, num_classes=0)


def pair(cross: bool) -> tuple[DiT, DiT]:
    """The model of each spelling, each built right after torch.manual_seed(0)."""
    torch.manual_seed(0)
    cosmo = CosmoDiT(**SPELLING, use_cross_attention=cross)
    torch.manual_seed(0)
    own = DiT(**DITKIT, field_mode="cross_attention" if cross else "concat")
    return cosmo.eval(), own.eval()


def randomize(*models: DiT) -> None:
    """The same random weights in each model: at initialisation adaLN-Zero makes every output 0,
    which any two models share."""
    for model in models:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def inputs(seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(B, 3, S, S, generator=g), "t": torch.tensor([10.0, 700.0]),
            "params": torch.randn(B, 6, generator=g), "field": torch.randn(B, 4, S, S, generator=g)}


@pytest.mark.parametrize("cross", [True, False], ids=["cross_attention", "concat"])
def test_same_state_dict_parameters_and_output(cross):
    cosmo, own = pair(cross)
    a, b = cosmo.state_dict(), own.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (".cross_attn." in " ".join(a)) == cross  # the fields are attended, or concatenated to the input
    randomize(cosmo, own)
    kw = inputs()
    with torch.no_grad():
        out = cosmo(**kw)
        assert torch.equal(out, own(**kw))
        # not a vacuous equality: the output depends on the parameters and on the conditioning fields
        assert not torch.allclose(out, cosmo(**(kw | {"params": kw["params"] + 1})))
        assert not torch.allclose(out, cosmo(**(kw | {"field": kw["field"] + 1})))
    assert out.shape == (B, 6, S, S)  # ε and the learned variance of the 3 generated fields


def test_the_frameworks_call_is_the_cosmo128_preset():
    """The framework's own call, as its users write it, against the model the cosmo128 preset builds."""
    torch.manual_seed(0)
    cosmo = CosmoDiT(input_size=128, patch_size=4, in_channels=3, hidden_size=384, depth=12, num_heads=6,
                     mlp_ratio=4.0, cond_channels=4, use_cross_attention=True, n_params=6)
    cfg = load_config("cosmo128").model
    torch.manual_seed(0)
    preset = build_model(cfg.name, **cfg.kwargs())
    a, b = cosmo.state_dict(), preset.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {k: v.shape for k, v in CosmoDiT().state_dict().items()} == {k: v.shape for k, v in a.items()}


@pytest.mark.parametrize("kwargs, message", [
    ({"img_size": 128}, "unknown argument.s. img_size of the cosmology DiT; it accepts input_size, patch_size"),
    ({"num_params": 6}, "num_params is spelt n_params here"),
    ({"dropout": 0.1, "out_channels": 3}, "dropout, out_channels"),
])
def test_unknown_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CosmoDiT(input_size=S, hidden_size=64, depth=1, num_heads=4, **kwargs)
