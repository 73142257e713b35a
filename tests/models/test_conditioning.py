"""The conditioning paths beyond class labels (params, spatial fields) and the paper's three ways
of feeding t and the class (adaLN-Zero, cross-attention, in-context), checked by properties:
shapes, gradient flow, nulls under force_drop_ids, identity at initialisation, input errors."""
import itertools

import pytest
import torch
from torch import nn

from ditkit.models.dit import DiT

B, C, S, P, CF = 3, 2, 8, 4, 3  # batch, input channels, size, params, field channels


def small(**kw) -> DiT:
    cfg = dict(input_size=S, patch_size=2, in_channels=C, hidden_size=32, depth=2, num_heads=2,
               num_classes=0, learn_sigma=False)
    return DiT(**(cfg | kw))


def randomize(model: DiT, seed: int = 0) -> DiT:
    """Leave adaLN-Zero behind: with zero gates and a zero output layer no gradient reaches the
    conditioning, so gradient and dependence checks need a model that has 'trained' a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def inputs(model: DiT, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    kw = {"x": torch.randn(B, C, S, S, generator=g), "t": torch.tensor([3.0, 400.0, 999.0])}
    if model.num_classes:
        kw["y"] = torch.tensor([0, 1, 2])
    if model.cond.num_params:
        kw["params"] = torch.randn(B, P, generator=g)
    if model.cond_channels:
        kw["field"] = torch.randn(B, model.cond_channels, S, S, generator=g)
    return kw


COMBOS = [
    dict(cond_mode=mode, num_classes=classes, num_params=params, cond_channels=CF if fmode else 0, field_mode=fmode or "cross_attention")
    for mode, classes, params, fmode in itertools.product(
        ("adaln", "cross_attention", "in_context"), (0, 3), (0, P), (None, "cross_attention", "concat"))
]


def combo_id(kw: dict) -> str:
    field = "nofield" if not kw["cond_channels"] else kw["field_mode"]
    return f"{kw['cond_mode']}-cls{kw['num_classes']}-p{kw['num_params']}-{field}"


def new_parameters(model: DiT) -> list[str]:
    """Parameters that exist only because of the extensions (not in the official layout)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and (n.startswith("cond.") or ".cross_attn." in n or "norm_cross" in n)]


@pytest.mark.parametrize("kw", COMBOS, ids=combo_id)
def test_every_combination_runs_and_trains_its_new_parameters(kw):
    model = randomize(small(**kw)).train()
    args = inputs(model)
    drop = torch.tensor([0, 1, 0])  # one dropped sample, so the learned nulls get a gradient too
    out = model(**args, force_drop_ids=drop)
    assert out.shape == (B, C, S, S) and torch.isfinite(out).all()
    out.square().mean().backward()
    names = new_parameters(model)
    # params: param_mlp (2 weights, 2 biases) + param_null; cross-attended field: conv weight, bias + field_null
    expected = (5 if kw["num_params"] else 0) + (3 if kw["cond_channels"] and kw["field_mode"] == "cross_attention" else 0)
    assert len([n for n in names if n.startswith("cond.")]) == expected
    has_cross = (kw["cond_channels"] and kw["field_mode"] == "cross_attention") or kw["cond_mode"] == "cross_attention"
    assert any(".cross_attn." in n for n in names) == bool(has_cross)
    for name, p in model.named_parameters():
        if name in names:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    if kw["cond_channels"] and kw["field_mode"] == "concat":
        assert model.x_embedder.proj.in_channels == C + CF


@pytest.mark.parametrize("mode", ["adaln", "cross_attention", "in_context"])
def test_time_reaches_the_output_in_every_cond_mode(mode):
    model = randomize(small(cond_mode=mode, num_classes=3)).eval()
    args = inputs(model)
    with torch.no_grad():
        a = model(**args)
        b = model(**(args | {"t": args["t"] + 50.0}))
        c = model(**(args | {"y": torch.tensor([2, 0, 1])}))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("kw", [k for k in COMBOS if k["num_params"] or k["cond_channels"] or k["num_classes"]], ids=combo_id)
