"""Conditioning on per-sample sequences of embeddings (``DiT(context_dim=...)``): cross-attention to M tokens with a
key mask, a learned null sequence for guidance.  The properties: padding of the sequence changes nothing, the
masked cross-attention equals attention over the real keys alone (computed by hand), the order of the sequence
matters, dropped and empty sequences are the null one, guidance and the field tokens compose with it, and the
errors name what is wrong."""
import math

import pytest
import torch

from ditkit.guidance import guided_fn
from ditkit.models.conditioning import CrossAttention
from ditkit.models.dit import DiT
from tests.models.dit_cases import randomised

E = 6  # width of the embeddings
TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=0,
            learn_sigma=False, context_dim=E, context_len=16)


def _padded(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M, E) sequences whose padding is large noise, and the (B, M) mask."""
    longest = max(lengths)
    mask = torch.arange(longest) < torch.tensor(lengths)[:, None]
    ctx = torch.where(mask[..., None], torch.randn(len(lengths), longest, E), 100 * torch.randn(len(lengths), longest, E))
    return ctx, mask


def test_masked_cross_attention_is_attention_over_the_real_keys():
    torch.manual_seed(0)
    attn = CrossAttention(16, 4)
    torch.nn.init.normal_(attn.proj.weight)
    x, (ctx, mask) = torch.randn(3, 5, 16), (torch.randn(3, 7, 16), torch.arange(7) < torch.tensor([[2], [7], [4]]))
    out = attn(x, ctx, mask)
    for i, n in enumerate([2, 7, 4]):
        # by hand: softmax(q kᵀ / √d) v over the first n keys, per head
        q = attn.q(x[i]).view(5, 4, 4).transpose(0, 1)
        k, v = attn.kv(ctx[i, :n]).view(n, 2, 4, 4).permute(1, 2, 0, 3)
        heads = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(4), dim=-1) @ v
        torch.testing.assert_close(out[i], attn.proj(heads.transpose(0, 1).reshape(5, 16)), rtol=1e-5, atol=1e-5)


def test_padding_of_the_sequence_changes_nothing():
    model = randomised(DiT(**TINY)).eval()
    torch.manual_seed(1)
    ctx, mask = _padded([2, 5, 3])
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([10.0, 400.0, 900.0])
    out = model(x, t, context=ctx, context_mask=mask)
    for i, n in enumerate([2, 5, 3]):
        alone = model(x[i:i + 1], t[i:i + 1], context=ctx[i:i + 1, :n])
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_the_order_of_the_sequence_reaches_the_network():
    model = randomised(DiT(**TINY)).eval()
    x, t, ctx = torch.randn(1, 3, 8, 8), torch.tensor([300.0]), torch.randn(1, 3, E)
    assert not torch.allclose(model(x, t, context=ctx), model(x, t, context=ctx.flip(1)), atol=1e-4)


def test_dropped_and_empty_sequences_are_the_null_sequence():
    model = randomised(DiT(**TINY)).eval()
    x, t = torch.randn(2, 3, 8, 8).repeat(2, 1, 1, 1), torch.tensor([50.0, 600.0]).repeat(2)
    ctx, mask = _padded([3, 4, 1, 2])
    dropped = model(x, t, context=ctx, context_mask=mask, force_drop_ids=torch.ones(4, dtype=torch.long))
    torch.testing.assert_close(dropped[:2], dropped[2:], rtol=1e-5, atol=1e-5)  # whatever the sequence
    empty = model(x, t, context=ctx, context_mask=torch.zeros_like(mask))
    torch.testing.assert_close(empty, dropped, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(x, t, context=ctx, context_mask=mask), dropped, atol=1e-4)
    assert torch.isfinite(empty).all()


def test_guidance_doubles_the_sequence_and_drops_it_on_one_half():
    model = randomised(DiT(**TINY)).eval()
    ctx, mask = _padded([2, 4])
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([100.0, 200.0])
    fn = guided_fn(model, {"context": ctx, "context_mask": mask}, cfg_scale=3.0)
    cond = model(x, t, context=ctx, context_mask=mask)
    uncond = model(x, t, context=ctx, context_mask=mask, force_drop_ids=torch.ones(2, dtype=torch.long))
    torch.testing.assert_close(fn(x, t), uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_training_drops_the_sequence_and_its_gradient_reaches_the_projection():
    model = randomised(DiT(**TINY, param_dropout_prob=0.5)).train()
    ctx, mask = _padded([2, 4, 3, 1])
    out = model(torch.randn(4, 3, 8, 8), torch.tensor([1.0, 2.0, 3.0, 4.0]), context=ctx, context_mask=mask)
    out.square().mean().backward()
    seq = model.cond.sequence
    assert seq.proj[0].weight.grad.abs().sum() > 0
    assert seq.null.grad is not None


def test_a_field_and_a_sequence_are_attended_together():
    model = randomised(DiT(**TINY, cond_channels=2)).eval()
    ctx, mask = _padded([1, 3])
    x, t, field = torch.randn(2, 3, 8, 8), torch.tensor([5.0, 50.0]), torch.randn(2, 2, 8, 8)
    out = model(x, t, field=field, context=ctx, context_mask=mask)
    alone = model(x[1:], t[1:], field=field[1:], context=ctx[1:, :3])
    torch.testing.assert_close(out[1:], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, model(x, t, field=torch.randn(2, 2, 8, 8), context=ctx, context_mask=mask), atol=1e-4)


def test_a_variable_length_input_and_a_variable_length_sequence():
    model = randomised(DiT(input_size=(16,), patch_size=4, in_channels=2, hidden_size=32, depth=2, num_heads=2,
                           num_classes=0, context_dim=E)).eval()
    x, xmask = torch.randn(2, 2, 16), torch.arange(16) < torch.tensor([[8], [16]])
    ctx, mask = _padded([3, 1])
    out = model(x, torch.tensor([1.0, 2.0]), mask=xmask, context=ctx, context_mask=mask)
    alone = model(x[:1, :, :8], torch.tensor([1.0]), context=ctx[:1, :3])
    torch.testing.assert_close(out[:1, :, :8], alone, rtol=1e-5, atol=1e-5)


def test_no_sequence_conditioning_leaves_the_model_as_it_was():
    plain = DiT(**{**TINY, "context_dim": 0})
    assert not any("sequence" in k or "cross" in k for k in plain.state_dict())


@pytest.mark.parametrize("kwargs, match", [
    (dict(), r"expects a conditioning sequence of shape \(1, M, 6\), got None"),
    (dict(context=torch.randn(1, 3, 5)), r"expects a conditioning sequence of shape \(1, M, 6\), got \(1, 3, 5\)"),
    (dict(context=torch.randn(1, 3, E), context_mask=torch.ones(1, 4, dtype=torch.bool)), "context_mask must have the shape"),
    (dict(context=torch.randn(1, 17, E)), "17 tokens exceeds model.context_len=16"),
])
def test_errors_name_the_sequence(kwargs, match):
    model = DiT(**TINY).eval()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(1, 3, 8, 8), torch.tensor([1.0]), **kwargs)


def test_a_model_without_sequences_refuses_one():
    with pytest.raises(ValueError, match="context_dim=0"):
        DiT(**{**TINY, "context_dim": 0})(torch.randn(1, 3, 8, 8), torch.tensor([1.0]), context=torch.randn(1, 2, E))