def test_force_drop_ids_replaces_every_condition_by_its_null(kw):
    model = randomize(small(**kw)).eval()
    args = inputs(model)
    other = inputs(model, seed=2) | {"x": args["x"], "t": args["t"]}
    if "y" in other:
        other["y"] = torch.tensor([2, 2, 0])
    keep, drop = torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.long)
    with torch.no_grad():
        cond_a, cond_b = model(**args, force_drop_ids=keep), model(**other, force_drop_ids=keep)
        null_a, null_b = model(**args, force_drop_ids=drop), model(**other, force_drop_ids=drop)
    assert not torch.allclose(cond_a, cond_b)  # kept conditions matter ...
    torch.testing.assert_close(null_a, null_b)  # ... dropped ones do not
    with torch.no_grad():  # and the dropped output is the nulls' output
        if kw["num_params"]:
            model.cond.param_null.add_(1.0)
        elif kw["cond_channels"] and kw["field_mode"] == "cross_attention":
            model.cond.field_null.add_(1.0)
        elif kw["num_classes"]:
            model.y_embedder.embedding_table.weight[kw["num_classes"]].add_(1.0)
        else:  # only a concatenated field: its null is the zero field
            zero = args | {"field": torch.zeros_like(args["field"])}
            torch.testing.assert_close(null_a, model(**zero, force_drop_ids=keep))
            return
        assert not torch.allclose(null_a, model(**args, force_drop_ids=drop))


@pytest.mark.parametrize("prob, expect_null", [(1.0, True), (0.0, False)])
def test_training_dropout_of_params_and_field(prob, expect_null):
    for fmode in ("cross_attention", "concat"):
        model = randomize(small(num_params=P, cond_channels=CF, field_mode=fmode, param_dropout_prob=prob))
        args = inputs(model)
        with torch.no_grad():
            train_out = model.train()(**args)
            null_out = model.eval()(**args, force_drop_ids=torch.ones(B, dtype=torch.long))
            cond_out = model.eval()(**args)
        torch.testing.assert_close(train_out, null_out if expect_null else cond_out)


@pytest.mark.parametrize("kw", [
    dict(cond_channels=CF, field_mode="cross_attention"),
    dict(cond_mode="cross_attention", num_classes=3),
    dict(cond_mode="in_context", num_params=P, cond_channels=CF),
], ids=["field-xattn", "cond-xattn", "in-context"])
def test_fresh_blocks_are_the_identity_and_the_output_zero(kw):
    """adaLN-Zero extended: the ungated cross-attention starts with a zero projection."""
    model = small(**kw)
    args = inputs(model)
    assert torch.count_nonzero(model(**args)) == 0
    for block in model.blocks:
        if hasattr(block, "cross_attn"):
            assert torch.count_nonzero(block.cross_attn.proj.weight) == 0
        tokens, c, context = torch.randn(B, 16, 32), torch.randn(B, 32), torch.randn(B, 5, 32)
        torch.testing.assert_close(block(tokens, c, context if hasattr(block, "cross_attn") else None), tokens, rtol=0, atol=0)


def test_in_context_tokens_are_removed_before_the_final_layer():
    model = randomize(small(cond_mode="in_context", num_classes=3, num_params=P)).eval()
    seen = []
    model.final_layer.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    tokens = []
    model.blocks[-1].register_forward_hook(lambda mod, inp, out: tokens.append(out.shape))
    model(**inputs(model))
    n = (S // 2) ** 2
    assert tokens == [(B, n + 3, 32)]  # t, y and params tokens ride along through the blocks ...
    assert seen == [(B, n, 32)]  # ... and only the image tokens reach the output layer


@pytest.mark.parametrize("channels", [1, 2, 5])
def test_concat_takes_any_number_of_field_channels(channels):
    model = randomize(small(cond_channels=channels, field_mode="concat", learn_sigma=True))
    field = torch.randn(B, channels, S, S)
    out = model(torch.randn(B, C, S, S), torch.ones(B), field=field)
    assert out.shape == (B, 2 * C, S, S)
    assert model.x_embedder.proj.weight.shape[1] == C + channels


def test_extensions_only_add_their_own_keys():
    base = set(small(num_classes=3).state_dict())
    ext = set(small(num_classes=3, num_params=P, cond_channels=CF, cond_mode="in_context").state_dict())
    assert base <= ext
    assert all(k.startswith("cond.") or ".cross_attn." in k or ".norm_cross." in k for k in ext - base)


@pytest.mark.parametrize("change, message", [
    (dict(params=None), r"expects params of shape \(3, 4\), got None"),
    (dict(params=torch.zeros(B, P + 1)), r"expects params of shape \(3, 4\), got \(3, 5\)"),
    (dict(params=torch.zeros(P)), r"expects params of shape \(3, 4\), got \(4,\)"),
    (dict(field=None), r"conditioning field of shape \(3, 3, 8, 8\), got None"),
    (dict(field=torch.zeros(B, CF + 1, S, S)), r"got \(3, 4, 8, 8\)"),
    (dict(field=torch.zeros(B, CF, S, S + 2)), r"got \(3, 3, 8, 10\)"),
    (dict(field=torch.zeros(B + 1, CF, S, S)), r"got \(4, 3, 8, 8\)"),
    (dict(y=None), r"class-conditional \(num_classes=3\) but y is None"),
])
@pytest.mark.parametrize("fmode", ["cross_attention", "concat"])
def test_missing_or_misshapen_conditions_are_named(change, message, fmode):
    model = small(num_classes=3, num_params=P, cond_channels=CF, field_mode=fmode)
    with pytest.raises(ValueError, match=message):
        model(**(inputs(model) | change))


@pytest.mark.parametrize("extra, message", [
    (dict(params=torch.zeros(B, P)), r"without params \(num_params=0\)"),
    (dict(field=torch.zeros(B, CF, S, S)), r"without a conditioning field \(cond_channels=0\)"),
    (dict(y=torch.zeros(B, dtype=torch.long)), r"without classes \(num_classes=0\)"),
])
def test_conditions_the_model_cannot_use_are_refused(extra, message):
    model = small()
    with pytest.raises(ValueError, match=message):
        model(**(inputs(model) | extra))


def test_bad_modes_are_refused():
    with pytest.raises(ValueError, match="cond_mode must be"):
        small(cond_mode="film")
    with pytest.raises(ValueError, match="field_mode must be"):
        small(cond_channels=1, field_mode="add")


def test_cross_attention_field_tokens_carry_position():
    """Without a position embedding the cross-attention would see the field's patches as an
    unordered set: with all image tokens alike (x = 0, no pos_embed) a shifted field would give
    the same output.  The field tokens' sin-cos embedding makes it a different condition."""
    model = randomize(small(cond_channels=1)).eval()
    nn.init.zeros_(model.pos_embed)  # isolate the field's own position embedding
    x, field = torch.zeros(1, C, S, S), torch.randn(1, 1, S, S)
    with torch.no_grad():
        a = model(x, torch.ones(1), field=field)
        b = model(x, torch.ones(1), field=torch.roll(field, 2, dims=-1))
    assert not torch.allclose(a, b)


def test_training_drops_all_conditions_together():
    """Guidance's unconditional branch nulls every condition at once; training must see that case."""
    from ditkit.models.dit import DiT

    model = DiT(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                class_dropout_prob=0.5, num_params=2, cond_channels=1).train()
    drops = []
    orig = model.y_embedder.token_drop

    def spy(labels, force_drop_ids=None):
        drops.append(force_drop_ids.clone())
        return orig(labels, force_drop_ids)

    model.y_embedder.token_drop = spy
    torch.manual_seed(0)
    model(torch.randn(4000, 1, 8, 8), torch.rand(4000) * 999, torch.randint(0, 3, (4000,)),
          params=torch.randn(4000, 2), field=torch.randn(4000, 1, 8, 8))
    frac = drops[0].float().mean().item()
    assert abs(frac - 0.5) < 0.05  # one joint mask at the class dropout rate, passed to every embedder
